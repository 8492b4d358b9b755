"""Fused GSPO + self-distillation loss over per-token log-probs (VisionCoach eq. 1-2).

One row per rollout i, T completion tokens, mask m_it (bool or float weights), n_i = sum_t m_it.
Masked mean: <x>_i = sum_t m_it x_it / n_i.

GSPO (Zheng et al. 2025) replaces PPO's token ratio with a length-normalised sequence ratio

    l_i = <logp - old_logp>_i,   s_i = exp(clamp(l_i, -20, 20)) = (pi(y_i) / pi_old(y_i))^(1/|y_i|)

and VisionCoach eq. 1 is the clipped objective on it, with the k3 KL estimator to a reference:

    surr_i = -min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)
    d_it   = clamp(ref_it - logp_it, -10, 10),   k3_it = exp(d_it) - d_it - 1,   KL_i = <k3>_i

VisionCoach eq. 2 adds self-distillation (SD): an NLL term on the improved rollouts,

    NLL_i = -<logp>_i

and this op computes the weighted sum (the trainer folds 1/G, alpha and row selection into the
weights; rows with n_i = 0 contribute nothing and get a zero gradient):

    loss = sum_i gspo_weight_i (surr_i + beta KL_i) + sum_i sd_weight_i NLL_i

``old_logp=None`` means on-policy (old = logp.detach(), so s_i = 1 but d s_i/d logp still
flows); ``ref_logp=None`` means no KL term whatever beta is. Only ``logp`` gets a gradient.

Tie rule (follows torch exactly, so the kernel matches the reference's autograd):
  * ``torch.minimum`` splits the gradient in half between equal operands. Inside the clip box
    s A == clip(s) A, and both halves carry A, so the gradient is the plain one.
  * ``torch.clamp`` with scalar bounds passes the gradient only strictly inside the bounds
    (zero at the bounds themselves). So at s_i == 1 + eps_high exactly, the unclipped half
    carries A/2 and the clipped half 0; the same strictness holds for the +-20 clamp on l_i
    and the +-10 clamp on d_it.

Stats (0-dim fp32, no host sync), over "GSPO rows" = non-empty rows with gspo_weight > 0:
  * ``clip_frac``: fraction of GSPO rows where the clipped branch is selected and differs from
    the unclipped one, i.e. (A > 0 and s > 1 + eps_high) or (A < 0 and s < 1 - eps_low), with
    the bounds rounded to fp32 as the clamp sees them. A = 0 rows are never clipped.
  * ``ratio_mean``, ``kl_mean``: means of s_i and KL_i over GSPO rows (kl_mean = 0 without ref).
  * ``nll_mean``: mean NLL_i over non-empty rows with sd_weight > 0.
  Each is 0 when its row set is empty.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from visioncoach.kernels._backend import Backend, resolve_backend
from visioncoach.kernels._device import store_rounded

__all__ = ["gspo_sd_loss", "gspo_sd_loss_reference"]

_L_CLAMP = 20.0  # bounds exp() of the mean log-ratio: e^20 still fits fp32 times any sane A
_D_CLAMP = 10.0  # bounds the k3 estimator, as TRL/verl do, so one bad token cannot explode KL

# Columns of the per-row fp32 buffer the forward kernel writes [N, _NCOL].
_C_LOSS, _C_RATIO, _C_KL, _C_NLL, _C_CLIP, _C_N, _C_COEF_A, _C_COEF_B = range(8)
_NCOL = 8


# --------------------------------------------------------------------------- reference


def _stats(ratio, kl, nll, clipped, n, gspo_weight, sd_weight):
    """The stats dict from per-row values [N]; masked means, no host sync."""
    nonempty = n > 0
    g_rows = (nonempty & (gspo_weight > 0)).float()
    sd_rows = (nonempty & (sd_weight > 0)).float()
    g_cnt = g_rows.sum().clamp_min(1.0)
    sd_cnt = sd_rows.sum().clamp_min(1.0)
    # where() rather than multiply: rows outside the set may hold huge ratios (gspo_weight 0)
    return {
        "clip_frac": torch.where(g_rows > 0, clipped.float(), 0.0).sum() / g_cnt,
        "ratio_mean": torch.where(g_rows > 0, ratio.float(), 0.0).sum() / g_cnt,
        "kl_mean": torch.where(g_rows > 0, kl.float(), 0.0).sum() / g_cnt,
        "nll_mean": torch.where(sd_rows > 0, nll.float(), 0.0).sum() / sd_cnt,
    }


def gspo_sd_loss_reference(
    logp: torch.Tensor,                 # [N, T] fp32/bf16 (fp64 for ground truth), requires grad
    old_logp: Optional[torch.Tensor],   # [N, T] or None (on-policy)
    ref_logp: Optional[torch.Tensor],   # [N, T] or None (no KL)
    advantages: torch.Tensor,           # [N]
    mask: torch.Tensor,                 # [N, T] bool or float
    gspo_weight: torch.Tensor,          # [N]
    sd_weight: torch.Tensor,            # [N]
    *,
    eps_low: float,
    eps_high: float,
    beta: float,
):
    """Plain-PyTorch GSPO + SD loss, autograd for the backward; the kernel's specification.

    Math in fp32 (fp64 when given fp64, for ground truths). With ``sd_weight = 0`` and
    ``gspo_weight = 1/N`` it equals TRL's ``GRPOTrainer`` with
    ``importance_sampling_level="sequence"`` and ``loss_type="grpo"``:

        loss = (1/N) sum_i (1/|o_i|) sum_t [ -min(s_i A_i, clip(s_i, 1-eps_low, 1+eps_high) A_i)
                                             + beta k3_it ]

    where the sequence ratio s_i is the same for every token of row i, so the per-token mean of
    the surrogate is the surrogate of the row.
    """
    cdt = torch.promote_types(logp.dtype, torch.float32)
    lp = logp.to(cdt)
    m = mask.to(cdt)
    n = m.sum(-1)                                             # [N]
    nonempty = n > 0
    denom = torch.where(nonempty, n, torch.ones_like(n))      # empty rows: 0/1, not 0/0

    def masked_mean(x):
        return (x * m).sum(-1) / denom

    old = lp.detach() if old_logp is None else old_logp.detach().to(cdt)
    A = advantages.detach().to(cdt)
    l = masked_mean(lp - old)
    s = torch.exp(l.clamp(-_L_CLAMP, _L_CLAMP))
    s_clip = s.clamp(1.0 - eps_low, 1.0 + eps_high)
    surr = -torch.min(s * A, s_clip * A)
    per_row = gspo_weight.to(cdt) * surr
    if ref_logp is not None:
        d = (ref_logp.detach().to(cdt) - lp).clamp(-_D_CLAMP, _D_CLAMP)
        kl = masked_mean(torch.exp(d) - d - 1.0)
        per_row = per_row + gspo_weight.to(cdt) * beta * kl
    else:
        kl = torch.zeros_like(l)
    nll = -masked_mean(lp)
    per_row = per_row + sd_weight.to(cdt) * nll
    loss = torch.where(nonempty, per_row, torch.zeros_like(per_row)).sum()  # [] in cdt

    with torch.no_grad():
        clipped = ((A > 0) & (s > s_clip)) | ((A < 0) & (s < s_clip))
        stats = _stats(s, kl, nll, clipped, n, gspo_weight, sd_weight)
    return loss, stats


# --------------------------------------------------------------------------- kernels


@triton.jit
def _gspo_sd_fwd_kernel(
    logp_ptr, old_ptr, ref_ptr, mask_ptr,     # [N, T] contiguous; old/ref are dummies if absent
    adv_ptr, gw_ptr, sdw_ptr,                  # [N] fp32
    rows_ptr,                                  # [N, NCOL] fp32 out
    T,
    lo, hi, beta,                              # lo = 1 - eps_low, hi = 1 + eps_high (fp32)
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr,
    NCOL: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One program per row: the four masked sums in one pass over T, then the row scalars.

    Eq. 1: l = <logp - old>, s = exp(clamp(l, +-20)), surr = -min(sA, clip(s)A),
    KL = <exp(d) - d - 1> with d = clamp(ref - logp, +-10); eq. 2: NLL = -<logp>.
    Writes the row's loss term, stats, and the two backward coefficients
        coef_a = gw dsurr/dl - sdw,   coef_b = gw beta
    so that the backward is d loss / d logp_t = g m_t / n (coef_a - coef_b dk3'_t).
    """
    row = tl.program_id(0).to(tl.int64)  # int64: row * T overflows int32 at large N*T
    base = row * T
    offs = tl.arange(0, BLOCK_T)
    # Vector accumulators, reduced once at the end: fewer reductions and a pairwise-ish sum.
    acc_n = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_dl = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_lp = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_k3 = tl.zeros([BLOCK_T], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs
        inb = t < T
        # fp32 right after the load: bf16 arithmetic is wrong in the interpreter, and the
        # 1e-4-scale log-ratio differences vanish in bf16 anyway.
        m = tl.load(mask_ptr + base + t, mask=inb, other=0.0).to(tl.float32)
        lp = tl.load(logp_ptr + base + t, mask=inb, other=0.0).to(tl.float32)
        acc_n += m
        acc_lp += lp * m
        if HAS_OLD:
            old = tl.load(old_ptr + base + t, mask=inb, other=0.0).to(tl.float32)
            acc_dl += (lp - old) * m
        if HAS_REF:
            ref = tl.load(ref_ptr + base + t, mask=inb, other=0.0).to(tl.float32)
            d = tl.minimum(tl.maximum(ref - lp, -10.0), 10.0)
            acc_k3 += (tl.exp(d) - d - 1.0) * m
    n = tl.sum(acc_n, axis=0)
    nonempty = n > 0.0
    denom = tl.where(nonempty, n, 1.0)
    l = tl.sum(acc_dl, axis=0) / denom          # exactly 0 on-policy: s = 1
    kl = tl.sum(acc_k3, axis=0) / denom
    nll = -tl.sum(acc_lp, axis=0) / denom

    A = tl.load(adv_ptr + row).to(tl.float32)
    gw = tl.load(gw_ptr + row).to(tl.float32)
    sdw = tl.load(sdw_ptr + row).to(tl.float32)

    s = tl.exp(tl.minimum(tl.maximum(l, -20.0), 20.0))
    s_clip = tl.minimum(tl.maximum(s, lo), hi)
    unc = s * A
    clp = s_clip * A
    surr = -tl.minimum(unc, clp)
    clipped = ((A > 0.0) & (s > s_clip)) | ((A < 0.0) & (s < s_clip))

    # d surr / d l, replaying torch's autograd: minimum splits ties in half; clamp with
    # scalar bounds passes the gradient strictly inside only; exp's derivative is s.
    w_unc = tl.where(unc < clp, 1.0, tl.where(unc == clp, 0.5, 0.0))
    in_box = (s > lo) & (s < hi)
    dsurr_ds = -(w_unc * A + (1.0 - w_unc) * tl.where(in_box, A, 0.0))
    in_l = (l > -20.0) & (l < 20.0)
    dsurr_dl = tl.where(in_l, dsurr_ds * s, 0.0)

    loss_row = gw * surr + sdw * nll
    coef_b = 0.0
    if HAS_REF:
        loss_row += gw * beta * kl
        coef_b = gw * beta
    coef_a = gw * dsurr_dl - sdw

    out = rows_ptr + row * NCOL
    tl.store(out + 0, tl.where(nonempty, loss_row, 0.0))
    tl.store(out + 1, s)
    tl.store(out + 2, kl)
    tl.store(out + 3, nll)
    tl.store(out + 4, tl.where(clipped, 1.0, 0.0))
    tl.store(out + 5, n)
    tl.store(out + 6, tl.where(nonempty, coef_a, 0.0))
    tl.store(out + 7, tl.where(nonempty, coef_b, 0.0))


@triton.jit
def _gspo_sd_bwd_kernel(
    grad_out_ptr,                # [] fp32, read on device: no host sync for the upstream grad
    logp_ptr, ref_ptr, mask_ptr,  # [N, T] contiguous; ref is a dummy if absent
    rows_ptr,                    # [N, NCOL] fp32 from the forward
    grad_ptr,                    # [N, T] out, logp's dtype
    T,
    HAS_REF: tl.constexpr, NCOL: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """d loss / d logp_it = g m_it / n_i [gw_i dsurr_i/dl_i - sdw_i - gw_i beta dk3_it],

    since dl_i/dlogp_it = dKL_i/dk3_it = -dNLL_i/dlogp_it = m_it / n_i, and
    dk3/dlogp = -(exp(d) - 1) 1[-10 < ref - logp < 10] (torch.clamp's strict-inside rule).
    Empty rows have coef_a = coef_b = 0 and m = 0, so their gradient is exactly 0.
    """
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    offs = tl.arange(0, BLOCK_T)
    g = tl.load(grad_out_ptr).to(tl.float32)
    n = tl.load(rows_ptr + row * NCOL + 5)
    coef_a = tl.load(rows_ptr + row * NCOL + 6)
    coef_b = tl.load(rows_ptr + row * NCOL + 7)
    scale = g / tl.where(n > 0.0, n, 1.0)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs
        inb = t < T
        m = tl.load(mask_ptr + base + t, mask=inb, other=0.0).to(tl.float32)
        coef = coef_a
        if HAS_REF:
            lp = tl.load(logp_ptr + base + t, mask=inb, other=0.0).to(tl.float32)
            ref = tl.load(ref_ptr + base + t, mask=inb, other=0.0).to(tl.float32)
            x = ref - lp
            inside = (x > -10.0) & (x < 10.0)
            d = tl.minimum(tl.maximum(x, -10.0), 10.0)
            coef = coef_a - coef_b * tl.where(inside, tl.exp(d) - 1.0, 0.0)
        grad = scale * m * coef
        # bf16: to nearest even, NaN kept (the hardware cast on GPU, by hand in the interpreter)
        store_rounded(grad_ptr + base + t, grad, inb)


# --------------------------------------------------------------------------- launchers


def _block_t(T: int) -> int:
    return max(16, min(1024, triton.next_power_of_2(max(T, 1))))


def _fwd(logp, old_logp, ref_logp, advantages, mask, gspo_weight, sd_weight,
         eps_low, eps_high, beta):
    N, T = logp.shape
    logp = logp.contiguous()
    mask = mask.to(torch.float32).contiguous()
    old = old_logp.contiguous() if old_logp is not None else logp  # dummy, never read
    ref = ref_logp.contiguous() if ref_logp is not None else logp
    adv = advantages.to(torch.float32).contiguous()
    gw = gspo_weight.to(torch.float32).contiguous()
    sdw = sd_weight.to(torch.float32).contiguous()
    rows = torch.zeros((N, _NCOL), dtype=torch.float32, device=logp.device)  # [N, 8]
    if N > 0:
        # Bounds rounded from double once here, as torch.clamp rounds its scalar bounds, so the
        # clip decision matches the reference at the fp32 ulp next to 1 + eps_high.
        _gspo_sd_fwd_kernel[(N,)](
            logp, old, ref, mask, adv, gw, sdw, rows, T,
            1.0 - eps_low, 1.0 + eps_high, beta,
            HAS_OLD=old_logp is not None, HAS_REF=ref_logp is not None,
            NCOL=_NCOL, BLOCK_T=_block_t(T),
        )
    # Deterministic: per-row buffer plus a torch sum, no atomics.
    return rows[:, _C_LOSS].sum(), rows


def _bwd(grad_loss, logp, ref_logp, mask, rows):
    N, T = logp.shape
    logp = logp.contiguous()
    mask = mask.to(torch.float32).contiguous()
    ref = ref_logp.contiguous() if ref_logp is not None else logp
    grad = torch.empty_like(logp)                                           # [N, T]
    if N > 0 and T > 0:
        _gspo_sd_bwd_kernel[(N,)](
            grad_loss.to(torch.float32).contiguous(), logp, ref, mask, rows.contiguous(), grad, T,
            HAS_REF=ref_logp is not None, NCOL=_NCOL, BLOCK_T=_block_t(T),
        )
    return grad


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("visioncoach::gspo_sd_loss", mutates_args=())
def _gspo_sd_loss_op(
    logp: torch.Tensor, old_logp: Optional[torch.Tensor], ref_logp: Optional[torch.Tensor],
    advantages: torch.Tensor, mask: torch.Tensor, gspo_weight: torch.Tensor,
    sd_weight: torch.Tensor, eps_low: float, eps_high: float, beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss [] fp32, rows [N, 8] fp32); rows carry stats and backward coefficients."""
    return _fwd(logp, old_logp, ref_logp, advantages, mask, gspo_weight, sd_weight,
                eps_low, eps_high, beta)


@_gspo_sd_loss_op.register_fake
def _(logp, old_logp, ref_logp, advantages, mask, gspo_weight, sd_weight, eps_low, eps_high, beta):
    return (logp.new_empty((), dtype=torch.float32),
            logp.new_empty((logp.shape[0], _NCOL), dtype=torch.float32))


@torch.library.custom_op("visioncoach::gspo_sd_loss_backward", mutates_args=())
def _gspo_sd_loss_backward_op(
    grad_loss: torch.Tensor, logp: torch.Tensor, ref_logp: Optional[torch.Tensor],
    mask: torch.Tensor, rows: torch.Tensor,
) -> torch.Tensor:
    return _bwd(grad_loss, logp, ref_logp, mask, rows)


@_gspo_sd_loss_backward_op.register_fake
def _(grad_loss, logp, ref_logp, mask, rows):
    return torch.empty_like(logp)


def _setup_context(ctx, inputs, output):
    logp, _old, ref_logp, _adv, mask, *_ = inputs
    _loss, rows = output
    ctx.save_for_backward(logp, ref_logp, mask, rows)
    ctx.mark_non_differentiable(rows)


def _backward(ctx, grad_loss, _grad_rows):
    logp, ref_logp, mask, rows = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        # A separate custom op, so torch.compile traces the backward without entering Triton.
        grad = torch.ops.visioncoach.gspo_sd_loss_backward(grad_loss, logp, ref_logp, mask, rows)
    return grad, None, None, None, None, None, None, None, None, None


_gspo_sd_loss_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public


def gspo_sd_loss(
    logp: torch.Tensor,                 # [N, T] fp32/bf16, requires grad
    old_logp: Optional[torch.Tensor],   # [N, T] or None (on-policy)
    ref_logp: Optional[torch.Tensor],   # [N, T] or None (no KL)
    advantages: torch.Tensor,           # [N]
    mask: torch.Tensor,                 # [N, T] bool or float
    gspo_weight: torch.Tensor,          # [N]
    sd_weight: torch.Tensor,            # [N]
    *,
    eps_low: float,
    eps_high: float,
    beta: float,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO + SD loss (VisionCoach eq. 1-2) and its stats; see the module docstring.

    Returns ``(loss, stats)``: loss is a 0-dim fp32 tensor differentiable in ``logp``; stats
    holds 0-dim fp32 ``clip_frac``, ``ratio_mean``, ``kl_mean``, ``nll_mean`` (no host sync).
    """
    tensors = (logp, old_logp, ref_logp, advantages, mask, gspo_weight, sd_weight)
    if resolve_backend(backend, *tensors) == "torch":
        return gspo_sd_loss_reference(logp, old_logp, ref_logp, advantages, mask, gspo_weight,
                                      sd_weight, eps_low=eps_low, eps_high=eps_high, beta=beta)
    if old_logp is not None:
        old_logp = old_logp.detach()
    if ref_logp is not None:
        ref_logp = ref_logp.detach()
    loss, rows = torch.ops.visioncoach.gspo_sd_loss(
        logp, old_logp, ref_logp, advantages.detach(), mask.detach(), gspo_weight.detach(),
        sd_weight.detach(), float(eps_low), float(eps_high), float(beta))
    rows = rows.detach()
    stats = _stats(rows[:, _C_RATIO], rows[:, _C_KL], rows[:, _C_NLL], rows[:, _C_CLIP] > 0,
                   rows[:, _C_N], gspo_weight.detach(), sd_weight.detach())
    return loss, stats
