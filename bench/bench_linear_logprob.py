"""Benchmark: selected-token log-probs of the LM head + GSPO loss, forward and backward.

Compares, at the same shapes in the same run, what a user would otherwise use against ours:
  naive   materialised logits -> log_softmax -> gather (TRL's path), then the GSPO loss
  liger   Liger-Kernel's LigerFusedLinearGRPOLoss, importance_sampling_level="sequence" (GSPO)
  ours    visioncoach.kernels.linear_logprob (chunked; Triton row kernels on CUDA) + gspo_sd_loss
each with a frozen LM head (LoRA training) and a trainable one. Every case runs in a fresh
process so peak memory is its own: "extra peak" is the process's peak RSS (CPU) or peak CUDA
allocation minus what was held just before the timed call, the peak counted from that moment
(on CPU the kernel's RSS high-water mark is reset through /proc/self/clear_refs: without the
reset it still held building the inputs' peak, the [V, H] weight's randn and its scaled copy,
and read 0.43 GB for ours and 0.36 GB for Liger whatever the step did); time is the best of
``--repeats``.
Prints a table and appends CSV rows to bench/results/linear_logprob.csv (the schema in
bench/_common.py).

    python bench/bench_linear_logprob.py               # H=896, V=151936, 4 x 1024 tokens, fp32
    python bench/bench_linear_logprob.py --quick       # small shapes, a smoke run
    python bench/bench_linear_logprob.py --impl ours   # one implementation only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys

from _common import measure, print_table, results_from_rows, write_results

LOSS_KW = dict(eps_low=3e-4, eps_high=4e-4, beta=0.04)
IMPLS = ("naive", "liger", "ours")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    """Restart the process's RSS high-water mark (VmHWM, getrusage's ru_maxrss) at its current RSS
    (Linux >= 4.0), so that the peak read after the step is the step's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        raise RuntimeError("the CPU extra-peak measure needs Linux's /proc/self/clear_refs to "
                           f"reset the RSS high-water mark: {e}") from e


def build_step(impl: str, n: int, t: int, h: int, v: int, trainable: bool, dtype: str, device: str):
    """One case's inputs and its forward+backward ``step`` (untimed): (step, hidden, weight).
    Also the case builder of the GPU check kit (bench/gpu_check_kernels.py)."""
    import torch

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    dev = torch.device(device)
    hidden = (torch.randn(n, t, h, device=dev) * 0.5).to(dt).requires_grad_()     # [N, T, H]
    weight = (torch.randn(v, h, device=dev) * h ** -0.5).to(dt).requires_grad_(trainable)  # [V, H]
    targets = torch.randint(0, v, (n, t), device=dev)                              # [N, T]
    mask = torch.ones(n, t, dtype=torch.bool, device=dev)                          # [N, T]
    old = -torch.rand(n, t, device=dev) * 5                                        # [N, T]
    ref = old + 0.01 * torch.randn(n, t, device=dev)                               # [N, T]
    adv = torch.randn(n, device=dev)                                               # [N]
    gw = torch.full((n,), 1.0 / n, device=dev)
    sdw = torch.zeros(n, device=dev)

    if impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        # compiled=False: torch.compile on CPU would time the compiler, not the kernel.
        liger = LigerFusedLinearGRPOLoss(
            beta=LOSS_KW["beta"], compiled=device == "cuda", use_ref_model=True, chunk_size=1,
            epsilon_low=LOSS_KW["eps_low"], epsilon_high=LOSS_KW["eps_high"], loss_type="grpo",
            importance_sampling_level="sequence")

        def step():
            out = liger(hidden, weight, targets, mask, adv, ref_per_token_logps=ref,
                        old_per_token_logps=old)
            (out[0] if isinstance(out, tuple) else out).backward()
    else:
        from visioncoach.kernels.gspo_sd_loss import gspo_sd_loss, gspo_sd_loss_reference

        if impl == "naive":
            def step():
                logits = (hidden @ weight.T).float()                                # [N, T, V]
                logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
                loss, _ = gspo_sd_loss_reference(logp, old, ref, adv, mask, gw, sdw, **LOSS_KW)
                loss.backward()
        else:
            from visioncoach.kernels.linear_logprob import linear_logprob

            def step():
                logp = linear_logprob(hidden, weight, targets)                      # [N, T]
                loss, _ = gspo_sd_loss(logp, old, ref, adv, mask, gw, sdw, **LOSS_KW)
                loss.backward()

    return step, hidden, weight


def run_case(impl: str, n: int, t: int, h: int, v: int, trainable: bool, dtype: str, device: str,
             repeats: int) -> dict:
    """One case in this process; returns its measurements."""
    import torch

    step, hidden, weight = build_step(impl, n, t, h, v, trainable, dtype, device)
    dev = hidden.device

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    # One measure() per repeat: the memory baseline is taken between repeats, outside the clock.
    # No warm-up: the first call's cost (allocations, lazy setup) is part of what a step costs.
    times = []
    peak = 0
    for _ in range(repeats):
        hidden.grad = None
        weight.grad = None
        sync()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = _rss_bytes()
            _reset_peak_rss()
        times += measure(step, repeats=1, warmup=0, sync=sync).times
        if dev.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated() - before)
        else:
            peak = max(peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
    return {"impl": impl, "head": "trainable" if trainable else "frozen", "N": n, "T": t, "H": h,
            "V": v, "dtype": dtype, "device": device, "seconds": min(times),
            "extra_peak_gb": peak / 2**30, "repeats": repeats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    ap.add_argument("--impl", choices=IMPLS, action="append", help="implementations (default all)")
    ap.add_argument("--head", choices=("frozen", "trainable"), action="append")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = ap.parse_args()

    if args.case:
        print("RESULT " + json.dumps(run_case(**json.loads(args.case))))
        return

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        n, t, h, v = 2, 128, 64, 8192
    elif device == "cuda":
        n, t, h, v = 8, 1024, 3584, 151936  # Qwen2.5-VL-7B head
    else:
        n, t, h, v = 4, 1024, 896, 151936   # Qwen2.5-0.5B-sized head, the CPU shape
    rows = []
    for head in args.head or ["frozen", "trainable"]:
        for impl in args.impl or IMPLS:
            case = dict(impl=impl, n=n, t=t, h=h, v=v, trainable=head == "trainable",
                        dtype=args.dtype, device=device, repeats=args.repeats)
            res = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)],
                                 capture_output=True, text=True)
            line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
            if res.returncode != 0 or not line:
                print(f"{impl}/{head}: FAILED\n{res.stderr[-2000:]}", file=sys.stderr)
                rows.append({"impl": impl, "head": head, "seconds": float("nan"),
                             "extra_peak_gb": float("nan"), "device": device})
                continue
            rows.append(json.loads(line[0][len("RESULT "):]))
            r = rows[-1]
            print(f"  {impl:6s} {head:9s} {r['seconds']:8.2f} s  {r['extra_peak_gb']:6.2f} GB", flush=True)

    for r in rows:
        base = {b["impl"]: b["seconds"] for b in rows if b["head"] == r["head"]}
        for k in ("naive", "liger"):
            r[f"vs_{k}"] = base[k] / r["seconds"] if k in base and r["seconds"] == r["seconds"] else None
    title = (f"\nlinear log-probs + GSPO loss, forward+backward, best of {args.repeats}: "
             f"N*T={n}x{t}, H={h}, V={v}, {args.dtype}, {device} "
             f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    print_table(rows, ["impl", "head", ("seconds", "seconds", ".2f"),
                       ("extra_peak_gb", "extra peak GB", ".2f"), ("vs_naive", "vs naive", "{:.2f}x"),
                       ("vs_liger", "vs liger", "{:.2f}x")], title=title)
    write_results("linear_logprob", results_from_rows(
        rows, ["head"], {"seconds": ("time_min", "s"), "extra_peak_gb": ("extra_peak", "GB")},
        N=n, T=t, H=h, V=v, dtype=args.dtype, repeats=args.repeats))


if __name__ == "__main__":
    main()
