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


def _tensorboard(path: Path):
    """A SummaryWriter, or None (logged once) when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("log.tensorboard: the tensorboard package is not installed; metrics go to "
                 "metrics.jsonl only (pip install tensorboard)")
        return None
    return SummaryWriter(str(path))
