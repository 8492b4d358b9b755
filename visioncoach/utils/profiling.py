"""Phase timings, NVTX ranges, peak memory, call counts and an optional torch.profiler window.

``Phases`` times the phases of a training step and marks each as an NVTX range for Nsight
Systems (``nsys profile``); ``nvtx_range`` alone is a no-op without CUDA, so the loop needs no
device checks. ``StepProfiler`` records a torch.profiler
trace (Chrome/Perfetto JSON) for the steps ``log.profile_steps = "a:b"`` names: the 0-based
step indices a..b-1 of the stage, as a Python slice (so "0:2" is the first two steps).
"""

from __future__ import annotations

import contextlib
import logging
import resource
import time
from collections import Counter
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


class Phases:
    """Wall time per phase of one training step; each phase is also the NVTX range
    ``<prefix>/<name>`` (or ``nvtx=``). Times of a phase entered several times add up.

        phase = Phases("rl")
        with phase("rollout"):
            ...
        phase.metrics()   # {"time_rollout_s": ...}

    Times are host wall clock: on CUDA a phase ends when its Python code does, not its kernels
    (the step syncs once per update, so the step's total is right; nsys shows the split).
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.seconds: Counter[str] = Counter()

    @contextlib.contextmanager
    def __call__(self, name: str, nvtx: str | None = None):
        t0 = time.perf_counter()
        try:
            with nvtx_range(nvtx or f"{self.prefix}/{name}"):
                yield
        finally:
            self.seconds[name] += time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        return {f"time_{k}_s": v for k, v in self.seconds.items()}


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated CUDA memory of ``device``, or this process's peak RSS on CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


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


class CallCounter:
    """Counts forward calls of a module (e.g. ``model.model.visual``) with a forward pre-hook.

    ``rows`` sums the batch size of the counted calls; ``min_seq`` counts only calls whose
    input sequence (dim 1 of ``inputs_embeds``) is at least that long, e.g. ``min_seq=2`` on the
    language model counts prefills and not decode steps.

        with CallCounter(model.model.visual) as vision: ...
        vision.calls
    """

    def __init__(self, module: torch.nn.Module, min_seq: int | None = None):
        self.module, self.min_seq = module, min_seq
        self.calls = self.rows = 0
        self._handle = None

    def _hook(self, module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        if x is None:
            x = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if self.min_seq is not None:
            if x is None or x.dim() < 3 or x.shape[1] < self.min_seq:
                return
        self.calls += 1
        self.rows += int(x.shape[0]) if x is not None and x.dim() >= 2 else 1

    def __enter__(self) -> "CallCounter":
        self._handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
