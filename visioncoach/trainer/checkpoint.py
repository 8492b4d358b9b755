"""Checkpoints that are never half-written.

A checkpoint is a folder ``step-NNNNNNNN`` holding the model (``save_pretrained``,
safetensors, loadable with transformers' ``from_pretrained``; LoRA models save their peft
adapter), the optimizer, scheduler and RNG states, and ``trainer_state.json`` (step, stage,
data position). It is written into a hidden temporary folder next to it and renamed into
place only when complete, and ``latest`` (a small text file, itself replaced atomically)
names the newest one. A crash at any point leaves the previous checkpoint and ``latest``
valid; the temporary folder is named after its writer (pid, host), so a later save or start
removes it once that writer is dead (``clean_stale_temps``).

Loading never unpickles code: ``trainer.pt`` holds tensors and plain data only (the RNG
states included) and, like DeepSpeed's partition files, is read with
``torch.load(weights_only=True)`` (``safe_load``; a file that needs more is refused).

The model folder is complete for inference: with the processor it holds the image / video
processor settings (pixel bounds) and the tokenizer with its chat template, so
``from_pretrained`` / ``AutoProcessor.from_pretrained`` (and ``predict`` / ``infer``, through
``visioncoach.models.resolve``) load it alone. A LoRA checkpoint can also hold ``merged/``, the
adapters merged into the base weights, for inference without peft.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from visioncoach.models.resolve import LATEST, MERGED_DIR, MODEL_DIR, STATE
from visioncoach.utils.files import write_text_atomic
from visioncoach.utils.runlock import host_tag, pid_alive

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as it is (the message says why and what to do)."""


# Beyond tensors and plain containers, what our trainer.pt files ever held (numpy's RNG state,
# before it was saved as a tensor) and what DeepSpeed's own ZeRO files hold: data classes
# whose unpickling constructs them and sets their fields, and never calls anything else.
def _allowed_globals(deepspeed: bool) -> list:
    out = [np.zeros(1).__reduce__()[0], np.ndarray, np.dtype,   # [0]: numpy's _reconstruct
           type(np.dtype(np.uint32))]
    if deepspeed:      # only then: importing DeepSpeed takes seconds
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        out += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    return out


def safe_load(path: str | Path, map_location="cpu", mmap: bool = False, deepspeed: bool = False):
    """``torch.load`` with ``weights_only=True``: tensors, plain containers and the few data
    classes of ``_allowed_globals`` (DeepSpeed's with ``deepspeed``, for its files). A file
    that needs anything else (a pickled object whose loading would run code) is a
    ``CheckpointError``, not executed."""
    import pickle

    with torch.serialization.safe_globals(_allowed_globals(deepspeed)):
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as exc:
            # torch's message: boilerplate paragraphs around the one that names the culprit.
            parts = [p.strip() for p in str(exc).split("\n\n") if p.strip() and not p.strip().startswith(
                ("Weights only load failed", "Please file an issue", "Check the documentation"))]
            why = parts[0].splitlines()[0] if parts else str(exc).splitlines()[0]
            raise CheckpointError(
                f"{path}: refused to load: it holds Python objects beyond tensors and plain data, "
                f"and unpickling them could run code ({why}). Checkpoints are loaded with "
                "torch.load(weights_only=True); only resume from checkpoints this trainer wrote") from None


def verify_checkpoint(ckpt: str | Path) -> None:
    """Every pickle file of checkpoint ``ckpt`` (trainer.pt, DeepSpeed's partitions) loads under
    ``safe_load`` (memory-mapped: its tensors are not read); ``CheckpointError`` otherwise."""
    ckpt = Path(ckpt)
    if not (ckpt / STATE).is_file():
        raise CheckpointError(f"{ckpt} is not a checkpoint (no {STATE})")
    for f in [ckpt / "trainer.pt", *sorted((ckpt / "deepspeed").rglob("*.pt"))]:
        if f.is_file():
            ds = f.parent != ckpt
            try:
                safe_load(f, mmap=True, deepspeed=ds)
            except RuntimeError as exc:
                if isinstance(exc, CheckpointError) or "mmap" not in str(exc):
                    raise
                safe_load(f, deepspeed=ds)    # the legacy (non-zip) format cannot be memory-mapped


def _rng_state() -> dict:
    # numpy's state as a tensor plus plain values: trainer.pt then loads with weights_only=True.
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    kind, keys, *rest = s["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), *rest))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in s["python"]))
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


# Hidden work folders next to the checkpoints: ".step-N.<pid>.<host>.<random>" (save_checkpoint),
# ".deepspeed-N.<pid>.<host>" (DeepSpeed's staging, StageRunner.save), ".step-N.old" (a
# checkpoint being replaced) and write_text_atomic's ".latest.<random>.tmp". The writer's pid
# and host say when one is a leftover: its writer is dead.
_TEMP = re.compile(r"^\.(?P<name>step-\d+|deepspeed-\d+)(?:\.(?P<pid>\d+)\.(?P<host>[A-Za-z0-9_-]+)(?:\..*)?"
                   r"|\.(?P<old>old)|\..*)?$|^\.latest\..*\.tmp$")


def temp_name(kind: str, step: int) -> str:
    """The hidden name of this process's work folder for ``kind`` (step / deepspeed) ``step``."""
    return f".{kind}-{int(step):08d}.{os.getpid()}.{host_tag()}"


def clean_stale_temps(folder: str | Path, everything: bool = False) -> list[str]:
    """Remove the work folders of dead writers in a stage's checkpoint folder (all of them with
    ``everything``: the caller holds the run lock, so no writer is alive); returns their names.
    A ``.step-N.old`` whose ``step-N`` is missing (killed while replacing it) is put back."""
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for p in sorted(folder.iterdir()):
        m = _TEMP.match(p.name)
        if m is None:
            continue
        if m["old"]:
            final = folder / m["name"]
            if not final.exists():
                os.replace(p, final)
                log.warning("%s: restored from %s (a save was killed while replacing it)", final, p.name)
                continue
            # else: the replacement was published; the old copy is garbage whoever wrote it
        elif m["pid"] and not everything:
            if m["host"] != host_tag() or pid_alive(int(m["pid"])):
                continue              # another host's, or a live writer's: not ours to judge
        elif not everything:
            continue                  # no writer named: only a lock holder may remove it
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p.name)
    if removed:
        log.warning("%s: removed leftovers of killed writers: %s", folder, ", ".join(removed))
    return removed


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
    clean_stale_temps(out_dir)
    name = f"step-{int(state['step']):08d}"
    final = out_dir / name
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=temp_name("step", state["step"]) + "."))
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
    blob = safe_load(ckpt / "trainer.pt")
    if optimizer is not None:
        if blob["optimizer"] is None:   # e.g. DeepSpeed's: its state is in its own files
            raise CheckpointError(f"{ckpt}/trainer.pt holds no optimizer state (written under DeepSpeed); "
                                  "resume it through visioncoach.trainer.reshard")
        optimizer.load_state_dict(blob["optimizer"])
    if scheduler is not None and blob["scheduler"] is not None:
        scheduler.load_state_dict(blob["scheduler"])
    _set_rng_state(blob["rng"])
    return json.loads((ckpt / STATE).read_text())
