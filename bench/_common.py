"""What every bench script shares: one timer, one table printer, one CSV schema.

Timer: ``measure(fn, repeats=...)`` times ``fn`` (after ``warmup`` untimed calls) and returns a
``Timing`` of per-repeat seconds (``.min``, ``.median``, ``.mean``) and what ``fn`` returned
last; each script reports the statistic it always has. ``measure_each({name: fn})`` does the
same for several callables interleaved round by round, so a burst of load from other jobs on a
shared machine hits them alike. ``sync`` (e.g. ``torch.cuda.synchronize``) runs before the
clock starts and before it stops. On CUDA, ``do_bench`` wraps ``triton.testing.do_bench``
(L2 flush, time-budgeted repeats) into a Timing.

Table: ``print_table(rows, columns, title)``, right-aligned, each column as wide as its widest
cell. A column is ``Column(key, header, fmt)``, a plain ``(key, header, fmt)`` tuple or just a
key; ``key`` is a row key or a function of the row; ``fmt`` is a format spec (``".2f"``) or a
format string (``"{:.2f}x"``); a missing or None value prints as ``-``.

CSV: one long-format schema for every benchmark, one row per measured number,
appended to ``bench/results/<benchmark>.csv``::

    timestamp, commit, host, device, benchmark, case, impl, metric, value, unit

``case`` is ``k=v;k=v`` (``case_str``) of the shape and parameters, ``metric`` names the
statistic where it is a time (``time_min``, ``time_median``, ``time_mean``). The header is
written when the file is new. A file that already exists with another header (the per-script
schemas these scripts wrote before) is renamed aside to ``<benchmark>.old-schema.csv``
(``.old-schema-2.csv``, ... if that is taken) with a note on stderr, and a new file is started:
mixing schemas in one file would make it unreadable for csv readers.

pytest-benchmark: ``bench_case(benchmark, ...)`` labels a ``bench/test_*.py`` measurement
(group, implementation, baseline); bench/conftest.py turns pytest-benchmark's own statistics
into the summary table and CSV rows.
"""

from __future__ import annotations

import csv
import datetime
import gc
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ("timestamp", "commit", "host", "device", "benchmark", "case", "impl", "metric", "value",
          "unit")


# ---------------------------------------------------------------------------------- timer

@dataclass(frozen=True)
class Timing:
    times: tuple[float, ...]                      # seconds, one per timed repeat
    value: Any = field(default=None, repr=False)  # what fn returned on the last repeat

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.times)


def measure_each(fns: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int = 1,
                 sync: Callable[[], None] | None = None, gc_off: bool = False,
                 clock: Callable[[], float] = time.perf_counter) -> dict[str, Timing]:
    """Time each callable ``repeats`` times, interleaved (a, b, a, b, ...), after ``warmup``
    untimed rounds. ``gc_off``: collect, then keep the collector off during each timed call
    (as timeit does): every round allocates alike, so a collection would otherwise land in
    the same callable each round and a best-of would keep it."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    last: dict[str, Any] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            if gc_off:
                gc.collect()
                gc.disable()
            try:
                sync()
                t0 = clock()
                # Replacing last[name] frees this fn's previous result inside the clock, as
                # discarding the result would: each repeat pays for one result's lifetime.
                last[name] = fn()
                sync()
                times[name].append(clock() - t0)
            finally:
                if gc_off:
                    gc.enable()
    return {name: Timing(tuple(times[name]), last[name]) for name in fns}


def measure(fn: Callable[[], Any], *, repeats: int, warmup: int = 1,
            sync: Callable[[], None] | None = None, gc_off: bool = False,
            clock: Callable[[], float] = time.perf_counter) -> Timing:
    """``measure_each`` for one callable."""
    return measure_each({"": fn}, repeats=repeats, warmup=warmup, sync=sync, gc_off=gc_off,
                        clock=clock)[""]


def do_bench(fn: Callable[[], Any], *, warmup_ms: float = 25, rep_ms: float = 100) -> Timing:
    """CUDA: ``triton.testing.do_bench`` (flushes L2 between calls, repeats by time budget),
    every repeat's time kept."""
    import triton.testing

    ms = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
    return Timing(tuple(t / 1e3 for t in ms))


# ---------------------------------------------------------------------------------- table

@dataclass(frozen=True)
class Column:
    key: str | Callable[[dict], Any]
    header: str | None = None                     # default: key
    fmt: str = ""

    def cell(self, row: dict) -> str:
        v = self.key(row) if callable(self.key) else row.get(self.key)
        if v is None or v == "":
            return "-"
        return self.fmt.format(v) if "{" in self.fmt else format(v, self.fmt)


def format_table(rows: Iterable[dict], columns: Iterable[Column | tuple | str],
                 title: str | None = None) -> str:
    cols = [c if isinstance(c, Column) else Column(c) if isinstance(c, str) else Column(*c)
            for c in columns]
    heads = [c.header or str(c.key) for c in cols]
    cells = [[c.cell(r) for c in cols] for r in rows]
    widths = [max(map(len, col)) for col in zip(heads, *cells)]
    lines = [title] if title else []
    lines += ["  ".join(s.rjust(w) for s, w in zip(line, widths)) for line in [heads, *cells]]
    return "\n".join(lines)


def print_table(rows: Iterable[dict], columns: Iterable[Column | tuple | str],
                title: str | None = None) -> None:
    print(format_table(rows, columns, title), flush=True)


# ---------------------------------------------------------------------------------- CSV

@dataclass(frozen=True)
class Result:
    case: str
    impl: str
    metric: str
    value: float
    unit: str


def case_str(params: Mapping[str, Any]) -> str:
    return ";".join(f"{k}={v}" for k, v in params.items())


def results_from_rows(rows: Iterable[dict], case: Iterable[str], metrics: Mapping[str, tuple[str, str]],
                      **fixed: Any) -> list[Result]:
    """Long-format results from wide table rows: ``case`` names the row keys that describe the
    case (then ``fixed``, the same for every row), ``metrics`` maps a row key to its
    (metric, unit). Rows without a value for a metric (missing, None, "") give no result."""
    case = list(case)
    out = []
    for r in rows:
        c = case_str({**{k: r[k] for k in case}, **fixed})
        out += [Result(c, r["impl"], metric, r[key], unit) for key, (metric, unit) in metrics.items()
                if r.get(key) not in (None, "")]
    return out


def bench_case(benchmark, *, bench: str, case: dict, impl: str, baseline: str) -> None:
    """Name what this test measures: ``bench`` (the CSV file), the case's parameters (the
    group), the implementation and the group's baseline implementation."""
    benchmark.group = f"{bench}: {case_str(case)}"
    benchmark.extra_info.update(bench=bench, case=case_str(case), impl=impl, baseline=baseline)


def device_name(device: Any = None) -> str:
    """"cpu", or the CUDA device's name (default: CUDA if there is one)."""
    import torch

    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def git_commit(cwd: Path = RESULTS.parent) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _set_aside(path: Path) -> Path:
    """Move an old-schema file out of the way; returns where it went."""
    aside, k = path.with_name(f"{path.stem}.old-schema.csv"), 1
    while aside.exists():
        k += 1
        aside = path.with_name(f"{path.stem}.old-schema-{k}.csv")
    path.rename(aside)
    print(f"note: {path} had another CSV header (an older schema); moved it to {aside.name}",
          file=sys.stderr)
    return aside


def _cell(v: Any) -> str:
    return format(v, ".6g") if isinstance(v, float) else str(v)


def write_results(benchmark: str, results: Iterable[Result], *, device: str | None = None,
                  directory: Path = RESULTS) -> Path:
    """Append ``results`` to ``<directory>/<benchmark>.csv`` (see the module docstring)."""
    path = directory / f"{benchmark}.csv"
    directory.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != FIELDS:
            _set_aside(path)
    new = not path.exists() or not path.stat().st_size
    run = dict(timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               commit=git_commit(), host=platform.node(), device=device or device_name(),
               benchmark=benchmark)
    n = 0
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(FIELDS)
        for r in results:
            w.writerow([run[k] for k in FIELDS[:5]] + [r.case, r.impl, r.metric, _cell(r.value), r.unit])
            n += 1
    print(f"appended {n} rows to {path}")
    return path
