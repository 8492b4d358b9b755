"""bench/bench_rl_step.py: the RL-step comparison against TRL runs end to end at tiny settings,
both sides generate the same tokens from the same prompt, and the table and CSV come out;
without TRL it says so and times ours alone."""

import argparse
import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPT = BENCH / "bench_rl_step.py"
sys.path.insert(0, str(BENCH))   # the script imports bench/_common.py as a bench script does
_spec = importlib.util.spec_from_file_location("bench_rl_step", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

# One case, no warm-up, a few tokens: the path, not the timing.
TINY = ["--quick", "--groups", "2", "--no-extra", "--warmup", "0", "--max-new-tokens", "3"]


def read_csv(directory: Path) -> list[dict]:
    with (directory / "rl_step.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def metric(rows: list[dict], impl: str, name: str, case_has: str = "") -> float:
    values = [float(r["value"]) for r in rows if r["impl"] == impl and r["metric"] == name
              and case_has in r["case"]]
    assert len(values) == 1, (impl, name, case_has, values)
    return values[0]


def run_script(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}   # as `make bench` runs it
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, timeout=600, check=False)   # the caller shows the output on failure


# ----------------------------------------------------------------------------- pure parts

def test_cases_main_rows_then_extra_rows_at_the_largest_group():
    args = argparse.Namespace(max_new_tokens=16, threads=2, groups=[4, 8], repeats=3, extra_repeats=1,
                              warmup=1, no_extra=False)
    cases = bench.cases_of(args)
    assert [(c["G"], c["beta"], c["mu"], c["repeats"], c["steps"]) for c in cases] == [
        (4, 0.0, 1, 3, 4), (8, 0.0, 1, 3, 4), (8, bench.BETA_EXTRA, 1, 1, 2), (8, 0.0, 2, 1, 2)]
    args.no_extra = True
    assert len(bench.cases_of(args)) == 2


def test_summary_takes_medians_and_leaves_the_rest_to_other():
    def step(wall, gen, tokens):
        s = {"wall": wall, "cpu": 2 * wall, "tokens": tokens, "vision_calls": 1, "images": 6,
             "peak_rss_gb": wall / 10, "prompt_ids": [1, 2, 3]}
        for k in bench.PHASES:
            s[f"{k}_wall"], s[f"{k}_cpu"] = 0.0, 0.0
        s["gen_wall"] = gen
        return s

    steps = [step(3.0, 2.0, 8), step(1.0, 0.5, 8), step(2.0, 1.5, 8)]
    row = bench.summarize("ours", {"G": 2, "beta": 0.0, "mu": 1}, steps, {"frames": 6})
    assert row["step_s"] == 2.0 and row["cpu_s"] == 4.0 and row["gen_s"] == 1.5
    assert row["other_s"] == 0.5                   # median of wall - phases: 1.0, 0.5, 0.5
    assert row["peak_rss_gb"] == 0.3 and row["prompt_tokens"] == 3 and row["repeats"] == 3


@pytest.mark.parametrize("bad, named", [(["--repeats", "0"], "--repeats"),
                                        (["--groups", "1"], "--groups"),
                                        (["--max-new-tokens", "0"], "--max-new-tokens")])
def test_bad_arguments_are_named(bad, named, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(bad)
    assert exc.value.code == 2 and named in capsys.readouterr().err


# ----------------------------------------------------------------------------- runs

def test_without_trl_ours_runs_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "trl", None)   # `import trl` raises ImportError
    assert bench.main([*TINY, "--csv-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert bench.TRL_MISSING in out
    rows = read_csv(tmp_path)
    assert {r["impl"] for r in rows} == {"ours"}
    assert metric(rows, "ours", "tokens_generated") == 2 * 3
    assert metric(rows, "ours", "vision_calls") == 1     # one vision pass serves every rollout


def test_quick_run_against_trl(tmp_path):
    pytest.importorskip("trl")
    proc = run_script([*TINY, "--csv-dir", str(tmp_path)])
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "identical token ids: yes" in proc.stdout
    table = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] in (["ours"], ["trl"])]
    assert [t[0] for t in table] == ["ours", "trl"]
    rows = read_csv(tmp_path)
    assert {r["impl"] for r in rows} == {"ours", "trl"}
    # Both sides generated G x N tokens: no EOS stop on either.
    assert metric(rows, "ours", "tokens_generated") == metric(rows, "trl", "tokens_generated") == 2 * 3
    assert metric(rows, "ours", "vision_calls") == 1
    # TRL encodes the G copies of the frames on each of its vision passes (generation, log-probs).
    ours_images = metric(rows, "ours", "vision_images")
    assert metric(rows, "trl", "vision_images") == metric(rows, "trl", "vision_calls") * 2 * ours_images
    for impl in ("ours", "trl"):
        assert metric(rows, impl, "time_median") > 0 and metric(rows, impl, "peak_rss") > 0


@pytest.mark.slow
def test_extra_rows_reference_model_and_two_updates(tmp_path):
    pytest.importorskip("trl")
    proc = run_script(["--quick", "--groups", "2", "--warmup", "0", "--max-new-tokens", "2",
                       "--csv-dir", str(tmp_path)])
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = read_csv(tmp_path)
    # TRL's vision passes: generation, then the reference (beta > 0) or the old policy (mu = 2),
    # then the policy once per update. Ours reuses its one pass for all of them.
    for case, trl_calls in ((f"beta={bench.BETA_EXTRA};mu=1", 3), ("beta=0.0;mu=2", 4)):
        assert metric(rows, "ours", "tokens_generated", case) == metric(rows, "trl", "tokens_generated", case) == 4
        assert metric(rows, "ours", "vision_calls", case) == 1
        assert metric(rows, "trl", "vision_calls", case) == trl_calls
