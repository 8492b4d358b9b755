"""Builds the policy (Qwen2.5-VL) and its processor from ``ModelConfig``."""

from __future__ import annotations

import importlib.util
import logging

import torch

from visioncoach.config import DataConfig, ModelConfig

log = logging.getLogger(__name__)


def resolve_attn_implementation(requested: str, device: torch.device) -> str:
    """``auto``: FlashAttention-2 when flash-attn is installed and the model runs on CUDA,
    else PyTorch sdpa. An explicit flash_attention_2 without flash-attn is an error."""
    has_fa = importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        return "flash_attention_2" if (has_fa and device.type == "cuda") else "sdpa"
    if requested == "flash_attention_2" and not has_fa:
        raise ImportError("config key 'model.attn_implementation' is flash_attention_2 but flash-attn "
                          "is not installed (GPU machines: pip install '.[gpu]'); use auto or sdpa")
    return requested


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[requested]


def build_policy(cfg: ModelConfig, data: DataConfig, device: torch.device, seed: int = 0):
    """(model, processor, info). ``cfg.path`` empty = tiny random-weight model (seeded); else any
    folder ``visioncoach.models.resolve`` accepts (model, checkpoint, stage or run folder; a
    LoRA adapter is merged), ``info["source"]`` saying which it resolved."""
    from visioncoach.models.tiny import build_processor, build_tiny_model

    attn = resolve_attn_implementation(cfg.attn_implementation, device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.path:
        from visioncoach.models.resolve import load_model_dir, resolve_model_dir

        # A model, checkpoint, stage or run folder (ModelDirError naming what is missing).
        resolved = resolve_model_dir(cfg.path)
        model, processor = load_model_dir(resolved, dtype=dtype, attn=attn, min_pixels=data.min_pixels,
                                          max_pixels=data.max_pixels)
        kind, source = str(resolved.folder), resolved.what
    else:
        t = cfg.tiny
        model = build_tiny_model(seed=seed, dtype=dtype, hidden_size=t.hidden_size,
                                 num_layers=t.num_layers, num_heads=t.num_heads,
                                 num_kv_heads=t.num_kv_heads, vision_depth=t.vision_depth,
                                 vision_hidden_size=t.vision_hidden_size, attn_implementation=attn)
        processor = build_processor(min_pixels=data.min_pixels, max_pixels=data.max_pixels)
        kind = source = "tiny random-weight Qwen2.5-VL"
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        model = add_lora(model, cfg.lora)
        kind += f" + LoRA r={cfg.lora.r}"
    model.to(device)
    info = {"model": kind, "source": source, "attn_implementation": model.config._attn_implementation,
            "dtype": str(dtype).removeprefix("torch."),
            "params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    log.info("policy: %(model)s, %(params)d parameters (%(trainable)d trainable), %(dtype)s, "
             "attention=%(attn_implementation)s", info)
    return model, processor, info


def add_lora(model, lora):
    """Wrap ``model`` with peft LoRA adapters on the language model's ``lora.target_modules``
    (the vision tower's MLP shares the projection names, so the match is anchored on
    ``language_model``); the base weights are frozen. The reference policy of RL is this
    model with its adapters disabled."""
    import re

    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    names = "|".join(re.escape(n) for n in lora.target_modules)
    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=rf".*language_model.*\.({names})")
    return get_peft_model(model, peft_cfg)
