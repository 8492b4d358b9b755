"""Benchmark gspo_sd_loss: PyTorch reference vs the Triton kernels (forward, forward+backward).

On CUDA: reference (eager) vs backend="triton". Without a GPU the Triton path would run in the
interpreter, so only the reference and the public backend="torch" path are timed (a sanity
row, not a kernel number). Prints a table; appends rows to bench/results/gspo_sd_loss.csv.

    python bench/bench_gspo_sd_loss.py
"""

import csv
import datetime
import pathlib
import time

import torch

from visioncoach.kernels.gspo_sd_loss import gspo_sd_loss, gspo_sd_loss_reference

CSV = pathlib.Path(__file__).parent / "results" / "gspo_sd_loss.csv"
KW = dict(eps_low=3e-4, eps_high=4e-4, beta=0.04)


def inputs(N, T, dtype, device):
    logp = (-3 * torch.rand(N, T, device=device)).to(dtype)
    old = (logp.float() + 1e-3 * torch.randn(N, T, device=device)).to(dtype)
    ref = (logp.float() + 0.3 * torch.randn(N, T, device=device)).to(dtype)
    mask = torch.rand(N, T, device=device) > 0.2
    vec = lambda: torch.rand(N, device=device)  # noqa: E731
    return logp, old, ref, torch.randn(N, device=device), mask, vec(), vec()


def timer(fn, device):
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100)
    fn()
    reps, t0 = 20, time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        impls = {"reference": lambda *a: gspo_sd_loss_reference(*a, **KW),
                 "triton": lambda *a: gspo_sd_loss(*a, **KW, backend="triton")}
        shapes = [(32, 768), (64, 2048), (256, 4096)]
        name = torch.cuda.get_device_name()
    else:
        impls = {"reference": lambda *a: gspo_sd_loss_reference(*a, **KW),
                 "torch": lambda *a: gspo_sd_loss(*a, **KW, backend="torch")}
        shapes = [(32, 768)]
        name = "cpu"
    rows = []
    for N, T in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            logp, *rest = inputs(N, T, dtype, device)
            x = logp.clone().requires_grad_()
            for impl, f in impls.items():
                def fwd():
                    with torch.no_grad():
                        f(x, *rest)

                def fwd_bwd():
                    x.grad = None
                    f(x, *rest)[0].backward()

                for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                    rows.append(dict(time=datetime.datetime.now().isoformat(timespec="seconds"),
                                     device=name, N=N, T=T, dtype=str(dtype).split(".")[-1],
                                     impl=impl, mode=mode, ms=round(timer(fn, device), 4)))
    print(f"{'N':>4} {'T':>5} {'dtype':>9} {'impl':>10} {'mode':>8} {'ms':>9}")
    for r in rows:
        print(f"{r['N']:>4} {r['T']:>5} {r['dtype']:>9} {r['impl']:>10} {r['mode']:>8} "
              f"{r['ms']:>9.4f}")
    CSV.parent.mkdir(parents=True, exist_ok=True)
    new = not CSV.exists()
    with CSV.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    print(f"appended {len(rows)} rows to {CSV}")


if __name__ == "__main__":
    main()
