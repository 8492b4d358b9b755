"""The model a memory plan is for: its architecture numbers and parameter counts, from a model
instantiated on the meta device (shapes only, no weights, nothing downloaded).

Sources of the architecture, in order: ``--model.path`` (its ``config.json``), else the
Qwen2.5-VL-7B config below, else (``arch="tiny"``) the trainer's tiny model from
``model.tiny`` (what an empty ``model.path`` trains).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Qwen/Qwen2.5-VL-7B-Instruct's config.json, as published on its model card
# (https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct/blob/main/config.json); the released
# base model and the paper's cold-start checkpoint share it. Written out so that the plan needs
# no download. vocab_size is the LM head's and the embedding's row count (152,064): the 7B pads
# them further than the smaller Qwen2.5 models (151,936, our tiny model's QWEN25_VOCAB_SIZE); the
# tokenizer's ids end at 151,664 (151,643 BPE ranks + 22 special tokens).
QWEN25_VL_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "hidden_act": "silu", "rms_norm_eps": 1e-06, "max_position_embeddings": 128000,
    "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 28,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_config": {
        "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
        "spatial_patch_size": 14, "temporal_patch_size": 2, "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "hidden_act": "silu",
    },
}


@dataclass(frozen=True)
class Arch:
    """The numbers the memory terms need (text decoder, LM head, vision tower)."""
    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    v_depth: int
    v_hidden: int
    v_intermediate: int
    v_heads: int
    patch: int
    temporal_patch: int
    merge: int


@dataclass
class ParamCounts:
    """Parameter elements of the meta-device model, by component."""
    vision: int            # model.visual (patch embedding, blocks, merger): frozen in RL
    embeddings: int        # the token embedding
    decoder: int           # the decoder layers + the final norm
    lm_head: int           # 0 when tied to the embedding
    tied: bool
    per_layer: int         # one decoder layer
    largest_module: tuple[str, int]   # the largest set ZeRO-3 gathers at once (a module's own params)
    largest_in_layer: int             # the largest module inside a decoder layer
    trainable: list[int] = field(default_factory=list)   # RL-trained params' sizes, model order
    frozen: list[int] = field(default_factory=list)      # the vision tower's

    @property
    def total(self) -> int:
        return self.vision + self.embeddings + self.decoder + self.lm_head

    @property
    def trained(self) -> int:
        return self.total - self.vision


def _text(cfg):
    return getattr(cfg, "text_config", cfg)


def arch_of(cfg, name: str) -> Arch:
    """``Arch`` from a ``Qwen2_5_VLConfig``."""
    t, v = _text(cfg), cfg.vision_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    tied = bool(getattr(t, "tie_word_embeddings", False) or getattr(cfg, "tie_word_embeddings", False))
    return Arch(name=name, vocab=t.vocab_size, hidden=t.hidden_size, layers=t.num_hidden_layers,
                heads=t.num_attention_heads, kv_heads=t.num_key_value_heads, head_dim=head_dim,
                intermediate=t.intermediate_size, tied=tied, v_depth=v.depth, v_hidden=v.hidden_size,
                v_intermediate=v.intermediate_size, v_heads=v.num_heads, patch=v.patch_size,
                temporal_patch=v.temporal_patch_size, merge=v.spatial_merge_size)


def hf_config(source: dict | str | Path):
    """A ``Qwen2_5_VLConfig`` from a config.json dict or file (transformers maps the released
    flat layout, text keys at the top level, onto its text_config)."""
    from transformers import Qwen2_5_VLConfig

    data = source if isinstance(source, dict) else json.loads(Path(source).read_text())
    return Qwen2_5_VLConfig(**{k: v for k, v in data.items() if k not in ("architectures", "model_type")})


def config_json_of(model_path: str) -> Path:
    """The config.json a ``model.path`` means: the folder's own, else the model folder a
    checkpoint / stage / run folder resolves to (a LoRA adapter: its base model's)."""
    direct = Path(model_path) / "config.json"
    if direct.is_file():
        return direct
    from visioncoach.models.resolve import resolve_model_dir

    resolved = resolve_model_dir(model_path)
    return (resolved.base or resolved.folder) / "config.json"


def tiny_config(tiny_cfg):
    """The tiny model's config, as ``build_policy`` builds it for an empty ``model.path``."""
    from visioncoach.models.tiny import tiny_qwen25_vl_config

    return tiny_qwen25_vl_config(hidden_size=tiny_cfg.hidden_size, num_layers=tiny_cfg.num_layers,
                                 num_heads=tiny_cfg.num_heads, num_kv_heads=tiny_cfg.num_kv_heads,
                                 vision_depth=tiny_cfg.vision_depth,
                                 vision_hidden_size=tiny_cfg.vision_hidden_size)


def meta_model(cfg):
    """``Qwen2_5_VLForConditionalGeneration`` on the meta device: every parameter has its real
    shape and no storage, so the 7B builds in a fraction of a second on any machine."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration(cfg)


def count_params(model) -> ParamCounts:
    """Per-component counts of a (meta or real) Qwen2.5-VL, each shared tensor once."""
    from visioncoach.models.access import base_model, language_model, lm_head, vision_tower

    def numel(module) -> int:
        return sum(p.numel() for p in module.parameters())

    lm, head = language_model(model), lm_head(model)
    tied = head.weight is lm.embed_tokens.weight
    vision_ids = {id(p) for p in vision_tower(model).parameters()}
    seen, trainable, frozen = set(), [], []
    for p in model.parameters():   # model order, each shared tensor once (as DeepSpeed sees them)
        if id(p) not in seen:
            seen.add(id(p))
            (frozen if id(p) in vision_ids else trainable).append(p.numel())
    # ZeRO-3 gathers a module's own parameters (recurse=False) around its forward and backward.
    own = {name or "(root)": sum(p.numel() for p in m.parameters(recurse=False))
           for name, m in base_model(model).named_modules()}
    own["lm_head"] = head.weight.numel()
    largest = max(own.items(), key=lambda kv: kv[1])
    layer = lm.layers[0]
    return ParamCounts(vision=numel(vision_tower(model)), embeddings=lm.embed_tokens.weight.numel(),
                       decoder=numel(lm) - lm.embed_tokens.weight.numel(),
                       lm_head=0 if tied else head.weight.numel(), tied=tied, per_layer=numel(layer),
                       largest_module=largest,
                       largest_in_layer=max(sum(p.numel() for p in m.parameters(recurse=False))
                                            for m in layer.modules()),
                       trainable=trainable, frozen=frozen)
