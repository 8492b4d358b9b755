"""Compile-time report of the Triton kernels for A100 (sm_80) and H100 (sm_90a), made without a GPU.

Every kernel is compiled afresh, in a subprocess, at each specialisation its launchers really
produce at the trainer's shapes (``visioncoach.kernels.aot``; the shapes are
``kernels/aot_cases.py``'s). Table 1, per kernel x target x input dtype x variant (the
constexprs that tell a kernel's launches apart; specialisations that differ only in which
pointers are 16-byte aligned or which integers are multiples of 16 are folded into one row,
counted in ``specs``): registers per
thread, spill stores/loads and stack frame (ptxas), static + dynamic shared memory per block,
threads per block (num_warps x 32), and the theoretical occupancy those imply on the target's
GPU (``aot.occupancy``: registers allocated per warp in units of 256 within 4 sub-partitions of
16,384; shared memory per block plus the 1 KB system reserve, in units of 128 B, against 164 KB
(A100) / 228 KB (H100) per SM; 2048 threads and 32 blocks per SM). Where folded rows differ,
the worst (largest) value is shown. Table 2: the global memory accesses and the instructions
worth checking in each kernel's sm_90a PTX (static counts per thread's code, not executions).
Compile-time facts and theoretical figures: nothing here ran on a GPU.

Prints both tables; appends one CSV row per specialisation and metric to
bench/results/gpu_kernels_report.csv (the schema in bench/_common.py).

    python bench/gpu_kernels_report.py
"""

import triton

from _common import Result, case_str, print_table, write_results

from visioncoach.kernels import aot

DEVICE = "compile-time, no GPU"


def variant(r: dict, varying: set[str]) -> str:
    """The constexprs that differ between a kernel's records, and its block sizes."""
    keep = {k: v for k, v in r["constexprs"].items() if k in varying or k.startswith("BLOCK")}
    return " ".join(f"{k}={v}" for k, v in keep.items()) or "-"


def smem(r: dict) -> int:
    return r["shared_static"] + r["shared_dynamic"]


def occupancy(r: dict) -> dict:
    return aot.occupancy(r["registers"], smem(r), r["threads"], aot.GPUS[r["arch"]])


def span(values) -> str:
    values = list(values)
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def accesses(forms: dict) -> str:
    """{"v4.b32": 8, "b32": 1} -> "8 v4.b32, 1 b32" (widest first)."""
    width = lambda f: (int(f[1:2]) if f.startswith("v") else 1) * int(f.rsplit(".b", 1)[-1].lstrip("fsub"))  # noqa: E731
    return ", ".join(f"{n} {f}" for f, n in sorted(forms.items(), key=lambda x: -width(x[0]))) or "-"


def groups(records: list[dict]) -> dict[tuple, list[dict]]:
    varying: dict[str, set[str]] = {}
    for k in {r["kernel"] for r in records}:
        mine = [r["constexprs"] for r in records if r["kernel"] == k]
        varying[k] = {c for c in mine[0] if len({m.get(c) for m in mine}) > 1}
    out: dict[tuple, list[dict]] = {}
    for r in records:
        out.setdefault((r["kernel"], r["target"], "/".join(r["dtypes"]), variant(r, varying[r["kernel"]])),
                       []).append(r)
    return out


def main():
    res = aot.compile_in_subprocess()
    for e in res["errors"]:
        print(f"error [{e['stage']}] {e.get('kernel', '')} (case: {e['case']}):\n{e['error']}")
    records = res["records"]
    rows, ptx_rows = [], []
    for (kernel, target, dtype, var), rs in groups(records).items():
        occ = min((occupancy(r) for r in rs), key=lambda o: o["occupancy"])
        gpu = aot.GPUS[rs[0]["arch"]]
        rows.append(dict(kernel=kernel, target=f"{target} ({gpu.name})", dtype=dtype, variant=var,
                         specs=len(rs), threads=span(r["threads"] for r in rs),
                         regs=span(r["registers"] for r in rs),
                         spill=f"{max(r['spill_stores'] for r in rs)}/{max(r['spill_loads'] for r in rs)}",
                         stack=max(r["stack"] for r in rs), smem=span(smem(r) for r in rs),
                         blocks=occ["blocks"], warps=occ["warps"], occ=100 * occ["occupancy"],
                         limiter=occ["limiter"]))
        if rs[0]["arch"] == 90:
            stats = [r["ptx_stats"] for r in rs]
            distinct = lambda key: " | ".join(dict.fromkeys(accesses(s[key]) for s in stats))  # noqa: E731
            ptx_rows.append(dict(kernel=kernel, dtype=dtype, variant=var, ld=distinct("ld.global"),
                                 st=distinct("st.global"), ex2=span(s["ex2.approx"] for s in stats),
                                 expf=span(s["expf"] for s in stats), logf=span(s["logf"] for s in stats),
                                 nan=span(s["min/max.NaN"] for s in stats),
                                 cvt=span(s["cvt.rn.bf16.f32"] for s in stats),
                                 rnd=span(s["and.b32 -65536"] for s in stats)))
    print_table(rows, ["kernel", "target", "dtype", "variant", "specs", ("threads", "threads/block"),
                       ("regs", "regs/thread"), ("spill", "spill st/ld B"), ("stack", "stack B"),
                       ("smem", "smem B/block"), ("blocks", "blocks/SM"), ("warps", "warps/SM"),
                       ("occ", "occupancy", "{:.0f}%"), "limiter"],
                title=f"Triton {triton.__version__} kernels at their launchers' specialisations: "
                      f"compile-time, no GPU; occupancy is theoretical")
    print()
    print_table(ptx_rows, ["kernel", "dtype", "variant", ("ld", "global loads"), ("st", "global stores"),
                           ("ex2", "ex2.approx"), ("expf", "libdevice expf"), ("logf", "libdevice logf"),
                           ("nan", "min/max.NaN"), ("cvt", "cvt.rn.bf16.f32"),
                           ("rnd", "and -65536 (hand bf16 rounding)")],
                title="sm_90a PTX: static instruction counts (what each thread's code holds, not executions)")
    results = []
    for r in records:
        occ = occupancy(r)
        case = case_str(dict(kernel=r["kernel"], target=r["target"], dtype="/".join(r["dtypes"]),
                             spec=r["spec"].replace("=", ":").replace("; ", " / ")))
        metrics = dict(registers=(r["registers"], "regs/thread"), spill_stores=(r["spill_stores"], "B"),
                       spill_loads=(r["spill_loads"], "B"), stack=(r["stack"], "B"),
                       shared_memory=(smem(r), "B/block"), threads_per_block=(r["threads"], "threads"),
                       blocks_per_sm=(occ["blocks"], f"theoretical, {aot.GPUS[r['arch']].name}"),
                       occupancy=(occ["occupancy"], f"theoretical, {aot.GPUS[r['arch']].name}"))
        results += [Result(case, f"triton {triton.__version__}", m, v, u) for m, (v, u) in metrics.items()]
    write_results("gpu_kernels_report", results, device=DEVICE)
    if res["errors"]:
        raise SystemExit(f"{len(res['errors'])} capture/compile failures (above)")


if __name__ == "__main__":
    main()
