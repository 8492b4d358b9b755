"""The VP-Selector model: a Qwen2.5-VL generative classifier with a LoRA adapter (section 3.3,
appendix C.4), its input encoding (shared by training and inference), and ``Selector``, the
frozen predictor the trainer's ``model`` selector mode and ``selector.apply`` use.

Input: one user turn holding the contact sheet of the sample's raw key frames (one image)
followed by ``selector_instruction`` (question, optional key objects, the label options).
Target: the label string then ``<|im_end|>``. Batches are left-padded, so every row's target
ends at the last position; the loss is token-level cross-entropy on the target tokens only
(logits are computed for the last few positions only: no [B, L, 151,936] logits tensor).

A saved selector is a folder with the peft adapter (``adapter_config.json``,
``adapter_model.safetensors``) and ``selector.json``: labels, prompt version, base model
(a local checkpoint path, or ``tiny`` with its seed; stored absolute, so a moved model is
given with ``BASE_OVERRIDES``), pixel budget of the contact sheet,
key-frame decoding size, and the training settings and results.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

from visioncoach.selector.labels import LabelMapper
from visioncoach.selector.templates import SELECTOR_PROMPT_VERSION, selector_instruction

log = logging.getLogger(__name__)

__all__ = ["SelectorInput", "Selector", "SELECTOR_META", "LORA_TARGET_MODULES", "load_base",
           "encode", "label_loss", "sheet_for", "check_selector", "UNMAPPED_WARN_FRACTION",
           "UNMAPPED_WARN_MIN", "BASE_OVERRIDES"]

SELECTOR_META = "selector.json"
# ``Selector.predict`` warns when more than this fraction of the latest outputs (the mapper's
# window, ``labels.RECENT_WINDOW`` = 64) named no label, once it has seen UNMAPPED_WARN_MIN
# outputs, and again at most once per window: a selector that writes no label most of the
# time is, in effect, ``raw`` everywhere, which only a count would otherwise show.
UNMAPPED_WARN_FRACTION = 0.25
UNMAPPED_WARN_MIN = 8
# Where each tool takes a replacement for selector.json's base_model (named in errors).
BASE_OVERRIDES = "--base-model DIR (selector.apply) or vp.selector_base_model=DIR (RL training)"
# q, k, v, o and MLP projections of the language model (the vision tower's blocks reuse the
# MLP names, so a regex keeps LoRA off them; appendix C.4 adapts the LLM).
LORA_TARGET_MODULES = (r"(?:.*\.)?language_model\.layers\.\d+\."
                       r"(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)")


@dataclass
class SelectorInput:
    """One sample for ``Selector.predict``: the question, the raw key frames (uint8
    [K, H, W, 3], torch or numpy, any device) and optional key-object names."""
    question: str
    frames: Union[torch.Tensor, np.ndarray]
    key_objects: Sequence[str] = field(default_factory=tuple)


def load_base(base: str, device: torch.device, *, dtype: str = "auto", seed: int = 0,
              min_pixels: int = 3136, max_pixels: int = 200704,
              gradient_checkpointing: bool = False):
    """(model, processor) for ``base``: a local Qwen2.5-VL model folder or training checkpoint,
    stage or run folder (``visioncoach.models.resolve``; a bad one is a ``ModelDirError``), or
    ``tiny`` (the tiny random-weight model, seeded) -- through ``build_policy``."""
    from visioncoach.config import DataConfig, ModelConfig
    from visioncoach.models.policy import build_policy

    path = "" if base == "tiny" else base
    mcfg = ModelConfig(path=path, dtype=dtype, gradient_checkpointing=gradient_checkpointing)
    model, processor, _ = build_policy(mcfg, DataConfig(min_pixels=min_pixels, max_pixels=max_pixels),
                                       device, seed=seed)
    return model, processor


def sheet_for(frames) -> np.ndarray:
    from visioncoach.selector.frames import contact_sheet

    return contact_sheet(frames)


def encode(processor, sheets: Sequence[np.ndarray], questions: Sequence[str],
           key_objects: Sequence[Sequence[str]], labels: Sequence[str],
           targets: Optional[Sequence[str]] = None) -> tuple[dict, list[int]]:
    """Left-padded model inputs for a batch, and each row's number of target tokens (label
    + ``<|im_end|>``; all 0 without targets, i.e. for generation)."""
    tok = processor.tokenizer
    texts, n_target = [], []
    for i, (q, objs) in enumerate(zip(questions, key_objects)):
        msgs = [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": selector_instruction(q, objs, labels)}]}]
        text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        if targets is not None:
            text += targets[i] + "<|im_end|>"
            n_target.append(len(tok(targets[i] + "<|im_end|>").input_ids))
        else:
            n_target.append(0)
        texts.append(text)
    enc = processor(text=texts, images=[np.array(s, dtype=np.uint8) for s in sheets], padding=True,
                    padding_side="left", return_tensors="pt")
    enc = dict(enc)
    if targets is not None:
        for i, t in enumerate(targets):
            want = tok(t + "<|im_end|>").input_ids
            got = enc["input_ids"][i, -len(want):].tolist()
            if got != want:
                raise RuntimeError(f"target {t!r} tokenised differently inside the prompt: {got} vs {want}")
    return enc, n_target


def label_loss(model, enc: Mapping[str, torch.Tensor], n_target: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean token cross-entropy over the target tokens, [B] bool: every target token is the
    argmax under teacher forcing)."""
    k = max(n_target) + 1
    out = model(**enc, logits_to_keep=k, use_cache=False)
    logits = out.logits[:, :-1].float()                           # predicts the last k-1 tokens
    ids = enc["input_ids"][:, -(k - 1):]
    pos = torch.arange(k - 1, device=ids.device)
    mask = pos[None, :] >= (k - 1 - torch.tensor(n_target, device=ids.device))[:, None]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1),
                                           reduction="none").view_as(ids)
    loss = (ce * mask).sum() / mask.sum()
    hit = ((logits.argmax(-1) == ids) | ~mask).all(dim=1)
    return loss, hit


def check_selector(path: str | Path, *, base_model: Optional[str] = None,
                   base_flag: Optional[str] = None) -> tuple[dict, str, str]:
    """(metadata, base model, where the base model came from) of a saved selector, checked
    without loading anything (start-up code can call it): FileNotFoundError without
    selector.json, ValueError for malformed metadata or another prompt version, and a
    ``ModelDirError`` when the base model (``base_model``, the override set with ``base_flag``,
    else selector.json's) is no local model folder, naming selector.json or the override."""
    from visioncoach.models.resolve import ModelDirError, resolve_model_dir

    meta_file = Path(path) / SELECTOR_META
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file} not found: not a saved VP-Selector "
                                "(python -m visioncoach.selector.train writes one)")
    try:
        meta = json.loads(meta_file.read_text())
        tuple(meta["labels"])
        base = str(meta["base_model"])
        if meta.get("prompt_version") == SELECTOR_PROMPT_VERSION:
            int(meta["min_pixels"]), int(meta["max_pixels"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{meta_file}: malformed selector metadata ({exc!r})") from None
    if meta.get("prompt_version") != SELECTOR_PROMPT_VERSION:
        raise ValueError(f"{meta_file}: prompt_version {meta.get('prompt_version')!r} does not "
                         f"match this code's {SELECTOR_PROMPT_VERSION!r}; retrain the selector")
    source = f"{meta_file}'s base_model"
    if base_model:
        base, source = str(base_model), base_flag or "the base_model override"
    if base != "tiny":
        # Checked here, before the shared loader, so that the error names what a selector's user
        # can change (selector.json's base_model, the override), not a training config key.
        try:
            resolve_model_dir(base)
        except ModelDirError as exc:
            if base_model:
                raise ModelDirError(f"{source} {base_model}: {exc}") from None
            raise ModelDirError(
                f"{meta_file}: the selector's base_model {base} cannot be loaded ({exc}); if the "
                f"model has moved, pass its new location with {base_flag or BASE_OVERRIDES}") from None
    return meta, base, source


def _frames_array(frames) -> np.ndarray:
    arr = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if arr.ndim == 3:
        arr = arr[None]
    return arr


class Selector:
    """A trained VP-Selector, frozen, for prediction (section 3.3: "The VP-Selector is frozen
    when incorporated in the RL framework"; appendix C.4 inference: greedy decoding mapped to
    a prompt class).

    ``Selector(path, device=..., batch_size=8)`` loads the base model named in
    ``path/selector.json`` (or ``base_model``, a folder or ``tiny``, when the one it was
    trained on has moved; ``base_flag`` is how the caller's user sets it, for errors),
    applies the adapter and merges it. A base model that cannot be found is a
    ``ModelDirError`` naming selector.json (or ``base_flag``) and how to override it.
    ``predict(batch)`` takes ``SelectorInput``s or mappings with ``question``, ``frames``
    (raw key frames, uint8 [K, H, W, 3]) and optionally ``key_objects``; returns one label per
    sample, in order. Texts that map to no label give ``raw`` and are counted in
    ``unmapped``; a high recent fraction of them is warned about (``UNMAPPED_WARN_FRACTION``).
    """

    def __init__(self, path: str | Path, *, device: str | torch.device = "cpu", dtype: str = "auto",
                 batch_size: int = 8, max_new_tokens: Optional[int] = None,
                 base_model: Optional[str] = None, base_flag: Optional[str] = None):
        from peft import PeftModel

        self.path = Path(path)
        self.meta, base, self.base_source = check_selector(path, base_model=base_model, base_flag=base_flag)
        self.labels = tuple(self.meta["labels"])
        self.base_model = base
        self.device = torch.device(device)
        model, self.processor = load_base(base, self.device, dtype=dtype,
                                          seed=int(self.meta.get("tiny_seed", 0)),
                                          min_pixels=int(self.meta["min_pixels"]),
                                          max_pixels=int(self.meta["max_pixels"]))
        self.model = PeftModel.from_pretrained(model, str(self.path)).merge_and_unload().eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.batch_size = max(1, int(batch_size))
        self.max_new_tokens = int(max_new_tokens or self.meta.get("max_new_tokens", 8))
        self.mapper = LabelMapper(self.labels)
        self.max_side = self.meta.get("max_side")
        self._warned_at: Optional[int] = None    # mapper.total at the last high-unmapped warning
        log.info("%s", self.describe())

    def describe(self) -> str:
        """Which selector this is: folder, labels, base model (and where that came from)."""
        return (f"VP-Selector {self.path}: labels {list(self.labels)}, base model {self.base_model} "
                f"(from {self.base_source}), prompt version {self.meta.get('prompt_version')}")

    @property
    def unmapped(self) -> int:
        """How many generated texts mapped to no label (and became ``raw``) so far."""
        return self.mapper.unmapped

    def _warn_if_mostly_unmapped(self) -> None:
        bad, seen = self.mapper.recent_unmapped()
        if (seen >= UNMAPPED_WARN_MIN and bad > UNMAPPED_WARN_FRACTION * seen
                and (self._warned_at is None
                     or self.mapper.total - self._warned_at >= self.mapper.recent.maxlen)):
            self._warned_at = self.mapper.total
            log.warning("%s: %d of its last %d outputs named no visual prompt and became raw "
                        "(e.g. %r); a selector that does this is raw nearly everywhere: check its "
                        "training (teacher-forced accuracy in selector.json) and base model",
                        self.path, bad, seen, self.mapper.last_unmapped)

    @staticmethod
    def _fields(item) -> tuple[str, np.ndarray, Sequence[str]]:
        if isinstance(item, SelectorInput):
            return item.question, _frames_array(item.frames), tuple(item.key_objects or ())
        if isinstance(item, Mapping):
            objs = item.get("key_objects", item.get("objects")) or ()
            return str(item["question"]), _frames_array(item["frames"]), tuple(objs)
        raise TypeError(f"predict() takes SelectorInput or mappings, got {type(item).__name__}")

    def _resize(self, frames: np.ndarray) -> np.ndarray:
        """Key frames scaled so the longer side is at most ``max_side`` (as in training)."""
        if not self.max_side or max(frames.shape[1:3]) <= self.max_side:
            return frames
        from PIL import Image

        h, w = frames.shape[1:3]
        s = self.max_side / max(h, w)
        size = (max(2, round(w * s)), max(2, round(h * s)))
        return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BILINEAR)) for f in frames])

    @torch.no_grad()
    def generate_texts(self, batch: Sequence) -> list[str]:
        """The raw greedy generations for a batch (before label mapping)."""
        out: list[str] = []
        tok = self.processor.tokenizer
        eos = tok.convert_tokens_to_ids("<|im_end|>")
        for s in range(0, len(batch), self.batch_size):
            chunk = [self._fields(x) for x in batch[s:s + self.batch_size]]
            sheets = [sheet_for(self._resize(f)) for _, f, _ in chunk]
            enc, _ = encode(self.processor, sheets, [q for q, _, _ in chunk], [o for _, _, o in chunk],
                            self.labels)
            enc = {k: v.to(self.device) for k, v in enc.items()}
            gen = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      temperature=None, top_p=None, top_k=None,
                                      eos_token_id=eos, pad_token_id=tok.pad_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            out += tok.batch_decode(new.tolist(), skip_special_tokens=True)
        return out

    def predict(self, batch: Sequence) -> list[str]:
        """One label per sample (class docstring)."""
        labels = [self.mapper(t) for t in self.generate_texts(list(batch))]
        self._warn_if_mostly_unmapped()
        return labels

    def choose_for_samples(self, samples: Sequence) -> list[str]:
        """One label per decoded training sample (``data.loader.ClipSample``, the RL trainer's
        ``vp.selector=model``): its question, its key frames (all frames when it has none) and
        the key objects annotated in its reward record."""
        return self.predict([
            SelectorInput(question=s.record["question"],
                          frames=s.frames[s.is_key] if s.is_key.any() else s.frames,
                          key_objects=sorted({n for f in s.reward_record.frames for n in f.names})
                          if s.reward_record is not None else ())
            for s in samples])
