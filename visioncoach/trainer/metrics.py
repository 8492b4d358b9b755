"""Where a stage's per-step metrics go, on rank 0: ``metrics.jsonl`` (one JSON object per step,
flushed as written), TensorBoard scalars under ``tensorboard/`` when the package is installed,
a tqdm progress bar and a log line every ``log.every_steps`` steps. Other ranks write nothing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["StepLog"]


class StepLog:
    """Per-step metrics of ``runner`` (a ``StageRunner``: its ``stage``, ``steps``, ``step``,
    ``out_dir``, ``metrics_path``, ``cfg.log``, ``log_step`` and ``progress_fields``)."""

    def __init__(self, runner, enabled: bool = True):
        self.runner, self.enabled = runner, enabled
        self.file = self.board = self.bar = None
        if not enabled:
            return
        cfg = runner.cfg.log
        runner.out_dir.mkdir(parents=True, exist_ok=True)
        # The steps after the checkpoint this stage starts from are run again: their rows from
        # an earlier (killed) segment go, so the file keeps one row per step.
        drop_rows_after(runner.metrics_path, runner.stage, runner.step)
        self.file = open(runner.metrics_path, "a")
        self.board = _tensorboard(runner.out_dir / "tensorboard") if cfg.tensorboard else None
        if cfg.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=runner.steps, initial=runner.step, desc=runner.stage, dynamic_ncols=True)

    def write(self, m: dict, history: list[dict]) -> None:
        """Record step metrics ``m``; ``history``: every step's metrics so far (the bar's window)."""
        if not self.enabled:
            return
        r = self.runner
        self.file.write(json.dumps(m) + "\n")
        self.file.flush()
        if m["step"] % r.cfg.log.every_steps == 0:
            r.log_step(m)
        if self.board is not None:
            for k, v in m.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.board.add_scalar(f"{r.stage}/{k}", v, m["step"])
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(r.progress_fields(history))

    def close(self) -> None:
        for h in (self.bar, self.board, self.file):
            if h is not None:
                h.close()
        self.file = self.board = self.bar = None


def read_rows(path: Path, stage: str | None = None) -> list[dict]:
    """The rows of ``metrics.jsonl`` (of ``stage`` only, if given); a line cut short by a kill
    is skipped."""
    rows = []
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return rows
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if stage is None or row.get("stage") == stage:
            rows.append(row)
    return rows


def drop_rows_after(path: Path, stage: str, step: int) -> int:
    """Rewrite ``metrics.jsonl`` (atomically) without ``stage``'s rows past ``step`` and without
    lines cut short by a kill; returns how many rows went."""
    from visioncoach.utils.files import write_text_atomic

    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return 0
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not (row.get("stage") == stage and row.get("step", 0) > step):
            keep.append(line)
    if len(keep) != len(lines):
        write_text_atomic(path, "".join(x + "\n" for x in keep))
        log.info("%s: dropped %d row(s) of %s steps after %d (run again from the checkpoint)",
                 path, len(lines) - len(keep), stage, step)
    return len(lines) - len(keep)


def _tensorboard(path: Path):
    """A SummaryWriter, or None (logged once) when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("log.tensorboard: the tensorboard package is not installed; metrics go to "
                 "metrics.jsonl only (pip install tensorboard)")
        return None
    return SummaryWriter(str(path))
