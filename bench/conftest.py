"""pytest-benchmark for the kernel and pipeline microbenchmarks: ``pytest bench/ --benchmark-only``.

Each ``bench/test_*.py`` times one implementation per test with pytest-benchmark's ``benchmark``
fixture; the tests of one case share a ``benchmark.group``, so pytest-benchmark prints each
case's implementations side by side, the baseline a user would otherwise use among them. The
case builders are the bench scripts' own (``bench_*.py``): the scripts and these tests time the
same work.

After pytest-benchmark's tables, this file prints one summary (median, min, rounds, speed-up of
each implementation over its group's baseline) and appends the same numbers to
``bench/results/pytest-<benchmark>.csv`` (schema in bench/_common.py): both are read from the
measurements pytest-benchmark made, there is no second timer.

    pytest bench/ --benchmark-only                          # every microbenchmark
    pytest bench/ --benchmark-only -k rewards               # one family
    pytest bench/ --benchmark-only --benchmark-save=base    # keep a run in .benchmarks/
    pytest bench/ --benchmark-only --benchmark-compare=0001 --benchmark-compare-fail=median:10%
                                                            # compare with a saved run; fail
                                                            # on a >10% median regression
    pytest bench/ --benchmark-disable --bench-quick         # smoke: each case once, small shapes

A test marks what it measures with ``_common.bench_case(benchmark, bench=..., case={...},
impl=..., baseline=...)``; ``baseline`` names the implementation the speed-up is taken against.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The bench scripts import their helpers as ``_common`` (their folder on sys.path when run as
# scripts); under pytest's importlib mode nothing puts it there.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Result, print_table, write_results


def pytest_addoption(parser):
    group = parser.getgroup("visioncoach bench")
    group.addoption("--bench-quick", action="store_true",
                    help="small shapes and few rounds: a smoke run of every case")
    group.addoption("--bench-no-csv", action="store_true",
                    help="do not append the summary to bench/results/pytest-*.csv")
    group.addoption("--bench-results", default=None, metavar="DIR",
                    help="folder of the summary CSVs (default: bench/results)")


@pytest.fixture(scope="session")
def quick(request) -> bool:
    return request.config.getoption("--bench-quick")


@pytest.fixture(scope="session")
def rounds(quick):
    """Rounds for a slow case (seconds per call): pedantic mode, fixed count, one warm-up."""
    return lambda full: 1 if quick else full


def _summary_rows(benchmarks) -> list[dict]:
    rows = []
    for b in benchmarks:
        info = b.extra_info
        if "bench" not in info or not b.stats:   # not one of ours, or --benchmark-disable
            continue
        s = b.stats
        rows.append({"bench": info["bench"], "case": info["case"], "impl": info["impl"],
                         "baseline": info["baseline"], "median": s.median, "min": s.min, "mean": s.mean,
                         "rounds": s.rounds})
    by_group = {(r["bench"], r["case"], r["impl"]): r for r in rows}
    for r in rows:
        base = by_group.get((r["bench"], r["case"], r["baseline"]))
        r["speedup"] = base["median"] / r["median"] if base and r["median"] > 0 else None
    return rows


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None:
        return
    rows = _summary_rows(session.benchmarks)
    if not rows:
        return
    terminalreporter.write_line("")
    print_table(rows, ["bench", "case", "impl", (lambda r: r["median"] * 1e3, "median ms", ".3f"),
                       (lambda r: r["min"] * 1e3, "min ms", ".3f"), "rounds",
                       ("speedup", "vs baseline", "{:.2f}x"), "baseline"],
                title="pytest-benchmark summary (speed-up = baseline median / median)")
    if config.getoption("--bench-no-csv"):
        return
    for bench in dict.fromkeys(r["bench"] for r in rows):
        results = []
        for r in (r for r in rows if r["bench"] == bench):
            results += [Result(r["case"], r["impl"], m, r[k] * 1e3, "ms")
                        for k, m in (("median", "time_median"), ("min", "time_min"), ("mean", "time_mean"))]
            results.append(Result(r["case"], r["impl"], "rounds", r["rounds"], "count"))
            if r["speedup"] is not None:
                results.append(Result(r["case"], r["impl"], f"speedup_vs_{r['baseline']}", r["speedup"], "x"))
        directory = config.getoption("--bench-results")
        write_results(f"pytest-{bench}", results, **({"directory": Path(directory)} if directory else {}))
