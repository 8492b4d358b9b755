"""NVTX ranges around training phases and an optional torch.profiler window.

``nvtx_range`` marks a phase for Nsight Systems (``nsys profile``) on CUDA and is a no-op
elsewhere, so the loop needs no device checks. ``StepProfiler`` records a torch.profiler
trace (Chrome/Perfetto JSON) for the steps ``log.profile_steps = "a:b"`` names: the 0-based
step indices a..b-1 of the stage, as a Python slice (so "0:2" is the first two steps).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@contextlib.contextmanager
def nvtx_range(name: str):
    """``torch.cuda.nvtx.range`` when CUDA is available, nothing otherwise."""
    if torch.cuda.is_available():
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        yield


def parse_steps(spec: str) -> tuple[int, int] | None:
    """``"a:b"`` -> (a, b), the step slice [a, b); "" -> None."""
    if not spec:
        return None
    try:
        a, b = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"config key 'log.profile_steps' must be 'a:b' (integers), got {spec!r}") from None
    if not 0 <= a < b:
        raise ValueError(f"config key 'log.profile_steps' needs 0 <= a < b, got {spec!r}")
    return a, b


class StepProfiler:
    """Runs torch.profiler from step a to step b-1 and writes ``trace-<stage>-a-b.json``."""

    def __init__(self, spec: str, out_dir: Path, stage: str, enabled: bool = True):
        self.window = parse_steps(spec) if enabled else None
        self.out_dir, self.stage = out_dir, stage
        self.prof = None

    def before(self, step: int) -> None:
        """Call before running the step of 0-based index ``step``."""
        if self.window and step == self.window[0]:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts, record_shapes=True, profile_memory=True)
            self.prof.__enter__()

    def after(self, step: int) -> Path | None:
        """Call after the step of index ``step``; the trace path when the window closed."""
        if self.prof is None or step + 1 != self.window[1]:
            return None
        self.prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"trace-{self.stage}-{self.window[0]}-{self.window[1]}.json"
        self.prof.export_chrome_trace(str(path))
        self.prof = None
        log.info("profiler trace of %s step indices %d..%d: %s", self.stage, self.window[0],
                 self.window[1] - 1, path)
        return path
