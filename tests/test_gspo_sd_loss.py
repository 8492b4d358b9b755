"""GSPO + self-distillation loss: Triton kernel vs PyTorch reference vs hand/TRL formulas."""

import math

import numpy as np
import pytest
import torch

from visioncoach.kernels.gspo_sd_loss import gspo_sd_loss, gspo_sd_loss_reference

STATS = ("clip_frac", "ratio_mean", "kl_mean", "nll_mean")


def make_inputs(N, T, dtype, has_old, has_ref, *, seed=0, float_mask=False, device="cpu"):
    """Random rollouts plus, as far as N allows, one special row each:
    0 all-masked, 1 zero advantage, 2 length 1, 3 SD only (gspo_weight 0), 4 GSPO only."""
    g = torch.Generator().manual_seed(seed)
    logp = (-3.0 * torch.rand(N, T, generator=g)).to(dtype)
    # A per-row offset spreads the sequence ratio across both sides of the clip box.
    offset = 0.15 * (2 * torch.rand(N, 1, generator=g) - 1)
    noise = 0.05 * torch.randn(N, T, generator=g)
    old = (logp.float() + offset + noise).to(dtype) if has_old else None
    ref = (logp.float() + 0.5 * torch.randn(N, T, generator=g)).to(dtype) if has_ref else None
    adv = torch.randn(N, generator=g)
    mask = torch.rand(N, T, generator=g) > 0.25
    mask[:, 0] = True
    gw = torch.rand(N, generator=g) + 0.1
    sdw = torch.rand(N, generator=g) + 0.1
    if N > 1:
        mask[0] = False
    if N > 2:
        adv[1] = 0.0
    if N > 3:
        mask[2] = False
        mask[2, T // 2] = True
    if N > 4:
        gw[3] = 0.0
    if N > 5:
        sdw[4] = 0.0
    if float_mask:
        mask = mask.float()
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return tuple(to(t) for t in (logp, old, ref, adv, mask, gw, sdw))


def run(inputs, backend, *, upcast=None, **kw):
    logp, old, ref, adv, mask, gw, sdw = inputs
    if upcast is not None:
        cast = lambda t: None if t is None else t.to(upcast)  # noqa: E731
        logp, old, ref, adv, gw, sdw = map(cast, (logp, old, ref, adv, gw, sdw))
    x = logp.detach().clone().requires_grad_()
    if backend == "reference":
        loss, stats = gspo_sd_loss_reference(x, old, ref, adv, mask, gw, sdw, **kw)
    else:
        loss, stats = gspo_sd_loss(x, old, ref, adv, mask, gw, sdw, backend=backend, **kw)
    loss.backward()
    return loss.detach(), {k: v.detach() for k, v in stats.items()}, x.grad


def bf16_ulp(x):
    """Spacing of bf16 numbers at |x| (8 significant bits)."""
    a = x.abs().double().clamp_min(torch.finfo(torch.bfloat16).tiny)
    return torch.exp2(torch.floor(torch.log2(a)) - 7)


CASES = [  # (has_old, has_ref, beta)
    (False, False, 0.04),   # on-policy, no KL: beta must be ignored
    (True, False, 0.0),
    (True, True, 0.0),
    (True, True, 0.04),
    (False, True, 0.5),
]
EPS = dict(eps_low=0.05, eps_high=0.06)


PARAMS = [
    pytest.param(N, T, dtype, *case, id=f"{N}x{T}-{name}-old{case[0]:d}-ref{case[1]:d}-b{case[2]}")
    for N, T in [(1, 1), (3, 7), (6, 33)]
    for dtype, name in [(torch.float32, "fp32"), (torch.bfloat16, "bf16")]
    for case in CASES
] + [  # T over the 1024-wide tile, so the kernels loop: once per dtype, every term on
    pytest.param(2, 1100, dtype, True, True, 0.04, id=f"2x1100-{name}")
    for dtype, name in [(torch.float32, "fp32"), (torch.bfloat16, "bf16")]
]


@pytest.mark.parametrize("N,T,dtype,has_old,has_ref,beta", PARAMS)
def test_triton_matches_reference(N, T, dtype, has_old, has_ref, beta):
    inputs = make_inputs(N, T, dtype, has_old, has_ref, seed=N * 1000 + T, float_mask=(N == 3))
    kw = dict(beta=beta, **EPS)
    tri = run(inputs, "triton", **kw)
    if dtype == torch.float32:
        ref = run(inputs, "reference", **kw)
        torch.testing.assert_close(tri[0], ref[0], rtol=1e-5, atol=1e-6)
        for k in STATS:
            torch.testing.assert_close(tri[1][k], ref[1][k], rtol=1e-5, atol=1e-6, msg=k)
        torch.testing.assert_close(tri[2], ref[2], rtol=1e-5, atol=1e-6)
        return
    # bf16 inputs: the Triton error against an fp64 ground truth may be at most twice the
    # reference's own error on the same bf16 inputs, plus an fp32-level floor for the scalars
    # and one bf16 ulp for the gradient, which is rounded to bf16 (flash-attention's pattern).
    gt = run(inputs, "reference", upcast=torch.float64, **kw)
    ref = run(inputs, "reference", **kw)
    assert tri[2].dtype == torch.bfloat16

    def check(name, t, r, g):
        t, r, g = t.double(), r.double(), g.double()
        floor = 1e-6 * (1 + g.abs())
        err_t, err_r = (t - g).abs(), (r - g).abs()
        assert (err_t <= 2 * err_r + floor).all(), (name, err_t.max().item(), err_r.max().item())

    check("loss", tri[0], ref[0], gt[0])
    for k in STATS:
        check(k, tri[1][k], ref[1][k], gt[1][k])
    err_t = (tri[2].double() - gt[2]).abs()
    err_r = (ref[2].double() - gt[2]).abs().max()
    assert (err_t <= 2 * err_r + bf16_ulp(gt[2])).all(), (err_t.max().item(), err_r.item())
    # Tighter: the fp32 gradient is rounded to nearest (the interpreter's own cast truncates).
    half_ulp = 0.5 * bf16_ulp(torch.maximum(gt[2].abs(), tri[2].double().abs()))
    assert (err_t <= half_ulp + 1e-6 * gt[2].abs()).all()
    # Not vacuous: the gradient is nonzero somewhere and the clip box splits the rows.
    assert gt[2].abs().max() > 0


def test_cases_exercise_clipping():
    """The parametrized data has clipped and unclipped GSPO rows, so both paths are tested."""
    inputs = make_inputs(6, 33, torch.float32, True, True, seed=6033)
    _, stats, _ = run(inputs, "reference", beta=0.04, **EPS)
    assert 0 < stats["clip_frac"].item() < 1


@pytest.mark.parametrize("hi_side", [True, False], ids=["high", "low"])
def test_clip_boundary_bf16(hi_side):
    """GSPO's tiny clip range (3e-4 / 4e-4) on bf16 log-probs: the ratio is formed in fp32, so
    rows 2e-6 (~17 fp32 ulps of s) either side of the bound land on the right side."""
    eps_low, eps_high = 3e-4, 4e-4
    N, T = 4, 16
    g = torch.Generator().manual_seed(7)
    logp = (-3.0 * torch.rand(N, T, generator=g)).to(torch.bfloat16)
    bound = math.log1p(eps_high) if hi_side else math.log1p(-eps_low)
    sign = 1.0 if hi_side else -1.0   # the advantage sign that the bound clips
    margin = 2e-6
    # rows: clipped (outside, A clipped), inside, outside but A of the other sign, inside
    l_target = torch.tensor([bound + sign * margin, bound - sign * margin,
                             bound + sign * margin, bound - sign * margin])
    adv = torch.tensor([sign, sign, -sign, -sign])
    old = logp.float() - l_target[:, None]       # fp32: bf16 cannot hold a 1e-4 shift
    mask = torch.ones(N, T, dtype=torch.bool)
    gw = torch.full((N,), 1.0 / N)
    sdw = torch.zeros(N)
    # The construction really straddles the bound, judged in fp64 from the stored tensors.
    s64 = torch.exp((logp.double() - old.double()).mean(-1))
    b = 1 + eps_high if hi_side else 1 - eps_low
    outside = (s64 > b) if hi_side else (s64 < b)
    assert outside.tolist() == [True, False, True, False]
    assert ((s64 - b).abs() > 10 * 2**-23).all()

    inputs = (logp, old, None, adv, mask, gw, sdw)
    kw = dict(eps_low=eps_low, eps_high=eps_high, beta=0.0)
    for backend in ("reference", "triton"):
        loss, stats, grad = run(inputs, backend, **kw)
        assert stats["clip_frac"].item() == 0.25, backend
        assert torch.all(grad[0] == 0), backend            # clipped: no gradient at all
        for i in (1, 2, 3):
            # unclipped: d loss / d logp_t = -gw A s / T for every token
            expect = -gw[i] * adv[i] * s64[i] / T
            torch.testing.assert_close(grad[i].double(), expect.expand(T), rtol=8e-3, atol=0)
        # the loss sees the clipped value for row 0 and the raw ratio for the others
        surr = -torch.minimum(s64 * adv, s64.clamp(1 - eps_low, 1 + eps_high) * adv)
        torch.testing.assert_close(loss.double(), (gw.double() * surr).sum(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_tie_at_clip_bound_follows_torch(backend):
    """On-policy s = 1 exactly; with eps_high = 0 it sits on the bound, where s A == clip(s) A.
    torch.minimum gives each branch half the gradient and torch.clamp passes none at its
    bound, so the surrogate gradient is half the unclipped one, in reference and kernel."""
    N, T = 2, 4
    logp = -torch.rand(N, T, generator=torch.Generator().manual_seed(4))
    adv = torch.tensor([1.5, -0.5])
    mask = torch.ones(N, T, dtype=torch.bool)
    gw, sdw = torch.tensor([0.5, 0.5]), torch.zeros(N)
    _, stats, grad = run((logp, None, None, adv, mask, gw, sdw), backend,
                         eps_low=0.1, eps_high=0.0, beta=0.0)
    expect = (-0.5 * gw * adv / T)[:, None].expand(N, T)
    torch.testing.assert_close(grad, expect)
    assert stats["clip_frac"].item() == 0.0 and stats["ratio_mean"].item() == 1.0


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_kl_clamp_edges(backend):
    """d = ref - logp is clamped to [-10, 10]: k3 saturates there and, as torch.clamp gives,
    its gradient is zero at the bounds themselves (all values exact in fp32)."""
    logp = torch.tensor([[-12.0, -2.0, -13.0, -1.0, -3.0, -0.5]])
    ref = torch.tensor([[-2.0, -12.0, -1.0, -15.0, -2.0, -1.5]])   # d = 10, -10, 12, -14, 1, -1
    mask = torch.ones(1, 6, dtype=torch.bool)
    one, zero = torch.ones(1), torch.zeros(1)
    beta = 0.5
    loss, stats, grad = run((logp, None, ref, zero, mask, one, zero), backend,
                            eps_low=0.1, eps_high=0.1, beta=beta)
    k3 = lambda d: math.exp(d) - d - 1  # noqa: E731
    kl = (2 * k3(10) + 2 * k3(-10) + k3(1) + k3(-1)) / 6
    torch.testing.assert_close(loss.item(), beta * kl, rtol=1e-6, atol=0)
    torch.testing.assert_close(stats["kl_mean"].item(), kl, rtol=1e-6, atol=0)
    dk3 = [0, 0, 0, 0, -(math.exp(1) - 1), -(math.exp(-1) - 1)]
    torch.testing.assert_close(grad, beta / 6 * torch.tensor([dk3]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_all_masked_rows(backend):
    N, T = 4, 9
    inputs = list(make_inputs(N, T, torch.float32, True, True, seed=3))
    mask = inputs[4]
    mask[1] = False
    mask[3] = False
    inputs[0][1] = -1e4     # extreme values in masked rows stay harmless
    loss, stats, grad = run(tuple(inputs), backend, beta=0.04, **EPS)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in stats.values())
    assert torch.all(grad[[0, 1, 3]] == 0)     # row 0 is all-masked by make_inputs
    assert grad[2].abs().sum() > 0
    # every row masked: loss and stats are exactly zero
    inputs[4] = torch.zeros(N, T, dtype=torch.bool)
    loss, stats, grad = run(tuple(inputs), backend, beta=0.04, **EPS)
    assert loss.item() == 0.0 and torch.all(grad == 0)
    assert all(v.item() == 0.0 for v in stats.values())


def test_sd_only_and_zero_advantage():
    """gspo_weight 0 rows give pure NLL gradients; A = 0 rows give pure KL/NLL gradients."""
    N, T = 2, 5
    logp = -torch.rand(N, T, generator=torch.Generator().manual_seed(1))
    old = logp + 0.3
    adv = torch.tensor([5.0, 0.0])
    mask = torch.ones(N, T, dtype=torch.bool)
    gw = torch.tensor([0.0, 1.0])
    sdw = torch.tensor([0.7, 0.0])
    for backend in ("reference", "triton"):
        _, stats, grad = run((logp, old, None, adv, mask, gw, sdw), backend,
                             beta=0.1, eps_low=0.2, eps_high=0.2)
        torch.testing.assert_close(grad[0], torch.full((T,), -0.7 / T))
        assert torch.all(grad[1] == 0)
        assert stats["clip_frac"].item() == 0.0     # A = 0 is never clipped
        torch.testing.assert_close(stats["ratio_mean"], torch.tensor(math.exp(-0.3)))
        torch.testing.assert_close(stats["nll_mean"], -logp[0].mean())


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_hand_computed_two_rows(backend):
    """Eq. 1-2 worked by hand with math.exp: row 0 clipped above (A > 0), row 1 in the box."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -1.2]], dtype=torch.float64)
    old = torch.tensor([[-1.1, -2.0, -0.6], [-0.2, -0.9, -1.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.2, -1.5, 0.0], [-0.5, -0.7, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([1.0, -2.0])
    gw, sdw = torch.tensor([0.5, 0.25]), torch.tensor([0.1, 0.2])
    beta, eps_low, eps_high = 0.1, 0.05, 0.02

    k3 = lambda d: math.exp(d) - d - 1  # noqa: E731
    s0 = math.exp((0.1 + 0.0) / 2)                  # 1.0513 > 1.02: clipped, A > 0
    s1 = math.exp((-0.1 + 0.2 - 0.2) / 3)           # 0.9672 in [0.95, 1.02]
    kl0 = (k3(-0.2) + k3(0.5)) / 2
    kl1 = (k3(-0.2) + k3(0.0) + k3(0.2)) / 3
    nll0, nll1 = 1.5, (0.3 + 0.7 + 1.2) / 3
    surr0, surr1 = -1.02 * 1.0, -s1 * -2.0
    loss = 0.5 * (surr0 + beta * kl0) + 0.25 * (surr1 + beta * kl1) + 0.1 * nll0 + 0.2 * nll1
    # d/dlogp: clipped row has no surrogate term; dk3/dlogp = -(e^d - 1); dNLL/dlogp = -1/n
    g0 = [0.5 * beta * -(math.exp(d) - 1) / 2 - 0.1 / 2 for d in (-0.2, 0.5)] + [0.0]
    g1 = [0.25 * (2.0 * s1 / 3 + beta * -(math.exp(d) - 1) / 3) - 0.2 / 3 for d in (-0.2, 0.0, 0.2)]
    dt = torch.float64 if backend == "reference" else torch.float32
    out_loss, stats, grad = run((logp.to(dt), old.to(dt), ref.to(dt), adv, mask, gw, sdw),
                                backend, beta=beta, eps_low=eps_low, eps_high=eps_high)
    tol = dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out_loss.item(), loss, **tol)
    torch.testing.assert_close(grad.double(), torch.tensor([g0, g1], dtype=torch.float64), **tol)
    expect = {"clip_frac": 0.5, "ratio_mean": (s0 + s1) / 2, "kl_mean": (kl0 + kl1) / 2,
              "nll_mean": (nll0 + nll1) / 2}
    for k, v in expect.items():
        torch.testing.assert_close(stats[k].item(), v, **tol, msg=k)


def trl_grpo_sequence_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta):
    """TRL GRPOTrainer, importance_sampling_level="sequence", loss_type="grpo", written from
    the formula: per-token loss -min(s A, clip(s) A) + beta k3 with s the row's sequence
    ratio, averaged over each row's tokens and then over rows."""
    m = mask.to(logp.dtype)
    n = m.sum(-1).clamp(min=1.0)
    s = torch.exp(((logp - old) * m).sum(-1, keepdim=True) / n[:, None])       # [N, 1]
    a = adv[:, None]
    per_token = -torch.min(s * a, torch.clamp(s, 1 - eps_low, 1 + eps_high) * a)
    per_token = per_token + beta * (torch.exp(ref - logp) - (ref - logp) - 1)
    return ((per_token * m).sum(-1) / n).mean()


def test_reference_equals_trl_grpo_sequence():
    N, T = 6, 11
    logp, old, ref, adv, mask, _, _ = make_inputs(N, T, torch.float64, True, True, seed=11)
    mask[0, :3] = True   # TRL averages over rows including empty ones: keep all rows non-empty
    kw = dict(eps_low=0.05, eps_high=0.06, beta=0.04)
    x1 = logp.clone().requires_grad_()
    gw = torch.full((N,), 1.0 / N, dtype=torch.float64)
    loss, _ = gspo_sd_loss_reference(x1, old, ref, adv, mask, gw, torch.zeros(N), **kw)
    loss.backward()
    x2 = logp.clone().requires_grad_()
    trl = trl_grpo_sequence_loss(x2, old, ref, adv.double(), mask, **kw)
    trl.backward()
    torch.testing.assert_close(loss, trl, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-14)


def test_auto_backend_on_cpu_is_reference():
    inputs = make_inputs(3, 7, torch.float32, True, True, seed=2)
    a = run(inputs, "auto", beta=0.04, **EPS)
    b = run(inputs, "reference", beta=0.04, **EPS)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])


def test_torch_compile_aot_eager():
    inputs = make_inputs(5, 13, torch.float32, True, True, seed=5)
    logp, old, ref, adv, mask, gw, sdw = inputs

    def fn(x):
        loss, stats = gspo_sd_loss(x, old, ref, adv, mask, gw, sdw, eps_low=0.05,
                                   eps_high=0.06, beta=0.04, backend="triton")
        return loss, stats["clip_frac"]

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    x = logp.clone().requires_grad_()
    loss, clip = compiled(x)
    loss.backward()
    ref_loss, ref_stats, ref_grad = run(inputs, "reference", beta=0.04, **EPS)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(clip, ref_stats["clip_frac"])
    torch.testing.assert_close(x.grad, ref_grad, rtol=1e-5, atol=1e-6)


def test_opcheck():
    """Schema, fake tensor and autograd registration of the custom op."""
    logp, old, ref, adv, mask, gw, sdw = make_inputs(3, 5, torch.float32, True, True, seed=9)
    args = (logp.requires_grad_(), old, ref, adv, mask, gw, sdw, 0.05, 0.06, 0.04)
    torch.library.opcheck(torch.ops.visioncoach.gspo_sd_loss.default, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("bits", [0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001], ids=hex)
def test_bf16_gradient_keeps_nan(bits):
    """A NaN upstream gradient (a GPU's NaN 0x7FFFFFFF, its negative, a signalling NaN) gives a
    NaN bf16 log-prob gradient, so the trainer's NaN guard sees it. The hand-written rounding the
    kernel had carried 0x7FFFFFFF into the sign bit (-0.0) and gave 0xFFFFFFFF +0.0. (The
    interpreter's g / n keeps the payload, as x86 does, so the pattern reaches the rounding.)"""
    logp, old, ref, adv, mask, gw, sdw = make_inputs(4, 9, torch.bfloat16, False, True, seed=33)
    _, rows = torch.ops.visioncoach.gspo_sd_loss(logp, None, ref, adv, mask, gw, sdw, 0.2, 0.3, 0.04)
    g = torch.from_numpy(np.array(bits, dtype=np.uint32).view(np.float32))       # 0-dim
    grad = torch.ops.visioncoach.gspo_sd_loss_backward(g, logp, ref, mask, rows)
    assert grad.dtype == torch.bfloat16 and grad.isnan().all(), grad
    # a finite upstream gradient still gives finite, nearest-even-rounded values
    fin = torch.ops.visioncoach.gspo_sd_loss_backward(torch.tensor(1.0), logp, ref, mask, rows)
    assert fin.isfinite().all() and (fin != 0).any()


@pytest.mark.gpu
@pytest.mark.parametrize("has_old", [False, True])
def test_cuda_real_shape_bf16(has_old):
    N, T = 32, 768
    inputs = make_inputs(N, T, torch.bfloat16, has_old, True, seed=32, device="cuda")
    kw = dict(eps_low=3e-4, eps_high=4e-4, beta=0.04)
    tri = run(inputs, "auto", **kw)
    ref = run(inputs, "reference", **kw)
    gt = run(inputs, "reference", upcast=torch.float64, **kw)
    for t, r, g in [(tri[0], ref[0], gt[0])] + [(tri[1][k], ref[1][k], gt[1][k]) for k in STATS]:
        t, r, g = t.double(), r.double(), g.double()
        assert (t - g).abs() <= 2 * (r - g).abs() + 1e-6 * (1 + g.abs())
    err_t = (tri[2].double() - gt[2]).abs()
    err_r = (ref[2].double() - gt[2]).abs().max()
    assert (err_t <= 2 * err_r + bf16_ulp(gt[2])).all()
