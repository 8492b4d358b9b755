"""Benchmark gspo_sd_loss: PyTorch reference vs the Triton kernels (forward, forward+backward).

On CUDA: reference (eager) vs backend="triton". Without a GPU the Triton path would run in the
interpreter, so only the reference and the public backend="torch" path are timed (a sanity
row, not a kernel number). Each number is a mean: of triton.testing.do_bench's repeats on CUDA,
of 20 calls after one warm-up on CPU. Prints a table; appends rows to
bench/results/gspo_sd_loss.csv (the schema in bench/_common.py).

    python bench/bench_gspo_sd_loss.py
"""

import torch

from _common import device_name, do_bench, measure, print_table, results_from_rows, write_results

from visioncoach.kernels.gspo_sd_loss import gspo_sd_loss, gspo_sd_loss_reference

KW = dict(eps_low=3e-4, eps_high=4e-4, beta=0.04)


def inputs(N, T, dtype, device):
    logp = (-3 * torch.rand(N, T, device=device)).to(dtype)
    old = (logp.float() + 1e-3 * torch.randn(N, T, device=device)).to(dtype)
    ref = (logp.float() + 0.3 * torch.randn(N, T, device=device)).to(dtype)
    mask = torch.rand(N, T, device=device) > 0.2
    vec = lambda: torch.rand(N, device=device)  # noqa: E731
    return logp, old, ref, torch.randn(N, device=device), mask, vec(), vec()


def mean_ms(fn, device):
    timing = do_bench(fn) if device == "cuda" else measure(fn, repeats=20, warmup=1)
    return timing.mean * 1e3


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        impls = {"reference": lambda *a: gspo_sd_loss_reference(*a, **KW),
                 "triton": lambda *a: gspo_sd_loss(*a, **KW, backend="triton")}
        shapes = [(32, 768), (64, 2048), (256, 4096)]
    else:
        impls = {"reference": lambda *a: gspo_sd_loss_reference(*a, **KW),
                 "torch": lambda *a: gspo_sd_loss(*a, **KW, backend="torch")}
        shapes = [(32, 768)]
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
                    rows.append(dict(N=N, T=T, dtype=str(dtype).split(".")[-1], impl=impl,
                                     mode=mode, ms=mean_ms(fn, device)))
    print_table(rows, ["N", "T", "dtype", "impl", "mode", ("ms", "mean ms", ".4f")], title=device_name())
    write_results("gspo_sd_loss", results_from_rows(rows, ["N", "T", "dtype", "mode"],
                                                    {"ms": ("time_mean", "ms")}))


if __name__ == "__main__":
    main()
