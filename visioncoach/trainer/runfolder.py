"""The run folder (``output_dir``) across the segments of a run: one owner at a time, no
leftovers of a killed one, resume checkpoints checked before any model is built, and a
``summary.json`` that describes the whole run rather than its last segment.

``claim_run_folder`` (every rank, after the process group is up, before the model): rank 0
takes ``run.lock`` (``visioncoach.utils.runlock``), removes the work folders that killed
writers left in ``checkpoints/<stage>/`` (safe: the lock says nobody else writes there), and
checks that the checkpoints ``log.resume`` will load are complete and hold only data
(``checkpoint.verify_checkpoint``); the other ranks learn the outcome by a broadcast, so all
stop together with one message. Under torchrun each worker also ends when its launcher does
(``runlock.exit_with_launcher``).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from pathlib import Path

from visioncoach.models.resolve import CHECKPOINTS_DIR, STATE
from visioncoach.trainer.checkpoint import (CheckpointError, clean_stale_temps, latest_checkpoint,
                                            verify_checkpoint)
from visioncoach.trainer.metrics import read_rows
from visioncoach.utils.files import write_text_atomic
from visioncoach.utils.runlock import LockHeld, RunLock, exit_with_launcher

log = logging.getLogger(__name__)

__all__ = ["StartupError", "claim_run_folder", "resume_checkpoints", "RunSummary", "stage_rows"]

STAGES = {"sft": ("sft",), "rl": ("rl",), "sft+rl": ("sft", "rl")}


class StartupError(RuntimeError):
    """The run cannot start on this folder (the message says why); raised on every rank."""


def resume_checkpoints(cfg) -> list[Path]:
    """The checkpoints ``log.resume`` makes this run load (its stages' latest, or the path)."""
    if not cfg.log.resume:
        return []
    if cfg.log.resume != "auto":
        return [Path(cfg.log.resume)]
    root = Path(cfg.output_dir) / CHECKPOINTS_DIR
    return [c for c in (latest_checkpoint(root / s) for s in STAGES[cfg.stage]) if c is not None]


def claim_run_folder(cfg, dist_info) -> RunLock | None:
    """Lock ``output_dir`` for this run (rank 0's lock, returned there; None elsewhere), clean
    it, check the resume checkpoints; ``StartupError`` on every rank when any of it fails."""
    if os.environ.get("TORCHELASTIC_RUN_ID"):        # launched by torchrun: its child
        exit_with_launcher()
    error, lock = None, None
    if dist_info.is_main:
        out = Path(cfg.output_dir)
        try:
            lock = RunLock(out)
            lock.acquire()
            for stage in sorted((out / CHECKPOINTS_DIR).glob("*")):
                clean_stale_temps(stage, everything=True)
            for leftover in out.glob(".*.tmp"):      # write_text_atomic's, of a killed writer
                leftover.unlink(missing_ok=True)
            for ckpt in resume_checkpoints(cfg):
                verify_checkpoint(ckpt)
                stage = json.loads((ckpt / STATE).read_text()).get("stage")
                if stage not in STAGES[cfg.stage]:
                    raise CheckpointError(f"config key 'log.resume': checkpoint {ckpt} is from stage "
                                          f"{stage!r}, and stage={cfg.stage} does not run it")
        except (LockHeld, CheckpointError, FileNotFoundError, ValueError) as exc:
            error = str(exc)
            if lock is not None:
                lock.release()
                lock = None
    if dist_info.backend is not None:
        import torch.distributed as dist

        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise StartupError(error)
    return lock


def stage_rows(runner, history: list[dict]) -> list[dict]:
    """A finished stage's rows over all segments of the run: ``metrics.jsonl`` (one row per
    step, see ``metrics.drop_rows_after``) on rank 0, which writes it; this segment's elsewhere."""
    return read_rows(runner.metrics_path, runner.stage) if runner.dist.is_main else history


class RunSummary(dict):
    """``summary.json``: written (rank 0) whenever a top-level entry is set, so a killed
    segment leaves what it had; a resumed run starts from it, keeping what its earlier
    segments measured (e.g. the held-out check before SFT) and adding itself to ``segments``
    (start, whether resumed, wall time, ``completed`` or ``interrupted``). ``wall_time_s``
    is the sum over the segments, each from its process's start-up (``t0``, perf_counter)."""

    def __init__(self, cfg, enabled: bool, t0: float | None = None):
        super().__init__()
        self.path, self.enabled = Path(cfg.output_dir) / "summary.json", enabled
        self.t0 = time.perf_counter() if t0 is None else t0
        resumed = bool(resume_checkpoints(cfg)) if enabled else bool(cfg.log.resume)
        if enabled and resumed and self.path.is_file():
            try:
                self.update(json.loads(self.path.read_text()))
            except ValueError:
                log.warning("%s is unreadable: the summary starts over", self.path)
        segments = self.setdefault("segments", [])
        for s in segments:
            if s.get("status") == "running":
                s["status"] = "interrupted"
        self.segment = {"started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                        "resumed": resumed, "status": "running"}
        segments.append(self.segment)
        self["resumes"] = sum(1 for s in segments if s.get("resumed"))

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.write()

    def write(self) -> None:
        self.segment["wall_time_s"] = round(time.perf_counter() - self.t0, 1)
        super().__setitem__("wall_time_s", round(sum(s.get("wall_time_s", 0) for s in self["segments"]), 1))
        if self.enabled:
            write_text_atomic(self.path, json.dumps(self, indent=1))

    def finish(self) -> None:
        self.segment["status"] = "completed"
        self.write()
