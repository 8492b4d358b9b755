"""Train the VP-Selector: ``python -m visioncoach.selector.train --data labels.jsonl --out DIR``.

Section 3.3 "Training" and appendix C.4: a generative classifier. Qwen2.5-VL-Instruct (3B in
the paper; ``--base-model PATH``, or ``tiny`` for the tiny random model) with LoRA on the
language model's q, k, v, o and MLP projections (r=16, alpha=32, dropout 0.05), backbone
frozen; AdamW, lr 2e-4, weight decay 0.01, 10 epochs, batch 8. The paper states no schedule
or clipping: the defaults are a constant lr and gradient-norm clipping at 1.0 (transformers'
Trainer default); ``--lr-schedule linear|cosine`` decays to 0. Input: instruction +
question + optional key objects + one contact-sheet image of the key frames; target: the
label string; token-level cross-entropy on the label tokens only (``model.label_loss``).

Data: the JSONL ``visioncoach.selector.build`` writes (``id``, ``video``, ``question``,
``key_times``, ``key_objects``, ``label``); lines whose label is null (dropped samples) are
skipped. Each sample's contact sheet is decoded once and cached as a PNG under
``--sheet-cache`` (default ``OUT/contact_sheets``). A bad line or an undecodable video is
skipped and counted, with file, line and sample index.

Writes into ``--out``: the adapter (``save_pretrained``), ``selector.json`` (labels, prompt
version, base model, pixel budget, training settings and per-epoch loss and teacher-forced
accuracy), ``train_log.jsonl`` (one line per epoch). ``selector.json`` is written last and
atomically: its presence marks a complete selector.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from visioncoach.models.resolve import ModelDirError, resolve_model_dir
from visioncoach.utils.files import write_text_atomic

from visioncoach.selector.cli import HelpFormatter
from visioncoach.selector.labels import selector_labels
from visioncoach.selector.model import (LORA_TARGET_MODULES, SELECTOR_META, encode, label_loss,
                                        load_base)
from visioncoach.selector.templates import SELECTOR_PROMPT_VERSION

log = logging.getLogger("visioncoach.selector.train")

__all__ = ["main", "load_labelled", "prepare_sheets", "train_selector"]


def load_labelled(paths: Sequence[str | Path], labels: Sequence[str],
                  unlabelled: Optional[dict] = None) -> tuple[list[dict], list[str]]:
    """Labelled samples from build JSONL files, and the problems of skipped lines (each names
    file and line). Lines the build left without a label (status ``dropped``: no VP type had
    every reasoner correct; ``skipped``: a bad record) are not problems; they are counted by
    status into ``unlabelled`` when given."""
    samples, problems = [], []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"--data: {path} not found")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                problems.append(f"{path}:{n}: invalid JSON ({exc})")
                continue
            if not isinstance(rec, dict) or rec.get("label") is None:
                if unlabelled is not None:
                    status = str(rec.get("status", "no label")) if isinstance(rec, dict) else "not an object"
                    unlabelled[status] = unlabelled.get(status, 0) + 1
                continue
            why = None
            if rec["label"] not in labels:
                why = f"label {rec['label']!r} is not one of {list(labels)}"
            elif not isinstance(rec.get("question"), str) or not isinstance(rec.get("video"), str):
                why = "needs string fields 'question' and 'video'"
            elif not rec.get("key_times") or not all(isinstance(t, (int, float)) for t in rec["key_times"]):
                why = "needs a non-empty list 'key_times' of seconds"
            if why:
                problems.append(f"{path}:{n}: sample {rec.get('id', '?')!r}: {why}")
                continue
            rec["_where"] = f"{path}:{n}"
            samples.append(rec)
    return samples, problems


def _sheet_key(rec: dict, max_side: int) -> str:
    key = json.dumps([rec["video"], [float(t) for t in rec["key_times"]], max_side])
    return hashlib.sha1(key.encode()).hexdigest()[:20]


def prepare_sheets(samples: list[dict], cache: Path, max_side: int) -> tuple[list[dict], list[str]]:
    """Attach ``sheet`` (a cached PNG path) to each sample whose key frames decode; returns the
    kept samples and the problems of the others."""
    from PIL import Image
    from tqdm import tqdm

    from visioncoach.data.decode import DecodeError
    from visioncoach.selector.frames import contact_sheet, key_frames_at

    cache.mkdir(parents=True, exist_ok=True)
    kept, problems = [], []
    for i, rec in enumerate(tqdm(samples, desc="contact sheets", disable=None)):
        path = cache / f"{_sheet_key(rec, max_side)}.png"
        if not path.is_file():
            try:
                frames, _ = key_frames_at(rec["video"], rec["key_times"], max_side=max_side)
            except DecodeError as exc:
                problems.append(f"{rec['_where']}: sample {i} ({rec.get('id')!r}): {exc}")
                continue
            fd, tmp = tempfile.mkstemp(dir=cache, suffix=".png.tmp")
            os.close(fd)
            Image.fromarray(contact_sheet(frames)).save(tmp, format="PNG")
            os.replace(tmp, path)
        kept.append({**rec, "sheet": str(path)})
    return kept, problems


LR_SCHEDULES = ("constant", "linear", "cosine")


def _lr_factor(schedule: str, total_steps: int):
    """Multiplier of the base lr at step s: constant (the paper states no schedule), or a
    linear / cosine decay to 0 over the run."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"--lr-schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    total = max(1, total_steps)
    if schedule == "linear":
        return lambda s: max(0.0, 1.0 - s / total)
    if schedule == "cosine":
        return lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total))
    return lambda s: 1.0


def train_selector(samples: list[dict], out: Path, *, base: str = "tiny", labels=None,
                   epochs: int = 10, batch_size: int = 8, lr: float = 2e-4, weight_decay: float = 0.01,
                   lora_r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.05,
                   min_pixels: int = 3136, max_pixels: int = 200704, max_side: int = 448,
                   device: str = "cpu", dtype: str = "auto", seed: int = 0,
                   gradient_checkpointing: bool = False, max_new_tokens: int = 8,
                   lr_schedule: str = "constant", grad_clip: float = 1.0, skipped: int = 0) -> dict:
    """LoRA-train the selector on samples carrying ``sheet`` (PNG path), ``question``,
    ``key_objects`` and ``label``; save it into ``out``; return the metadata written.
    ``labels``: the classes (default ``selector_labels()``, the visual-prompt table)."""
    from peft import LoraConfig, get_peft_model
    from PIL import Image

    labels = selector_labels() if labels is None else tuple(labels)
    if not samples:
        raise ValueError("no usable labelled samples to train on (see the problems logged above)")
    (out / SELECTOR_META).unlink(missing_ok=True)       # a stale one would mark this run complete
    torch.manual_seed(seed)
    dev = torch.device(device)
    model, processor = load_base(base, dev, dtype=dtype, seed=seed, min_pixels=min_pixels,
                                 max_pixels=max_pixels, gradient_checkpointing=gradient_checkpointing)
    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        model.enable_input_require_grads()
    lcfg = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                      target_modules=LORA_TARGET_MODULES, bias="none")
    model = get_peft_model(model, lcfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    log.info("LoRA: %d trainable parameters of %d", n_train, sum(p.numel() for p in model.parameters()))
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    total = epochs * math.ceil(len(samples) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(lr_schedule, total))
    rng = random.Random(seed)
    order = list(range(len(samples)))
    history = []
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / "train_log.jsonl"
    log_file.write_text("")
    for epoch in range(epochs):
        model.train()
        rng.shuffle(order)
        t0, loss_sum, hits, n_seen = time.time(), 0.0, 0, 0
        for s in range(0, len(order), batch_size):
            batch = [samples[i] for i in order[s:s + batch_size]]
            sheets = [np.array(Image.open(b["sheet"]).convert("RGB")) for b in batch]
            enc, n_target = encode(processor, sheets, [b["question"] for b in batch],
                                   [b.get("key_objects") or () for b in batch], labels,
                                   targets=[b["label"] for b in batch])
            enc = {k: v.to(dev) for k, v in enc.items()}
            loss, hit = label_loss(model, enc, n_target)
            if not torch.isfinite(loss):
                log.warning("epoch %d batch %d: non-finite loss, step skipped", epoch + 1, s // batch_size)
                opt.zero_grad(set_to_none=True)
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(batch)
            hits += int(hit.sum())
            n_seen += len(batch)
        row = {"epoch": epoch + 1, "loss": loss_sum / max(n_seen, 1),
               "teacher_forced_accuracy": hits / max(n_seen, 1), "samples": n_seen,
               "seconds": round(time.time() - t0, 2)}
        history.append(row)
        with open(log_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        log.info("epoch %(epoch)d: loss %(loss).4f, teacher-forced accuracy %(teacher_forced_accuracy).3f", row)
    model.save_pretrained(str(out))
    meta = {
        "labels": list(labels), "prompt_version": SELECTOR_PROMPT_VERSION,
        # The folder a checkpoint / run path resolved to: a run that later writes newer
        # checkpoints must not change the base this adapter was trained on.
        "base_model": base if base == "tiny" else str(resolve_model_dir(base).folder.resolve()),
        "tiny_seed": seed,
        "min_pixels": min_pixels, "max_pixels": max_pixels, "max_side": max_side,
        "max_new_tokens": max_new_tokens,
        "train": {"samples": len(samples), "epochs": epochs, "batch_size": batch_size, "lr": lr,
                  "lr_schedule": lr_schedule, "grad_clip": grad_clip,
                  "weight_decay": weight_decay, "lora_r": lora_r, "lora_alpha": lora_alpha,
                  "lora_dropout": lora_dropout, "target_modules": LORA_TARGET_MODULES,
                  "trainable_parameters": n_train, "seed": seed, "skipped": skipped,
                  "history": history},
    }
    write_text_atomic(out / SELECTOR_META, json.dumps(meta, indent=1))
    return meta


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m visioncoach.selector.train", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--data", nargs="+", required=True, help="JSONL file(s) written by visioncoach.selector.build")
    p.add_argument("--out", required=True, help="output folder (adapter + selector.json)")
    p.add_argument("--base-model", default="tiny",
                   help="local Qwen2.5-VL checkpoint folder (paper: Qwen2.5-VL-3B-Instruct), or 'tiny'")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lr-schedule", default="constant", choices=list(LR_SCHEDULES),
                   help="constant (the paper states none) or a linear / cosine decay to 0")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = no clipping)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--min-pixels", type=int, default=3136, help="contact sheet pixel floor")
    p.add_argument("--max-pixels", type=int, default=200704, help="contact sheet pixel budget (256 vision tokens)")
    p.add_argument("--max-side", type=int, default=448, help="key frames are decoded at most this long side")
    p.add_argument("--sheet-cache", default=None, help="contact-sheet PNG cache (default OUT/contact_sheets)")
    p.add_argument("--device", default="auto", help="auto = cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)

    def error(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 2

    for flag in ("epochs", "batch_size", "lora_r", "lora_alpha", "min_pixels", "max_pixels", "max_side"):
        if getattr(args, flag) < 1:
            return error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.lr <= 0 or args.weight_decay < 0 or not 0 <= args.lora_dropout < 1:
        return error("--lr must be > 0, --weight-decay >= 0 and --lora-dropout in [0, 1)")
    if args.base_model != "tiny":
        try:
            resolve_model_dir(args.base_model)
        except ModelDirError as exc:
            return error(f"--base-model: {exc}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    out = Path(args.out)
    labels = selector_labels()
    unlabelled: dict = {}
    try:
        samples, problems = load_labelled(args.data, labels, unlabelled)
    except FileNotFoundError as exc:
        return error(str(exc))
    cache = Path(args.sheet_cache) if args.sheet_cache else out / "contact_sheets"
    samples, decode_problems = prepare_sheets(samples, cache, args.max_side)
    problems += decode_problems
    for msg in problems[:20]:
        log.warning("skipped: %s", msg)
    if problems:
        log.warning("%d sample(s) skipped in all", len(problems))
    counts = {lab: sum(s["label"] == lab for s in samples) for lab in labels}
    log.info("%d labelled samples: %s", len(samples), counts)
    if not samples:
        # Say what the files held: lines the build left unlabelled are not logged as problems.
        why = {"dropped": "dropped by the build (no visual prompt type had every reasoner correct)",
               "skipped": "skipped by the build (bad records; see each line's 'reason')"}
        held = [f"{n} {why.get(status, f'with status {status!r} and no label')}"
                for status, n in sorted(unlabelled.items())]
        if problems:
            held.append(f"{len(problems)} unusable (logged above)")
        return error(f"no labelled samples to train on in --data {' '.join(args.data)}: "
                     f"{'; '.join(held) or 'no sample lines at all'}")
    try:
        meta = train_selector(samples, out, base=args.base_model, epochs=args.epochs,
                              batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                              lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                              lora_dropout=args.lora_dropout, min_pixels=args.min_pixels,
                              max_pixels=args.max_pixels, max_side=args.max_side, device=device,
                              dtype=args.dtype, seed=args.seed,
                              gradient_checkpointing=args.gradient_checkpointing,
                              lr_schedule=args.lr_schedule, grad_clip=args.grad_clip,
                              skipped=len(problems))
    except ValueError as exc:
        return error(str(exc))
    log.info("selector saved to %s (%d samples, final loss %.4f)", out, meta["train"]["samples"],
             meta["train"]["history"][-1]["loss"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
