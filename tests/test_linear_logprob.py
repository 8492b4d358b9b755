"""LM-head selected-token log-probs: chunked torch path and Triton path vs the naive reference."""

import pytest
import torch

from visioncoach.kernels.linear_logprob import (
    IGNORE_INDEX,
    default_chunk_size,
    linear_logprob,
    linear_logprob_chunked,
    linear_logprob_reference,
)

EPS32 = torch.finfo(torch.float32).eps
KEYS = ("logp", "ent", "gh", "gw")


def make_inputs(N, T, H, V, dtype, *, seed, ignore=True, scale=2.0, device="cpu"):
    """hidden ~ N(0, 1), weight rows ~ N(0, scale^2 / H), so logits ~ N(0, scale^2). Token
    (0, 0) is made near-certain (p_y ~ 1 - 1e-6: the onehot - p cancellation); with ``ignore``
    ~20% of the targets are IGNORE_INDEX and, for N > 1, all of row 1 is."""
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(N, T, H, generator=g, device=device)
    weight = torch.randn(V, H, generator=g, device=device) * (scale / H**0.5)
    targets = torch.randint(0, V, (N, T), generator=g, device=device)
    grad = torch.randn(N, T, generator=g, device=device)          # upstream d loss / d logp
    w0 = weight[targets[0, 0]]
    hidden[0, 0] = w0 * (20.0 / w0.dot(w0))                       # z_y = 20, others ~ N(0, 4)
    if ignore:
        drop = torch.rand(N, T, generator=g, device=device) < 0.2
        drop.view(-1)[-1] = True          # at least one ignored token whenever N*T > 1
        drop[0, 0] = False
        targets[drop] = IGNORE_INDEX
        if N > 1:
            targets[1] = IGNORE_INDEX
    return hidden.to(dtype), weight.to(dtype), targets, grad


def run(impl, inputs, tau, *, train_w, train_h=True, upcast=None, chunk_size=None):
    """Forward with entropy, backward of sum_t grad_t logp_t; returns the four results."""
    hidden, weight, targets, grad = inputs
    h = hidden.detach().clone()
    w = weight.detach().clone()
    if upcast is not None:
        h, w = h.to(upcast), w.to(upcast)
    h.requires_grad_(train_h)
    w.requires_grad_(train_w)
    if impl == "reference":
        logp, ent = linear_logprob_reference(h, w, targets, tau, return_entropy=True)
    elif impl == "chunked":
        logp, ent = linear_logprob_chunked(h, w, targets, tau, return_entropy=True,
                                           chunk_size=chunk_size)
    else:
        logp, ent = linear_logprob(h, w, targets, tau, return_entropy=True,
                                   chunk_size=chunk_size, backend=impl)
    if train_h or train_w:
        (logp * grad.to(logp.dtype)).sum().backward()
    return dict(logp=logp.detach(), ent=ent.detach(), gh=h.grad, gw=w.grad)


def magnitudes(inputs, tau):
    """Sizes of the terms each result sums, in fp64; fp32 rounding leaves a few ulps of them,
    also on results that cancel to ~0 (near-certain tokens):
      logp, entropy  max |z|                (lse and the z_tv it combines)
      grad hidden    max |g| / tau max |W|  (g/tau (w_y - sum_v p_v w_v))
      grad weight    max |g| / tau max |h|  (sum_t g_t/tau (onehot - p_t) h_t)"""
    hidden, weight, _, grad = inputs
    h, w = hidden.double(), weight.double()
    z = (h.reshape(-1, h.shape[-1]) @ w.T).abs().max() / tau
    gt = grad.abs().max().double() / tau
    return dict(logp=z, ent=z, gh=gt * w.abs().max(), gw=gt * h.abs().max())


def bf16_ulp(x):
    """Spacing of bf16 numbers at |x| (8 significant bits)."""
    a = x.abs().double().clamp_min(torch.finfo(torch.bfloat16).tiny)
    return torch.exp2(torch.floor(torch.log2(a)) - 7)


def assert_fp32_close(out, gt, mags):
    """fp32 inputs, against the reference run in fp64: rtol 1e-5 with an absolute floor of 16
    fp32 ulps of the result's term size (magnitudes). (The fp32 reference itself is not always
    that close at V = 151,936: its weight gradient is off by ~4e-6 relative there.)"""
    for k in KEYS:
        if gt[k] is None:
            assert out[k] is None, k
            continue
        assert out[k].dtype == torch.float32 and out[k].shape == gt[k].shape, k
        torch.testing.assert_close(out[k].double(), gt[k], rtol=1e-5,
                                   atol=16 * EPS32 * float(mags[k]), msg=k)


def assert_bf16_close(out, ref, gt, mags):
    """flash-attention's pattern on bf16 inputs: our error against the fp64 ground truth is at
    most twice the reference's own error (the reference run on the same bf16 tensors, fp32 math)
    plus, for the fp32 outputs, a 16-ulp fp32 floor at their term size, and for the gradients,
    returned in bf16, one bf16 ulp."""
    for k in ("logp", "ent"):
        assert out[k].dtype == torch.float32
        err_o = (out[k].double() - gt[k]).abs()
        err_r = (ref[k].double() - gt[k]).abs().max()
        bound = 2 * err_r + 16 * EPS32 * float(mags[k])
        assert (err_o <= bound).all(), (k, err_o.max().item(), err_r.item())
    for k in ("gh", "gw"):
        if ref[k] is None:
            assert out[k] is None, k
            continue
        assert out[k].dtype == torch.bfloat16, k
        err_o = (out[k].double() - gt[k]).abs()
        err_r = (ref[k].double() - gt[k]).abs().max()
        assert (err_o <= 2 * err_r + bf16_ulp(gt[k])).all(), (k, err_o.max().item(), err_r.item())


# (N, T, H, V, chunk_size, temperature): odd N and T, T = 1, V below / across / just past the
# interpreter's 64-wide tile, chunks that do not divide N*T, and a chunk larger than N*T.
SHAPES = [
    (3, 5, 32, 300, 4, 0.7),
    (2, 1, 16, 37, 1, 1.0),
    (4, 3, 24, 129, 5, 1.0),
    (1, 7, 48, 200, 64, 0.7),
]
PARAMS = [
    pytest.param(impl, *shape, dtype, train_w,
                 id=f"{impl}-{shape[0]}x{shape[1]}x{shape[2]}-V{shape[3]}-c{shape[4]}-"
                    f"tau{shape[5]}-{dname}-{'trainW' if train_w else 'frozenW'}")
    for impl in ("chunked", "triton")
    for shape in SHAPES
    for dtype, dname in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))
    for train_w in (False, True)
]


@pytest.mark.parametrize("impl,N,T,H,V,chunk,tau,dtype,train_w", PARAMS)
def test_matches_reference(impl, N, T, H, V, chunk, tau, dtype, train_w):
    inputs = make_inputs(N, T, H, V, dtype, seed=N * 1000 + T * 100 + V)
    out = run(impl, inputs, tau, train_w=train_w, chunk_size=chunk)
    mags = magnitudes(inputs, tau)
    gt = run("reference", inputs, tau, train_w=train_w, upcast=torch.float64)
    if dtype == torch.float32:
        assert_fp32_close(out, gt, mags)
    else:
        ref = run("reference", inputs, tau, train_w=train_w)
        assert_bf16_close(out, ref, gt, mags)
    # ignored tokens: exactly zero value, entropy and hidden gradient
    ignored = inputs[2] == IGNORE_INDEX
    assert ignored.any() == (N > 1 or T > 1)
    assert torch.all(out["logp"][ignored] == 0) and torch.all(out["ent"][ignored] == 0)
    assert torch.all(out["gh"][ignored] == 0)
    assert out["gh"][~ignored].abs().sum() > 0
    # the near-certain token really is one (logp ~ 0, entropy ~ 0)
    assert -1e-2 < out["logp"][0, 0] <= 0 and out["ent"][0, 0] < 0.1


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_frozen_hidden_trainable_weight(impl):
    """Only the weight gets a gradient (the forward then skips D)."""
    inputs = make_inputs(3, 5, 32, 300, torch.float32, seed=5)
    out = run(impl, inputs, 0.7, train_w=True, train_h=False, chunk_size=4)
    ref = run("reference", inputs, 0.7, train_w=True, train_h=False, upcast=torch.float64)
    assert out["gh"] is None
    assert_fp32_close(out, ref, magnitudes(inputs, 0.7))


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_no_grad_and_no_entropy(impl):
    """Under no_grad (old/ref policy log-probs) and without entropy: the same numbers."""
    hidden, weight, targets, _ = make_inputs(2, 9, 16, 100, torch.float32, seed=6)
    hidden.requires_grad_()
    with torch.no_grad():
        ref = linear_logprob_reference(hidden, weight, targets, 1.3)
        if impl == "chunked":
            out = linear_logprob_chunked(hidden, weight, targets, 1.3, chunk_size=7)
        else:
            out = linear_logprob(hidden, weight, targets, 1.3, chunk_size=7, backend="triton")
    assert isinstance(out, torch.Tensor) and not out.requires_grad
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_auto_backend_on_cpu_is_chunked():
    hidden, weight, targets, _ = make_inputs(2, 4, 16, 50, torch.float32, seed=7)
    a = linear_logprob(hidden, weight, targets, 0.9, return_entropy=True, chunk_size=3)
    b = linear_logprob_chunked(hidden, weight, targets, 0.9, return_entropy=True, chunk_size=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_empty_batch(impl):
    hidden = torch.randn(2, 0, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    targets = torch.zeros(2, 0, dtype=torch.long)
    logp, ent = linear_logprob(hidden, weight, targets, return_entropy=True,
                               backend="torch" if impl == "chunked" else "triton")
    assert logp.shape == ent.shape == (2, 0)
    logp.sum().backward()
    assert hidden.grad.shape == hidden.shape and torch.all(weight.grad == 0)


@pytest.mark.parametrize("chunk", [None, 4])
def test_chunked_real_vocabulary(chunk):
    """Qwen2.5's V = 151,936 (not a multiple of anything nice) with a few tokens, trainable
    head: one chunk (default) and two chunks / two vocabulary slices (chunk_size=4)."""
    inputs = make_inputs(2, 3, 32, 151_936, torch.float32, seed=8)
    out = run("chunked", inputs, 0.8, train_w=True, chunk_size=chunk)
    ref = run("reference", inputs, 0.8, train_w=True, upcast=torch.float64)
    assert_fp32_close(out, ref, magnitudes(inputs, 0.8))
    assert out["gw"].abs().sum() > 0


def _saved_numels(fn):
    """fn()'s result and every tensor autograd saves for the backward while it runs."""
    saved = []
    hooks = torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t) or t, lambda t: t)
    with hooks:
        out = fn()
    return out, saved


@pytest.mark.parametrize("train_w", [False, True], ids=["frozenW", "trainW"])
def test_chunked_never_saves_logits(train_w):
    """The [N*T, V] logits (or anything vocabulary-sized per token) are never kept for the
    backward: every tensor the autograd graph saves, other than the inputs themselves, has
    fewer than N*T*V/8 elements (here it is O(N*T*H): lse, D, targets)."""
    N, T, H, V = 2, 256, 64, 151_936
    hidden, weight, targets, grad = make_inputs(N, T, H, V, torch.float32, seed=9, ignore=False)
    hidden.requires_grad_()
    weight.requires_grad_(train_w)
    inputs = {hidden.untyped_storage().data_ptr(), weight.untyped_storage().data_ptr()}
    logp, saved = _saved_numels(lambda: linear_logprob_chunked(hidden, weight, targets))
    own = [t.numel() for t in saved if t.untyped_storage().data_ptr() not in inputs]
    assert own and max(own) < N * T * V / 8, max(own)
    assert max(own) <= N * T * H
    (logp * grad).sum().backward()
    assert hidden.grad is not None and (weight.grad is not None) == train_w

    # Not vacuous: the naive reference saves at least the full logits (on 16 tokens).
    h16 = hidden.detach()[:1, :16].requires_grad_()
    _, saved = _saved_numels(lambda: linear_logprob_reference(h16, weight, targets[:1, :16]))
    assert max(t.numel() for t in saved) >= 16 * V


def test_default_chunk_size():
    assert default_chunk_size(151_936) == 441        # 2^26 fp32 elements = 256 MiB
    assert default_chunk_size(10**9) == 16


def test_torch_compile_aot_eager():
    inputs = make_inputs(3, 5, 32, 300, torch.float32, seed=10)
    hidden, weight, targets, grad = inputs

    def fn(h, w):
        logp, ent = linear_logprob(h, w, targets, 0.7, return_entropy=True, chunk_size=4,
                                   backend="triton")
        return (logp * grad).sum(), logp, ent

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss, logp, ent = compiled(h, w)
    loss.backward()
    out = dict(logp=logp.detach(), ent=ent.detach(), gh=h.grad, gw=w.grad)
    ref = run("reference", inputs, 0.7, train_w=True, upcast=torch.float64)
    assert_fp32_close(out, ref, magnitudes(inputs, 0.7))


def test_opcheck():
    """Schema, fake tensor and autograd registration of both custom ops."""
    hidden, weight, targets, grad = make_inputs(2, 3, 16, 70, torch.float32, seed=11)
    hidden.requires_grad_()
    weight.requires_grad_()
    for ent, need_d in [(True, True), (False, False)]:
        torch.library.opcheck(
            torch.ops.visioncoach.linear_logprob.default,
            (hidden, weight, targets, 0.7, ent, 4, need_d),
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    with torch.no_grad():
        lse = torch.ops.visioncoach.linear_logprob(hidden, weight, targets, 0.7, False, 4, False)[2]
    coef = torch.where(targets.reshape(-1) != IGNORE_INDEX, grad.reshape(-1) / 0.7, 0.0)
    torch.library.opcheck(
        torch.ops.visioncoach.linear_logprob_weight_grad.default,
        (coef, 0.5 * coef, hidden.detach(), weight.detach(), targets, lse, 0.7, 4),
        test_utils=("test_schema", "test_faketensor"))


BAD = [
    ("H mismatch", lambda h, w, y: (h, w[:, :-1], y), "weight"),
    ("target = V", lambda h, w, y: (h, w, torch.full_like(y, w.shape[0])), "targets"),
    ("target < 0", lambda h, w, y: (h, w, torch.full_like(y, -5)), "targets"),
    ("targets shape", lambda h, w, y: (h, w, y[:, :-1]), "targets"),
    ("float targets", lambda h, w, y: (h, w, y.float()), "targets"),
    ("hidden 2-D", lambda h, w, y: (h[0], w, y), "hidden"),
    ("dtype mismatch", lambda h, w, y: (h, w.double(), y), "dtype"),
]


@pytest.mark.parametrize("impl", ["reference", "chunked", "triton"])
@pytest.mark.parametrize("case,mutate,match", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(impl, case, mutate, match):
    hidden, weight, targets, _ = make_inputs(2, 3, 16, 40, torch.float32, seed=12)
    h, w, y = mutate(hidden, weight, targets)
    with pytest.raises(ValueError, match=match):
        if impl == "reference":
            linear_logprob_reference(h, w, y)
        elif impl == "chunked":
            linear_logprob_chunked(h, w, y)
        else:
            linear_logprob(h, w, y, backend="triton")


@pytest.mark.parametrize("kw,match", [(dict(temperature=0.0), "temperature"),
                                      (dict(chunk_size=0), "chunk_size")])
def test_bad_options(kw, match):
    hidden, weight, targets, _ = make_inputs(2, 3, 16, 40, torch.float32, seed=13)
    with pytest.raises(ValueError, match=match):
        linear_logprob(hidden, weight, targets, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("train_w", [False, True], ids=["frozenW", "trainW"])
def test_cuda_real_shape_bf16(train_w):
    """Qwen2.5-VL-7B's head (H=3584, V=151,936), 2 x 512 bf16 tokens: the Triton path (bf16
    cuBLAS GEMMs) against the fp64 ground truth, within twice the error of the chunked torch
    path (fp32 math on the same bf16 tensors) plus a bf16 ulp for the gradients."""
    inputs = make_inputs(2, 512, 3584, 151_936, torch.bfloat16, seed=14, device="cuda")
    tri = run("auto", inputs, 1.0, train_w=train_w)
    ref = run("chunked", inputs, 1.0, train_w=train_w)
    gt = run("reference", inputs, 1.0, train_w=train_w, upcast=torch.float64)
    assert_bf16_close(tri, ref, gt, magnitudes(inputs, 1.0))
    assert ref["gh"].dtype == torch.bfloat16


@pytest.mark.gpu
def test_cuda_matches_chunked_fp32_small():
    """fp32 on CUDA, several chunks and vocabulary slices, against the chunked torch path."""
    inputs = make_inputs(3, 37, 64, 5000, torch.float32, seed=15, device="cuda")
    tri = run("triton", inputs, 0.7, train_w=True, chunk_size=16)
    ref = run("reference", inputs, 0.7, train_w=True, upcast=torch.float64)
    assert_fp32_close(tri, ref, magnitudes(inputs, 0.7))
