"""The Triton path of ``linear_logprob`` beyond matching the reference (tests/test_linear_logprob.py
does that): the forward reads each logit once, rows with far-off targets take its second pass
and stay exact, NaN survives the bf16 outputs, the weight gradient's slices suit vector access.
All in Triton's interpreter on CPU."""

import numpy as np
import pytest
import torch
from test_linear_logprob import assert_bf16_close, assert_fp32_close, magnitudes, make_inputs, run

from visioncoach.kernels.linear_logprob import (IGNORE_INDEX, _logprob_fwd_kernel, _vocab_slice,
                                                linear_logprob)


def far_targets(hidden, weight, targets, rows):
    """Point each (n, t) of ``rows`` away from its target: z_y = -100 while the other logits of
    the row spread over N(0, ~25^2), so lse - z_y is ~170: p_y < e^-64, and exp(z - z_y) would
    overflow fp32 (> e^88.7). Returns the inputs with those rows changed."""
    hidden = hidden.clone()
    for n, t in rows:
        w = weight[targets[n, t]].float()
        hidden[n, t] = (w * (-100.0 / w.dot(w))).to(hidden.dtype)
    return hidden


FAR = [(0, 1), (1, 3)]


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")   # by design
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_far_targets_match_reference(dtype):
    """Rows whose target has p_y < e^-64 take the forward kernel's second pass (u relative to the
    row max, not to the target logit, which would overflow): values and gradients as exact as
    every other row's, against the fp64 reference."""
    hidden, weight, targets, grad = make_inputs(2, 5, 16, 300, dtype, seed=23, ignore=False)
    targets[0, 4] = IGNORE_INDEX
    inputs = (far_targets(hidden, weight, targets, FAR), weight, targets, grad)
    out = run("triton", inputs, 1.0, train_w=True, chunk_size=4)
    gt = run("reference", inputs, 1.0, train_w=True, upcast=torch.float64)
    assert all(gt["logp"][n, t] < -88.7 for n, t in FAR)
    if dtype == torch.float32:
        assert_fp32_close(out, gt, magnitudes(inputs, 1.0))
    else:
        assert_bf16_close(out, run("reference", inputs, 1.0, train_w=True), gt, magnitudes(inputs, 1.0))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_forward_reads_each_logit_once(dtype, monkeypatch):
    """The forward that keeps D (a hidden gradient) loads each logit of its chunk once, plus each
    row's target logit once more (x_y, loaded first as the u rows' reference): the softmax
    statistics and D's GEMM operand come from one pass (the logits chunk, 268 MB at 7B shapes,
    is larger than L2; it used to be read twice). Only rows with p_y < e^-64 read their row a
    second time. Counted in the interpreter: every fp32 element its loads touch (the kernel's
    only fp32 loads are the logits)."""
    import triton.language as tl
    from triton.runtime import interpreter

    N, T, V = 2, 5, 300
    hidden, weight, targets, _ = make_inputs(N, T, 16, V, dtype, seed=24, ignore=False)
    targets[1, 0] = IGNORE_INDEX
    hidden = far_targets(hidden, weight, targets, FAR).requires_grad_()
    seen = []
    load = interpreter.InterpreterBuilder.create_masked_load

    def counting(self, ptrs, mask, *args):
        if ptrs.get_element_ty() == tl.float32:
            seen.append(np.asarray(ptrs.data)[np.broadcast_to(mask.data, ptrs.data.shape)])
        return load(self, ptrs, mask, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", counting)
    linear_logprob(hidden, weight, targets, backend="triton")          # one chunk: N*T rows
    _, per_logit = np.unique(np.concatenate(seen), return_counts=True)
    assert len(per_logit) == N * T * V                                 # every logit read ...
    assert per_logit.sum() == N * T * (V + 1) + len(FAR) * V           # ... once, but x_y and far rows
    seen.clear()
    with torch.no_grad():                                              # no D: one read, as before
        linear_logprob(hidden, weight, targets, backend="triton")
    assert sum(map(len, seen)) == N * T * (V + 1)


NAN_BITS = [0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001]    # a GPU's NaN, its negative, a signalling NaN


def nan_f32(bits):
    return torch.from_numpy(np.array(bits, dtype=np.uint32).view(np.float32))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_bf16_u_rows_keep_nan(monkeypatch):
    """A NaN logit must reach D (and the hidden gradient, where the trainer's NaN guard looks):
    the u rows written in bf16 keep it NaN. A GPU's exp of NaN is its canonical NaN 0x7FFFFFFF,
    which the hand-written rounding the kernels had turned into -0.0 (D came out finite); numpy's
    exp, the interpreter's, returns 0x7FC00000, which that rounding happened to keep. So the
    interpreter's exp is made to answer NaN as the GPU does."""
    from triton.runtime import interpreter

    gpu_nan = nan_f32([0x7FFFFFFF]).numpy()[0]
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_exp", lambda self, arg: self.unary_op(
        arg, lambda x: np.where(np.isnan(x), gpu_nan, np.exp(x))))
    V = 100
    z = torch.randn(3, V, generator=torch.Generator().manual_seed(25))
    z[:, 7] = nan_f32(NAN_BITS)                        # row i: pattern i, in column 7
    y = torch.tensor([3, 50, 99])
    u = torch.empty(3, V, dtype=torch.bfloat16)
    lse, logp, r, sig = (torch.empty(3) for _ in range(4))
    _logprob_fwd_kernel[(3,)](z, u, y, lse, logp, lse, r, sig, V, V, V, 1.0, IGNORE=IGNORE_INDEX,
                              HAS_ENT=False, WRITE_U=True, REF_GAP=64.0, BLOCK_V=64)
    assert u[:, 7].isnan().all(), u[:, 7]
    rest = torch.ones(3, V, dtype=torch.bool)
    rest[:, 7] = False
    rest[torch.arange(3), y] = False
    assert u[rest].isfinite().all() and (u[torch.arange(3), y] == 0).all()


def test_bf16_weight_gradient_keeps_nan():
    """The weight gradient's G chunk, written in bf16, keeps a NaN: G's target column is coef_y
    itself, so the bit patterns reach the rounding unchanged; grad W row y_t = sum_t G[t, y_t] h_t
    is NaN exactly for the three targets (the old rounding gave -0.0 / +0.0 / +inf there)."""
    hidden, weight, targets, _ = make_inputs(1, 3, 16, 40, torch.bfloat16, seed=26, ignore=False)
    targets = torch.tensor([[5, 17, 33]])
    gw = torch.ops.visioncoach.linear_logprob_weight_grad(
        torch.full((3,), 0.5), nan_f32(NAN_BITS), hidden, weight, targets, torch.full((3,), 4.0),
        1.0, 1)                                        # chunk 1: 13-column vocabulary slices
    assert gw.dtype == torch.bfloat16
    nan_rows = gw.isnan().all(1)
    assert nan_rows.tolist() == [v in (5, 17, 33) for v in range(40)]
    assert gw[~nan_rows].isfinite().all()


def test_vocab_slices_are_multiples_of_16_on_the_triton_path():
    """The Triton weight-gradient pass rounds its slice width down to a multiple of 16 (row
    starts 16-byte aligned: vector loads and stores); the torch path keeps its width."""
    assert _vocab_slice(3072, 152_064, 441, multiple=16) == 21_824        # 21,829 before
    assert _vocab_slice(1536, 152_064, 441, multiple=16) == 43_648
    assert _vocab_slice(3072, 152_064, 441) == 21_829
    assert _vocab_slice(15, 40, 1, multiple=16) == 2                       # under 16: as it is
    assert _vocab_slice(3, 40, 4, multiple=16) == 40                       # never past V
