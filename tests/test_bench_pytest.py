"""`pytest bench/ --benchmark-only` (the kernel and pipeline microbenchmarks, bench/conftest.py)
keeps running: every case once at small shapes, and the summary/CSV read from pytest-benchmark's
own statistics."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("pytest_benchmark")


def _pytest(*args, tmp_path):
    env = dict(os.environ, PYTHONSAFEPATH="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "pytest", "bench/", "-q", "-p", "no:cacheprovider",
                           "--bench-quick", f"--basetemp={tmp_path / 'bt'}", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)


@pytest.mark.slow
def test_every_bench_case_runs_once(tmp_path):
    out = _pytest("--benchmark-disable", tmp_path=tmp_path)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert " passed" in out.stdout and "failed" not in out.stdout


def test_summary_and_csv_come_from_pytest_benchmark(tmp_path):
    results = tmp_path / "results"
    json_out = tmp_path / "bench.json"
    out = _pytest("--benchmark-only", "-k", "test_gspo_sd_loss and float32 and fwd-",
                  "--benchmark-max-time=0.05", f"--bench-results={results}",
                  f"--benchmark-json={json_out}", tmp_path=tmp_path)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "pytest-benchmark summary" in out.stdout
    import json

    saved = {b["extra_info"]["impl"]: b["stats"] for b in json.loads(json_out.read_text())["benchmarks"]}
    assert set(saved) == {"reference", "ours"}
    with (results / "pytest-gspo_sd_loss.csv").open() as f:
        rows = list(csv.DictReader(f))
    medians = {r["impl"]: float(r["value"]) for r in rows if r["metric"] == "time_median"}
    # The CSV holds pytest-benchmark's own medians (ms, 6 significant digits), not a re-timing.
    for impl, stats in saved.items():
        assert medians[impl] == pytest.approx(stats["median"] * 1e3, rel=1e-5)
    speedup = [float(r["value"]) for r in rows if r["metric"] == "speedup_vs_reference" and r["impl"] == "ours"]
    assert speedup == [pytest.approx(saved["reference"]["median"] / saved["ours"]["median"], rel=1e-4)]
