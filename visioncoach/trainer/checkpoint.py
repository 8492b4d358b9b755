"""Checkpoints that are never half-written.

A checkpoint is a folder ``step-NNNNNNNN`` holding the model (``save_pretrained``,
safetensors, loadable with transformers' ``from_pretrained``; LoRA models save their peft
adapter), the optimizer, scheduler and RNG states, and ``trainer_state.json`` (step, stage,
data position). It is written into a hidden temporary folder next to it and renamed into
place only when complete, and ``latest`` (a small text file, itself replaced atomically)
names the newest one. A crash at any point leaves the previous checkpoint and ``latest``
valid.

The model folder is complete for inference: with the processor it holds the image / video
processor settings (pixel bounds) and the tokenizer with its chat template, so
``from_pretrained`` / ``AutoProcessor.from_pretrained`` (and ``predict`` / ``infer``, through
``visioncoach.models.resolve``) load it alone. A LoRA checkpoint can also hold ``merged/``, the
adapters merged into the base weights, for inference without peft.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from visioncoach.models.resolve import LATEST, MERGED_DIR, MODEL_DIR, STATE
from visioncoach.utils.files import write_text_atomic


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(out_dir: str | Path, model, optimizer, scheduler, state: dict,
                    extra: dict | None = None, move_in: dict[str, Path] | None = None,
                    keep: int = 0, processor=None, export_merged: bool = False) -> Path:
    """Write checkpoint ``step-{state['step']}`` atomically and point ``latest`` at it; with
    ``keep`` > 0, delete all but the newest ``keep`` checkpoints afterwards.

    ``optimizer`` / ``scheduler`` may be None (their state lives elsewhere, e.g. in DeepSpeed's
    files); ``move_in``: {name: folder} moved into the checkpoint before it is published;
    ``processor`` is saved with the model (and with ``merged/``); ``export_merged``: a LoRA
    model also writes ``merged/`` (ignored for a model without adapters)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{int(state['step']):08d}"
    final = out_dir / name
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{name}."))
    try:
        model = model.module if hasattr(model, "module") else model
        model.save_pretrained(tmp / MODEL_DIR, safe_serialization=True)
        if processor is not None:
            processor.save_pretrained(tmp / MODEL_DIR)
        if export_merged and hasattr(model, "peft_config"):
            save_merged(model, tmp / MERGED_DIR, processor)
        for sub, src in (move_in or {}).items():
            os.replace(src, tmp / sub)
        torch.save({"optimizer": optimizer.state_dict() if optimizer is not None else None,
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "rng": _rng_state(), "extra": extra or {}}, tmp / "trainer.pt")
        (tmp / STATE).write_text(json.dumps(state, indent=1))
        _fsync_tree(tmp)
        if final.exists():  # re-saving the same step: move the old one aside first
            old = out_dir / f".{name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    write_text_atomic(out_dir / LATEST, name + "\n")
    if keep:
        # Only after the new one is published: a crash here leaves extra checkpoints, never fewer.
        for old in sorted(p for p in out_dir.glob("step-*") if p.is_dir() and p != final)[:-(keep - 1) or None]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def merged_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The base model's state dict with every active LoRA delta added to its layer's weight,
    under the plain model's keys. The training model is left untouched: peft's in-place
    merge followed by an unmerge would not restore the weights bit for bit."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    deltas = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and not module.merged and not module.disable_adapters:
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    d = module.get_delta_weight(adapter)
                    deltas[name] = d if name not in deltas else deltas[name] + d
    out = {}
    with torch.no_grad():
        for key, value in base.state_dict().items():
            parts = key.split(".")
            if any(p.startswith("lora_") for p in parts):
                continue
            if "base_layer" in parts:
                i = parts.index("base_layer")
                module, parts = ".".join(parts[:i]), parts[:i] + parts[i + 1:]
                if parts[-1] == "weight" and module in deltas:
                    value = value + deltas[module].to(value.dtype)
            out[".".join(parts)] = value
    return out


def save_merged(peft_model, folder: Path, processor=None) -> None:
    """``folder``: a plain ``from_pretrained`` export of a LoRA model with its adapters merged
    (and the processor), loadable without peft."""
    import copy

    base = peft_model.get_base_model()
    with torch.device("meta"):   # no second allocation: the plain model takes the merged tensors
        plain = type(base)(base.config)
    missing, unexpected = plain.load_state_dict(merged_state_dict(peft_model), strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"merged LoRA weights do not match {type(base).__name__}: missing "
                           f"{missing[:5]}, unexpected {unexpected[:5]}")
    plain.generation_config = copy.deepcopy(base.generation_config)
    plain.save_pretrained(folder, safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(folder)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names, or None; a dangling pointer is an error."""
    out_dir = Path(out_dir)
    pointer = out_dir / "latest"
    if not pointer.is_file():
        return None
    ckpt = out_dir / pointer.read_text().strip()
    if not (ckpt / STATE).is_file():
        raise FileNotFoundError(f"{pointer} names {ckpt}, which is not a complete checkpoint")
    return ckpt


def load_checkpoint(ckpt: str | Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG states in place (each that is not None;
    the RNG always); returns the trainer state."""
    ckpt = Path(ckpt)
    if not (ckpt / STATE).is_file():
        raise FileNotFoundError(f"{ckpt} is not a checkpoint (no {STATE})")
    if model is not None:
        load_weights(ckpt, model)
    return _load_trainer(ckpt, optimizer, scheduler)


def load_weights(ckpt: str | Path, model) -> None:
    """Load a checkpoint's weights (or, for a LoRA model, its adapters) into ``model`` in place."""
    ckpt = Path(ckpt)
    if not (ckpt / STATE).is_file():
        raise FileNotFoundError(f"{ckpt} is not a checkpoint (no {STATE})")
    model = model.module if hasattr(model, "module") else model
    if hasattr(model, "peft_config"):   # LoRA: the checkpoint holds the adapters only
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        result = set_peft_model_state_dict(model, load_file(ckpt / "model" / "adapter_model.safetensors"))
        if result.unexpected_keys:
            raise RuntimeError(f"checkpoint {ckpt} does not match the adapters: unexpected "
                               f"{result.unexpected_keys[:5]}")
        return
    # Through from_pretrained: the file uses the checkpoint key layout that transformers
    # converts on load (e.g. Qwen2.5-VL's "visual.*" vs the module's "model.visual.*").
    dtype = next(model.parameters()).dtype
    loaded = type(model).from_pretrained(ckpt / "model", dtype=dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    del loaded
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {ckpt} does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")


def _load_trainer(ckpt: Path, optimizer, scheduler) -> dict:
    blob = torch.load(ckpt / "trainer.pt", weights_only=False)
    if optimizer is not None:
        optimizer.load_state_dict(blob["optimizer"])
    if scheduler is not None and blob["scheduler"] is not None:
        scheduler.load_state_dict(blob["scheduler"])
    _set_rng_state(blob["rng"])
    return json.loads((ckpt / STATE).read_text())
