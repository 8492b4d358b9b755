"""Reaching the parts of a Qwen2.5-VL policy through its wrappers (peft, DeepSpeed's engine).

The rollout engine and the trainer call the model's submodules directly (vision tower, language
model, LM head) rather than its top-level forward; these are the one way to reach them.
"""

from __future__ import annotations

import contextlib

__all__ = ["hf_model", "base_model", "language_model", "lm_head", "vision_tower", "eval_mode",
           "checkpointing_active"]


def hf_model(model):
    """The ``Qwen2_5_VLForConditionalGeneration`` inside a DeepSpeed engine (``.module``) and/or a
    peft wrapper (LoRA layers stay in)."""
    model = model.module if hasattr(model, "module") and not hasattr(model, "lm_head") else model
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def base_model(model):
    """``Qwen2_5_VLModel`` (has ``visual``, ``language_model``, ``get_rope_index``)."""
    model = hf_model(model)
    return model.model if hasattr(model, "lm_head") else model


def language_model(model):
    return base_model(model).language_model


def lm_head(model):
    return hf_model(model).lm_head


def vision_tower(model):
    return base_model(model).visual


@contextlib.contextmanager
def eval_mode(model):
    """Gradient checkpointing in training mode silently drops the KV cache: decode in eval,
    then give every submodule back its own mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def checkpointing_active(model) -> bool:
    lm = language_model(model)
    return lm.training and any(getattr(layer, "gradient_checkpointing", False) for layer in lm.layers)


