"""Which model a user's folder means, and loading it.

Every entry point that takes a model (``--model.path``, ``predict`` / ``infer --model``, the
local judge, the selector's base model) accepts any of:

* a model folder: ``config.json`` + weights + processor + tokenizer (a ``from_pretrained``
  folder, e.g. a released Qwen2.5-VL or a checkpoint's ``model/``);
* a LoRA adapter folder (``adapter_config.json``): applied to, and merged into, the base model
  its config names, which must itself be a local model folder;
* a checkpoint ``step-N`` (``trainer_state.json``): its ``merged/`` export when present, else
  its ``model/`` (full weights, or the LoRA adapter);
* a stage folder ``checkpoints/<stage>`` (a ``latest`` pointer): the checkpoint it names;
* a run folder (the trainer's ``output_dir``, holding ``checkpoints/<stage>/latest``) or its
  ``checkpoints/`` folder: the latest checkpoint of the last stage that has one (RL over SFT).

``resolve_model_dir`` says which it found (logged, and returned as ``what``); a folder that is
none of these is one ``ModelDirError`` naming what is missing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

__all__ = ["ModelDirError", "ResolvedModel", "resolve_model_dir", "load_model_dir",
           "STATE", "LATEST", "MODEL_DIR", "MERGED_DIR", "CHECKPOINTS_DIR"]

# The checkpoint layout (written by ``visioncoach.trainer.checkpoint``).
STATE = "trainer_state.json"
LATEST = "latest"
MODEL_DIR = "model"
MERGED_DIR = "merged"
CHECKPOINTS_DIR = "checkpoints"
# A run's stages, the later first: an RL checkpoint supersedes the SFT one it started from.
STAGE_ORDER = ("rl", "sft")

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "pytorch_model.bin.index.json")
_PROCESSOR = ("processor_config.json", "preprocessor_config.json")


class ModelDirError(FileNotFoundError):
    """A path that is no usable model folder (the message says what is missing)."""


class ResolvedModel(NamedTuple):
    folder: Path              # a model folder, or a LoRA adapter folder when ``base`` is set
    what: str                 # how the given path led there, for the user
    base: Path | None = None  # LoRA adapter: the model folder it applies to


def _has_processor(d: Path) -> bool:
    return any((d / f).is_file() for f in _PROCESSOR)


def _has_tokenizer(d: Path) -> bool:
    return (d / "tokenizer.json").is_file() or ((d / "vocab.json").is_file() and (d / "merges.txt").is_file())


def _check_model_folder(d: Path) -> None:
    missing = []
    if not any((d / f).is_file() for f in _WEIGHTS):
        missing.append("weights (model.safetensors)")
    if not _has_processor(d):
        missing.append("the processor (processor_config.json or preprocessor_config.json)")
    if not _has_tokenizer(d):
        missing.append("the tokenizer (tokenizer.json)")
    if missing:
        raise ModelDirError(
            f"{d} has config.json but lacks {' and '.join(missing)}, so it cannot be loaded "
            "(a checkpoint written before processors were saved: add them with "
            "AutoProcessor.from_pretrained(BASE).save_pretrained(FOLDER))")


def _adapter_base(d: Path) -> Path:
    try:
        base = json.loads((d / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as exc:
        raise ModelDirError(f"{d / 'adapter_config.json'}: unreadable ({exc})") from None
    if not base or not Path(base).is_dir():
        raise ModelDirError(
            f"{d} is a LoRA adapter whose base model ({base or 'not recorded'}) is not a local "
            "folder: pass a checkpoint trained with log.export_merged=true (its merged/ folder "
            "needs no base), or a model folder")
    return Path(base)


def _stage_checkpoint(stage: Path) -> Path:
    name = (stage / LATEST).read_text().strip()
    ckpt = stage / name
    if not name or not (ckpt / STATE).is_file():
        raise ModelDirError(f"{stage / LATEST} names {ckpt}, which is not a complete checkpoint "
                            f"(no {STATE})")
    return ckpt


def _stage_rank(stage: Path) -> tuple[int, str]:
    return (STAGE_ORDER.index(stage.name) if stage.name in STAGE_ORDER else len(STAGE_ORDER), stage.name)


def _resolve(d: Path, trail: list[str], depth: int = 0) -> ResolvedModel:
    if depth > 4:   # an adapter naming an adapter naming ... (or a loop)
        raise ModelDirError(f"{d}: too many levels of LoRA adapters / checkpoints")
    if not d.is_dir():
        why = "a file, not a folder" if d.exists() else "no such folder"
        raise ModelDirError(f"{d} is not a local checkpoint folder ({why}; nothing is "
                            "downloaded at run time)")
    if (d / "config.json").is_file():
        _check_model_folder(d)
        trail.append(f"model folder {d}")
        return ResolvedModel(d, " -> ".join(trail))
    if (d / "adapter_config.json").is_file():
        base = _resolve(_adapter_base(d), [], depth + 1)
        if base.base is not None:
            raise ModelDirError(f"{d} is a LoRA adapter on {base.folder}, itself an adapter: "
                                "only one level is supported")
        trail.append(f"LoRA adapter {d} on {base.what}")
        return ResolvedModel(d, " -> ".join(trail), base.folder)
    if (d / STATE).is_file():
        merged, model = d / MERGED_DIR, d / MODEL_DIR
        if (merged / "config.json").is_file():
            trail.append(f"checkpoint {d.name} (merged LoRA export)")
            return _resolve(merged, trail, depth + 1)
        if model.is_dir():
            trail.append(f"checkpoint {d.name}")
            return _resolve(model, trail, depth + 1)
        raise ModelDirError(f"checkpoint {d} has no {MODEL_DIR}/ folder")
    if (d / LATEST).is_file():
        ckpt = _stage_checkpoint(d)
        trail.append(f"stage folder {d} (latest {ckpt.name})")
        return _resolve(ckpt, trail, depth + 1)
    ckpts = d / CHECKPOINTS_DIR if (d / CHECKPOINTS_DIR).is_dir() else d
    stages = sorted((s for s in ckpts.iterdir() if (s / LATEST).is_file()), key=_stage_rank)
    if stages:
        kind = "run folder" if ckpts is not d else f"{CHECKPOINTS_DIR} folder"
        trail.append(f"{kind} {d} (stage {stages[0].name})")
        return _resolve(stages[0], trail, depth + 1)
    if ckpts is not d:
        raise ModelDirError(f"run folder {d} has no checkpoint yet (no {CHECKPOINTS_DIR}/<stage>/{LATEST})")
    raise ModelDirError(
        f"{d} is not a model folder: it has no config.json (a from_pretrained folder), no "
        f"adapter_config.json (a LoRA adapter), no {STATE} (a checkpoint step-N), no {LATEST} "
        f"(a stage folder {CHECKPOINTS_DIR}/<stage>) and no {CHECKPOINTS_DIR}/<stage>/{LATEST} "
        "(a run folder)")


def resolve_model_dir(path: str | Path) -> ResolvedModel:
    """The model folder that ``path`` means (module docstring); logs what it resolved."""
    if not str(path):
        raise ModelDirError("no model folder given (an empty path)")
    resolved = _resolve(Path(path), [])
    log.info("model: %s", resolved.what)
    return resolved


def load_model_dir(resolved: ResolvedModel, *, dtype, attn: str, min_pixels: int | None,
                   max_pixels: int | None):
    """(Qwen2.5-VL model, processor) of a resolved folder; a LoRA adapter is merged into its base
    so the model is a plain transformers one. The processor's pixel bounds are set to the given
    ones (what the caller preprocesses with); None keeps the saved processor's (as trained)."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        resolved.base or resolved.folder, dtype=dtype, attn_implementation=attn, local_files_only=True)
    if resolved.base is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(resolved.folder)).merge_and_unload()
    source = resolved.folder if _has_processor(resolved.folder) else resolved.base
    bounds = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    processor = AutoProcessor.from_pretrained(source, local_files_only=True, **bounds)
    return model, processor
