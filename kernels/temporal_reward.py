"""Temporal grounding reward per predicted timestamp (VisionCoach eqs. 5-6), batched.

For every predicted time t_m (every valid ``<t>`` in a rollout's think), with its record's
ground-truth times T^gt (key-frame times and segment endpoints) and segments S^gt:

    r_m = 1                                   if s_l <= t_m <= e_l for some segment (closed)
        = exp(-dt_m^2 / (2 sigma^2))          otherwise, dt_m = min_{t in T^gt} |t_m - t|
        = 0                                   if the record has no ground-truth time

and the rollout's reward is the mean of its r_m (eq. 5), a segment mean left to the caller
(``index_add_``; no host sync). ``temporal_point_reward_reference`` is the plain PyTorch version.

Layout: times [M] f32, time_record [M] i64 (record of each time), gt_times [R, Tmax] f32,
time_mask [R, Tmax] bool, segments [R, Smax, 2] f32 (s <= e), seg_mask [R, Smax] bool.

Precision: the kernel forms the same fp32 argument as the reference and takes libdevice's expf
(``_device.accurate_exp``, 2 ulp) on GPU, so it is within 3 ulp of torch's exp (1 ulp) there;
results below the smallest normal fp32 (2^-126) may be flushed to zero (Triton links libdevice
with flush-to-zero).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from visioncoach.kernels._backend import Backend, resolve_backend
from visioncoach.kernels._device import accurate_exp

__all__ = ["temporal_point_reward", "temporal_point_reward_reference"]


def temporal_point_reward_reference(times, time_record, gt_times, time_mask, segments, seg_mask,
                                    sigma: float) -> torch.Tensor:
    """[M] f32 r_m, plain PyTorch (the specification)."""
    t = times.float()[:, None]                                            # [M, 1]
    g_ok = time_mask[time_record]                                         # [M, Tmax]
    dt = torch.where(g_ok, (t - gt_times[time_record].float()).abs(), torch.inf).amin(1) \
        if gt_times.shape[1] else torch.full((times.shape[0],), torch.inf, device=times.device)
    seg = segments[time_record].float()                                   # [M, Smax, 2]
    inside = (seg_mask[time_record] & (seg[..., 0] <= t) & (t <= seg[..., 1])).any(1)
    gauss = torch.exp(-(dt * dt) / (2.0 * sigma * sigma))
    r = torch.where(inside, 1.0, gauss)
    return torch.where(g_ok.any(1) if gt_times.shape[1] else torch.zeros_like(inside), r, 0.0)


@triton.jit
def _temporal_point_reward_kernel(
    times_ptr, rec_ptr, gt_times_ptr, time_mask_ptr, seg_ptr, seg_mask_ptr, out_ptr,
    M, Tmax, Smax, inv_two_sigma_sq,
    BLOCK_M: tl.constexpr,
):
    """BLOCK_M predicted times per program: nearest ground-truth time and closed-interval
    membership by scanning the record's (short) padded lists, then eq. 6."""
    offs = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = offs < M
    t = tl.load(times_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    rec = tl.load(rec_ptr + offs, mask=ok, other=0).to(tl.int64)
    dt = tl.full([BLOCK_M], float("inf"), tl.float32)
    has_gt = tl.zeros([BLOCK_M], dtype=tl.int1)
    for j in range(Tmax):
        valid = tl.load(time_mask_ptr + rec * Tmax + j, mask=ok, other=0) != 0
        g = tl.load(gt_times_ptr + rec * Tmax + j, mask=ok, other=0.0).to(tl.float32)
        dt = tl.where(valid, tl.minimum(dt, tl.abs(t - g)), dt)
        has_gt = has_gt | valid
    inside = tl.zeros([BLOCK_M], dtype=tl.int1)
    for j in range(Smax):
        valid = tl.load(seg_mask_ptr + rec * Smax + j, mask=ok, other=0) != 0
        s = tl.load(seg_ptr + (rec * Smax + j) * 2, mask=ok, other=0.0).to(tl.float32)
        e = tl.load(seg_ptr + (rec * Smax + j) * 2 + 1, mask=ok, other=0.0).to(tl.float32)
        inside = inside | (valid & (s <= t) & (t <= e))
    # libdevice's expf (2 ulp), not tl.exp's ex2.approx of x log2 e, whose error grows with |x|:
    # the reward is tiny work (a few hundred times per step), so it may as well match torch.
    gauss = accurate_exp(-(dt * dt) * inv_two_sigma_sq)
    r = tl.where(inside, 1.0, gauss)
    tl.store(out_ptr + offs, tl.where(has_gt, r, 0.0), mask=ok)


@torch.library.custom_op("visioncoach::temporal_point_reward", mutates_args=())
def _temporal_op(times: torch.Tensor, time_record: torch.Tensor, gt_times: torch.Tensor,
                 time_mask: torch.Tensor, segments: torch.Tensor, seg_mask: torch.Tensor,
                 sigma: float) -> torch.Tensor:
    M = times.shape[0]
    out = torch.empty(M, dtype=torch.float32, device=times.device)
    if M:
        BLOCK_M = 128
        _temporal_point_reward_kernel[(triton.cdiv(M, BLOCK_M),)](
            times.contiguous(), time_record.contiguous(), gt_times.contiguous(),
            time_mask.to(torch.uint8).contiguous(), segments.contiguous(),
            seg_mask.to(torch.uint8).contiguous(), out, M, gt_times.shape[1], segments.shape[1],
            1.0 / (2.0 * sigma * sigma), BLOCK_M=BLOCK_M)
    return out


@_temporal_op.register_fake
def _(times, time_record, gt_times, time_mask, segments, seg_mask, sigma):
    return times.new_empty(times.shape[0], dtype=torch.float32)


def temporal_point_reward(times, time_record, gt_times, time_mask, segments, seg_mask,
                          sigma: float, *, backend: Backend = "auto") -> torch.Tensor:
    """r_m of every predicted time [M] f32 (see the module docstring)."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if resolve_backend(backend, times) == "torch":
        return temporal_point_reward_reference(times, time_record, gt_times, time_mask, segments,
                                               seg_mask, sigma)
    return torch.ops.visioncoach.temporal_point_reward(
        times.float(), time_record, gt_times.float(), time_mask, segments.float(), seg_mask,
        float(sigma))
