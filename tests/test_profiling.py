"""Per-phase step timings, the profiler window and peak memory (``visioncoach.utils.profiling``)."""

import json

import pytest
import torch

from visioncoach.utils import profiling
from visioncoach.utils.profiling import Phases, StepProfiler, parse_steps, peak_memory_gb


def test_phases_add_up_repeated_phases_and_name_metrics(monkeypatch):
    clock = iter([0.0, 1.5, 10.0, 10.25, 20.0, 24.0])
    monkeypatch.setattr(profiling.time, "perf_counter", lambda: next(clock))
    phase = Phases("rl")
    with phase("rollout"):
        pass
    with phase("reward"):
        pass
    with phase("rollout", nvtx="rl/vp_rollout"):
        pass
    assert phase.metrics() == {"time_rollout_s": 5.5, "time_reward_s": 0.25}


def test_a_phase_that_raises_is_still_timed(monkeypatch):
    clock = iter([0.0, 2.0])
    monkeypatch.setattr(profiling.time, "perf_counter", lambda: next(clock))
    phase = Phases("sft")
    with pytest.raises(RuntimeError):
        with phase("forward"):
            raise RuntimeError("boom")
    assert phase.seconds["forward"] == 2.0


def test_profile_window_parsing_and_trace(tmp_path):
    assert parse_steps("") is None and parse_steps("1:3") == (1, 3)
    for bad in ("3:1", "a:b", "1"):
        with pytest.raises(ValueError, match="log.profile_steps"):
            parse_steps(bad)
    prof = StepProfiler("1:2", tmp_path, "sft")
    for step in range(3):
        prof.before(step)
        torch.ones(8) @ torch.ones(8)
        path = prof.after(step)
        assert (path is not None) == (step == 1)
    assert json.loads((tmp_path / "trace-sft-1-2.json").read_text())["traceEvents"]


def test_peak_memory_is_reported_on_cpu():
    assert peak_memory_gb(torch.device("cpu")) > 0
