"""Kernel microbenchmarks under pytest-benchmark (see bench/conftest.py): each kernel beside the
baseline a user would otherwise run, one group per shape.

  gspo_sd_loss    plain PyTorch reference vs ours (Triton on CUDA; the torch backend on CPU,
                  where the Triton path would only run in the interpreter)
  linear_logprob  materialised logits (TRL's path) vs Liger's fused GRPO loss vs ours, LM head
                  frozen and trainable, followed by the GSPO loss and backward (the cases of
                  bench_linear_logprob.py, which also measures their peak memory)
"""

from __future__ import annotations

import pytest
import torch
from _common import bench_case
from bench_gspo_sd_loss import KW as GSPO_KW
from bench_gspo_sd_loss import inputs as gspo_inputs
from bench_linear_logprob import build_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", ["reference", "ours"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gspo_sd_loss(benchmark, quick, impl, mode, dtype):
    from visioncoach.kernels.gspo_sd_loss import gspo_sd_loss, gspo_sd_loss_reference

    N, T = (8, 64) if quick else (32, 768) if DEVICE == "cpu" else (256, 4096)
    backend = "triton" if DEVICE == "cuda" else "torch"
    fn = (lambda *a: gspo_sd_loss_reference(*a, **GSPO_KW)) if impl == "reference" else \
        (lambda *a: gspo_sd_loss(*a, **GSPO_KW, backend=backend))
    logp, *rest = gspo_inputs(N, T, getattr(torch, dtype), DEVICE)
    x = logp.clone().requires_grad_()

    def run():
        if mode == "fwd":
            with torch.no_grad():
                fn(x, *rest)
        else:
            x.grad = None
            fn(x, *rest)[0].backward()
        _sync()

    bench_case(benchmark, bench="gspo_sd_loss",
               case={"N": N, "T": T, "dtype": dtype, "mode": mode, "backend": backend, "device": DEVICE},
               impl=impl, baseline="reference")
    benchmark(run)


@pytest.mark.parametrize("impl", ["naive", "liger", "ours"])
@pytest.mark.parametrize("head", ["frozen", "trainable"])
def test_linear_logprob(benchmark, quick, rounds, impl, head):
    if impl == "liger":
        pytest.importorskip("liger_kernel")
    # The tiny model's head on Qwen2.5's real vocabulary (H 896, V 151,936), fp32. On CPU a
    # 4 x 1024-token step takes 30-100 s per implementation, so 256 tokens here;
    # bench_linear_logprob.py runs the full shape once, with peak memory.
    n, t = (2, 33) if quick else (1, 256) if DEVICE == "cpu" else (4, 1024)
    h, v = (64, 1000) if quick else (896, 151936)
    step, hidden, weight = build_step(impl, n, t, h, v, head == "trainable", "float32", DEVICE)

    def run():
        hidden.grad = None
        weight.grad = None
        step()
        _sync()

    bench_case(benchmark, bench="linear_logprob",
               case={"N": n, "T": t, "H": h, "V": v, "head": head, "dtype": "float32", "device": DEVICE},
               impl=impl, baseline="naive")
    # Seconds per call on CPU: a fixed number of rounds after one warm-up, not calibration.
    benchmark.pedantic(run, rounds=rounds(3), warmup_rounds=1, iterations=1)
