"""bench/_common.py: the table printer, the long-format CSV schema, the timer's statistics."""

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "_common.py"
_spec = importlib.util.spec_from_file_location("bench_common", _PATH)
common = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = common  # dataclasses look their module up while building the class
_spec.loader.exec_module(common)


def fake_clock(ticks):
    """A clock that returns the given readings in order."""
    it = iter(ticks)
    return lambda: next(it)


# ------------------------------------------------------------------------------------ table

def test_table_right_aligned_widths_from_content_and_formats():
    rows = [dict(impl="ref", n=5, ms=12.3456, speedup=None),
            dict(impl="native", n=512, ms=0.5, speedup=24.69)]
    text = common.format_table(rows, ["impl", ("n", "rollouts"), ("ms", "ms", ".2f"),
                                      common.Column("speedup", "speed-up", "{:.1f}x"),
                                      (lambda r: r["n"] * 2, "twice", "d")], title="T")
    assert text.splitlines() == [
        "T",
        "  impl  rollouts     ms  speed-up  twice",
        "   ref         5  12.35         -     10",
        "native       512   0.50     24.7x   1024",
    ]


def test_print_table_prints_the_formatted_table(capsys):
    common.print_table([dict(a=1.0)], [("a", "a", ".3f")])
    assert capsys.readouterr().out == "    a\n1.000\n"


# -------------------------------------------------------------------------------------- CSV

def read(path):
    with path.open(newline="") as f:
        return list(csv.reader(f))


def test_case_str_and_results_from_rows():
    assert common.case_str(dict(N=32, dtype="bf16")) == "N=32;dtype=bf16"
    rows = [dict(impl="hf", G=4, s=1.5, speedup=1.0), dict(impl="ours", G=4, s=0.5, speedup=None)]
    res = common.results_from_rows(rows, ["G"], {"s": ("time_median", "s"),
                                                 "speedup": ("speedup_vs_hf", "x")}, new_tokens=8)
    assert res == [common.Result("G=4;new_tokens=8", "hf", "time_median", 1.5, "s"),
                   common.Result("G=4;new_tokens=8", "hf", "speedup_vs_hf", 1.0, "x"),
                   common.Result("G=4;new_tokens=8", "ours", "time_median", 0.5, "s")]


def test_csv_header_once_then_rows_appended(tmp_path, capsys):
    r1 = [common.Result("N=1", "ref", "time_min", 0.25, "ms"), common.Result("N=1", "ours", "n", 3, "count")]
    path = common.write_results("demo", r1, device="cpu", directory=tmp_path / "results")
    assert path == tmp_path / "results" / "demo.csv"
    common.write_results("demo", [common.Result("N=2", "ref", "time_min", 1 / 3, "ms")], device="cpu",
                         directory=tmp_path / "results")
    table = read(path)
    assert table[0] == list(common.FIELDS)
    assert sum(row == list(common.FIELDS) for row in table) == 1
    assert [row[5:] for row in table[1:]] == [["N=1", "ref", "time_min", "0.25", "ms"],
                                             ["N=1", "ours", "n", "3", "count"],
                                             ["N=2", "ref", "time_min", "0.333333", "ms"]]
    for row in table[1:]:
        assert len(row) == len(common.FIELDS)
        assert row[3:5] == ["cpu", "demo"]
        assert row[0].endswith("+00:00")                           # UTC ISO timestamp
    assert "appended 2 rows" in capsys.readouterr().out


def test_old_schema_file_is_moved_aside(tmp_path, capsys):
    old = "utc,impl,G,seconds\n2024-01-01T00:00:00+00:00,hf,4,1.0\n"
    (tmp_path / "rollout.csv").write_text(old)
    (tmp_path / "rollout.old-schema.csv").write_text("taken\n")    # an earlier move
    common.write_results("rollout", [common.Result("G=4", "hf", "time_median", 1.0, "s")],
                         device="cpu", directory=tmp_path)
    assert (tmp_path / "rollout.old-schema.csv").read_text() == "taken\n"
    assert (tmp_path / "rollout.old-schema-2.csv").read_text() == old
    table = read(tmp_path / "rollout.csv")
    assert table[0] == list(common.FIELDS) and len(table) == 2
    assert "rollout.old-schema-2.csv" in capsys.readouterr().err


def test_git_commit_outside_a_checkout_is_empty(tmp_path):
    assert common.git_commit(tmp_path) == ""


# ------------------------------------------------------------------------------------ timer

def test_measure_statistics_with_a_fake_clock():
    calls = []
    # readings in pairs (start, stop): repeats take 6, 1, 2 seconds
    t = common.measure(lambda: calls.append(1) or len(calls), repeats=3, warmup=2,
                       clock=fake_clock([0, 6, 10, 11, 20, 22]))
    assert t.times == (6, 1, 2)
    assert (t.min, t.median, t.mean) == (1, 2, 3)
    assert len(calls) == 5 and t.value == 5                        # 2 warm-up + 3 timed calls


def test_measure_each_interleaves_and_syncs_around_every_timed_call():
    log = []
    fns = {"a": lambda: log.append("a"), "b": lambda: log.append("b")}
    out = common.measure_each(fns, repeats=2, warmup=1, sync=lambda: log.append("|"),
                              clock=fake_clock(range(100)))
    assert log == ["a", "|", "b", "|"] + ["|", "a", "|", "|", "b", "|"] * 2
    assert out["a"].times == out["b"].times == (1, 1)


def test_do_bench_keeps_every_repeat_in_seconds(monkeypatch):
    import types

    seen = {}

    def fake_do_bench(fn, warmup, rep, return_mode):
        seen.update(warmup=warmup, rep=rep, return_mode=return_mode)
        return [1.0, 3.0, 2.0]                                     # ms, as triton returns them

    triton = types.ModuleType("triton")
    triton.testing = types.SimpleNamespace(do_bench=fake_do_bench)
    monkeypatch.setitem(sys.modules, "triton", triton)
    monkeypatch.setitem(sys.modules, "triton.testing", triton.testing)
    t = common.do_bench(lambda: None)
    assert seen == dict(warmup=25, rep=100, return_mode="all")
    assert t.times == pytest.approx((1e-3, 3e-3, 2e-3)) and t.mean == pytest.approx(2e-3)


def test_measure_gc_off_only_during_the_timed_call():
    import gc

    seen = []
    common.measure(lambda: seen.append(gc.isenabled()), repeats=2, warmup=1, gc_off=True)
    assert seen == [True, False, False] and gc.isenabled()
    with pytest.raises(ValueError):
        common.measure(lambda: None, repeats=0)
