"""The torch path's vocabulary slices (online max over [rows, columns] tiles of the logits)
against the naive reference, and its memory, counted by the CPU allocator's own events."""

import pytest
import torch
from test_linear_logprob import (
    IGNORE_INDEX,
    assert_bf16_close,
    assert_fp32_close,
    magnitudes,
    make_inputs,
)
from test_linear_logprob import run as run_impl
from torch.profiler import ProfilerActivity, profile

from visioncoach.kernels.linear_logprob import (
    _weight_grad_slice,
    linear_logprob_chunked,
    linear_logprob_reference,
    torch_tile,
)


def run_tiled(inputs, tau, *, train_w, chunk_size, vocab_slice, train_h=True):
    hidden, weight, targets, grad = inputs
    h = hidden.detach().clone().requires_grad_(train_h)
    w = weight.detach().clone().requires_grad_(train_w)
    logp, ent = linear_logprob_chunked(h, w, targets, tau, return_entropy=True,
                                       chunk_size=chunk_size, vocab_slice=vocab_slice)
    if train_h or train_w:
        (logp * grad).sum().backward()
    return {"logp": logp.detach(), "ent": ent.detach(), "gh": h.grad, "gw": w.grad}


# (N, T, H, V, chunk_size, vocab_slice, temperature): slices that do not divide V (a last slice
# of 2 columns, of 1 column), one column per slice, a slice wider than V, row chunks that do
# not divide N*T; a slice boundary falls inside every row.
SHAPES = [
    (3, 5, 32, 300, 4, 16, 0.7),
    (2, 1, 16, 37, 1, 5, 1.0),
    (4, 3, 24, 129, 5, 64, 1.0),
    (1, 7, 48, 200, 64, 7, 0.7),
    (2, 3, 16, 40, 4, 1, 1.3),
    (2, 4, 16, 50, 3, 1000, 0.9),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("train_w", [False, True], ids=["frozenW", "trainW"])
@pytest.mark.parametrize("N,T,H,V,chunk,vslice,tau", SHAPES,
                         ids=[f"{s[0]}x{s[1]}x{s[2]}-V{s[3]}-c{s[4]}-s{s[5]}" for s in SHAPES])
def test_vocab_slices_match_reference(N, T, H, V, chunk, vslice, tau, dtype, train_w):
    inputs = make_inputs(N, T, H, V, dtype, seed=N * 1000 + T * 100 + V + vslice)
    out = run_tiled(inputs, tau, train_w=train_w, chunk_size=chunk, vocab_slice=vslice)
    mags = magnitudes(inputs, tau)
    gt = run_impl("reference", inputs, tau, train_w=train_w, upcast=torch.float64)
    if dtype == torch.float32:
        assert_fp32_close(out, gt, mags)
    else:
        assert_bf16_close(out, run_impl("reference", inputs, tau, train_w=train_w), gt, mags)
    ignored = inputs[2] == IGNORE_INDEX
    assert torch.all(out["logp"][ignored] == 0) and torch.all(out["ent"][ignored] == 0)
    assert torch.all(out["gh"][ignored] == 0)
    if N > 1:       # make_inputs masks all of row 1: a fully masked sequence
        assert torch.all(out["gh"][1] == 0)
    assert -1e-2 < out["logp"][0, 0] <= 0 and out["ent"][0, 0] < 0.1   # the near-certain token


@pytest.mark.parametrize("train_w", [False, True], ids=["frozenW", "trainW"])
def test_unlikely_target_and_late_maximum(train_w):
    """A target with p_y < e^-50 (relative to its logit, the others' exp reach e^50), and rows
    whose largest logit sits in the last slice, so that every earlier slice is rescaled by
    e^(m - m') ~ e^-30."""
    N, T, H, V = 2, 6, 32, 300
    hidden, weight, targets, grad = make_inputs(N, T, H, V, torch.float32, seed=21, ignore=False)
    w_last = weight[V - 1]
    hidden[1] = w_last * (30.0 / w_last.dot(w_last))              # z_{V-1} = 30, others ~ N(0, 4)
    targets[1, :3] = V - 1                                         # likely, in the last slice
    w0 = weight[0]
    hidden[0, 1] = -w0 * (30.0 / w0.dot(w0)) + w_last * (30.0 / w_last.dot(w_last))
    targets[0, 1] = 0                                              # z_y ~ -30 against a max ~ 30
    inputs = (hidden, weight, targets, grad)
    out = run_tiled(inputs, 1.0, train_w=train_w, chunk_size=5, vocab_slice=32)
    gt = run_impl("reference", inputs, 1.0, train_w=train_w, upcast=torch.float64)
    assert gt["logp"][0, 1] < -50                                  # the case really is extreme
    assert_fp32_close(out, gt, magnitudes(inputs, 1.0))


def test_bad_vocab_slice():
    hidden, weight, targets, _ = make_inputs(2, 3, 16, 40, torch.float32, seed=13)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="vocab_slice"):
            linear_logprob_chunked(hidden, weight, targets, vocab_slice=bad)


def test_default_tile():
    assert torch_tile(4096, 151_936) == (2048, 4096)              # 2^23 fp32 elements, 32 MiB
    assert torch_tile(100, 151_936) == (100, 83_886)
    assert torch_tile(3, 40) == (3, 40)                            # never past N*T or V
    assert torch_tile(5000, 151_936, chunk_size=4096, vocab_slice=7) == (4096, 7)


def _peak_cpu_bytes(fn):
    """Peak of the bytes the CPU allocator holds while fn() runs, above what it held before,
    from the profiler's allocation and free events (deterministic: no RSS, no timing)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]"
                    and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("train_w", [False, True], ids=["frozenW", "trainW"])
def test_peak_memory_is_one_tile(train_w):
    """Forward + backward at Qwen2.5's vocabulary holds one fp32 buffer, the forward's tile (or a
    trainable head's [N*T, slice] weight-gradient slice, with the [V, H] gradient, the op's
    output), plus O(N*T*H): D, the hidden gradient, one chunk's target rows w_y, plus 128 bytes
    per token for the [N*T] vectors. The naive reference holds the [N*T, V] logits, and a frozen
    head's bound is below the whole-row chunk, [441, V], this path had before."""
    N, T, H, V = 2, 256, 64, 151_936
    hidden, weight, targets, grad = make_inputs(N, T, H, V, torch.float32, seed=22, ignore=False)
    NT = N * T
    weight.requires_grad_(train_w)

    h = hidden.detach().requires_grad_()

    def step(fn):
        h.grad = weight.grad = None
        torch.autograd.backward((fn(h, weight, targets) * grad).sum())

    step(linear_logprob_chunked)                                   # lazy one-off allocations
    rows, cols = torch_tile(NT, V)
    buffer = NT * _weight_grad_slice(NT, V, None) if train_w else rows * cols
    bound = 4 * (buffer + 2 * NT * H + rows * H + (V * H if train_w else 0)) + 128 * NT
    peak = _peak_cpu_bytes(lambda: step(linear_logprob_chunked))
    assert 4 * buffer <= peak <= bound, (peak, bound)
    if not train_w:
        assert bound < 4 * 441 * V                                 # the old whole-row chunk
    # Not vacuous: the naive reference really allocates the logits.
    assert _peak_cpu_bytes(lambda: step(linear_logprob_reference)) >= 4 * NT * V
