"""Spatial-reward core: nearest key frame and claim-box x ground-truth-box IoU maxima, batched.

For every grounding claim m (object o_m, time t_m, boxes b_m1..b_mB) of every rollout, with the
ground truth of its rollout's record (key frames k with time tau_k, GT boxes g each belonging
to one object slot of its frame), one program computes (VisionCoach eqs. 7-8, 13-15):

    t~_m   = argmin_k |t_m - tau_k|        over the record's annotated key frames, earlier on ties
    dt_m   = |t_m - tau_{t~_m}|            (the temporal gate is dt_m <= tau)
    best_mo = max_b max_{g in o} IoU(b_mb, g)                 per GT object o at t~_m  (eq. 8/15)
    max_m   = max_b max_g IoU(b_mb, g)                        (eq. 13)
    avg_m   = max_b (1/|O(t~_m)|) sum_o max_{g in o} IoU(b_mb, g)   (eq. 14, best box)

IoU is continuous (no +1 pixel) and 0 when either box has zero area. Identity matching,
gating and the per-rollout means are cheap [C]-sized tensor ops left to the caller
(``visioncoach.rewards.batched``). ``claim_iou_reference`` is the plain PyTorch version.

Layout (all contiguous; C claims, Bmax boxes per claim, R records, Kmax key frames per record,
K frames in all, P GT boxes per frame, O object slots per frame):
    claim_t [C] f32, claim_record [C] i64, boxes [C, Bmax, 4] f32 (x1<=x2, y1<=y2),
    box_count [C] i64, frame_of [R, Kmax] i64 (global frame id, -1 pad, time-sorted),
    frame_time [K] f32, frame_boxes [K, P, 4] f32, box_obj [K, P] i64 (slot, -1 pad),
    obj_count [K] i64 (>= 1).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from visioncoach.kernels._backend import Backend, resolve_backend

__all__ = ["ClaimIoU", "claim_iou", "claim_iou_reference", "pairwise_iou"]


class ClaimIoU(NamedTuple):
    frame: torch.Tensor      # [C] i64 global key frame t~_m, -1 when the record has none
    dt: torch.Tensor         # [C] f32 |t_m - t~_m|, inf when the record has no key frame
    best_obj: torch.Tensor   # [C, O] f32 best IoU against each object slot of t~_m (0 pad)
    score_max: torch.Tensor  # [C] f32 eq. 13 term (ungated)
    score_avg: torch.Tensor  # [C] f32 eq. 14 term (ungated)


def pairwise_iou(a, b):
    """[..., 4] x [..., 4] -> [...] continuous IoU, 0 for zero-area boxes (fp32)."""
    wa, ha = a[..., 2] - a[..., 0], a[..., 3] - a[..., 1]
    wb, hb = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = iw * ih
    union = wa * ha + wb * hb - inter
    ok = (wa > 0) & (ha > 0) & (wb > 0) & (hb > 0) & (union > 0)
    return torch.where(ok, inter / torch.where(ok, union, torch.ones_like(union)), 0.0).clamp(max=1.0)


def claim_iou_reference(claim_t, claim_record, boxes, box_count, frame_of, frame_time,
                        frame_boxes, box_obj, obj_count, n_obj: int) -> ClaimIoU:
    """Plain PyTorch specification (materialises [C, Bmax, P, O]; fine for tests)."""
    C, Bmax = boxes.shape[:2]
    dev = boxes.device
    cand = frame_of[claim_record]                                         # [C, Kmax]
    has = cand >= 0
    ft = frame_time[cand.clamp(min=0)]                                    # [C, Kmax]
    dist = torch.where(has, (claim_t[:, None] - ft).abs(), torch.inf)     # [C, Kmax]
    dt = dist.amin(1) if dist.shape[1] else torch.full((C,), torch.inf, device=dev)
    kmax = cand.shape[1]
    slot = torch.where(has & (dist == dt[:, None]), torch.arange(kmax, device=dev), kmax).amin(1)
    frame = torch.where(has.any(1), cand.gather(1, slot.clamp(max=kmax - 1)[:, None])[:, 0], -1)
    f = frame.clamp(min=0)
    gt = frame_boxes[f]                                                   # [C, P, 4]
    g_obj = torch.where(frame[:, None] >= 0, box_obj[f], -1)              # [C, P]
    iou = pairwise_iou(boxes[:, :, None, :], gt[:, None, :, :])                   # [C, Bmax, P]
    b_ok = torch.arange(Bmax, device=dev)[None, :] < box_count[:, None]   # [C, Bmax]
    iou = torch.where(b_ok[:, :, None] & (g_obj[:, None, :] >= 0), iou, 0.0)
    onehot = g_obj[:, :, None] == torch.arange(n_obj, device=dev)         # [C, P, O]
    per_obj = torch.where(onehot[:, None], iou[..., None], 0.0).amax(2) if gt.shape[1] else \
        torch.zeros(C, Bmax, n_obj, device=dev)                           # [C, Bmax, O]
    best_obj = per_obj.amax(1) if Bmax else torch.zeros(C, n_obj, device=dev)
    score_max = best_obj.amax(1) if n_obj else torch.zeros(C, device=dev)
    cnt = obj_count[f].to(torch.float32)
    avg_b = torch.where(b_ok, per_obj.sum(2) / cnt[:, None], 0.0)          # [C, Bmax]
    score_avg = torch.where(frame >= 0, avg_b.amax(1) if Bmax else 0.0, 0.0)
    return ClaimIoU(frame, dt.to(torch.float32), best_obj, score_max, score_avg)


@triton.jit
def _claim_iou_kernel(
    claim_t_ptr, claim_rec_ptr, boxes_ptr, box_count_ptr,        # per claim
    frame_of_ptr, frame_time_ptr, frame_boxes_ptr, box_obj_ptr, obj_count_ptr,
    frame_out_ptr, dt_out_ptr, best_obj_ptr, score_max_ptr, score_avg_ptr,
    Bmax, Kmax, P, O,
    BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """One program per claim: nearest key frame (strict < scan over time-sorted slots keeps the
    earlier frame on ties), then IoU of each of the claim's boxes (tiles of BLOCK_B) against the
    frame's GT boxes, max-reduced per object slot (eqs. 8/15), over all slots (eq. 13) and
    averaged over slots per box then maxed over boxes (eq. 14)."""
    c = tl.program_id(0).to(tl.int64)
    t = tl.load(claim_t_ptr + c).to(tl.float32)
    rec = tl.load(claim_rec_ptr + c)
    best_d = tl.full([], float("inf"), tl.float32)
    frame = tl.full([], -1, tl.int64)
    for k in range(Kmax):
        fk = tl.load(frame_of_ptr + rec * Kmax + k).to(tl.int64)
        tk = tl.load(frame_time_ptr + tl.maximum(fk, 0)).to(tl.float32)
        d = tl.abs(t - tk)
        take = (fk >= 0) & (d < best_d)
        best_d = tl.where(take, d, best_d)
        frame = tl.where(take, fk, frame)
    tl.store(frame_out_ptr + c, frame)
    tl.store(dt_out_ptr + c, best_d)

    f = tl.maximum(frame, 0).to(tl.int64)
    has_frame = frame >= 0
    n_box = tl.load(box_count_ptr + c)
    cnt = tl.maximum(tl.load(obj_count_ptr + f), 1).to(tl.float32)
    offs_o = tl.arange(0, BLOCK_O)
    best_o = tl.zeros([BLOCK_O], dtype=tl.float32)
    s_avg = tl.zeros([], dtype=tl.float32)
    for b0 in range(0, Bmax, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        b_ok = (offs_b < n_box) & has_frame
        base = boxes_ptr + (c * Bmax + offs_b) * 4
        ax1 = tl.load(base + 0, mask=b_ok, other=0.0).to(tl.float32)
        ay1 = tl.load(base + 1, mask=b_ok, other=0.0).to(tl.float32)
        ax2 = tl.load(base + 2, mask=b_ok, other=0.0).to(tl.float32)
        ay2 = tl.load(base + 3, mask=b_ok, other=0.0).to(tl.float32)
        wa = ax2 - ax1
        ha = ay2 - ay1
        acc = tl.zeros([BLOCK_B, BLOCK_O], dtype=tl.float32)      # best IoU per (box, object)
        for p in range(P):
            obj = tl.load(box_obj_ptr + f * P + p)
            g = frame_boxes_ptr + (f * P + p) * 4
            gx1 = tl.load(g + 0).to(tl.float32)
            gy1 = tl.load(g + 1).to(tl.float32)
            gx2 = tl.load(g + 2).to(tl.float32)
            gy2 = tl.load(g + 3).to(tl.float32)
            iw = tl.maximum(tl.minimum(ax2, gx2) - tl.maximum(ax1, gx1), 0.0)
            ih = tl.maximum(tl.minimum(ay2, gy2) - tl.maximum(ay1, gy1), 0.0)
            inter = iw * ih
            union = wa * ha + (gx2 - gx1) * (gy2 - gy1) - inter
            # A zero-area box (ordered corners) has iw or ih exactly 0, so inter = 0 and the
            # IoU is 0 without a separate area test; only an empty union needs guarding.
            pos = union > 0.0
            iou = tl.where(pos, inter / tl.where(pos, union, 1.0), 0.0)
            iou = tl.where(b_ok, tl.minimum(iou, 1.0), 0.0)
            hit = offs_o[None, :] == obj                           # the slot of this GT box (-1: none)
            acc = tl.where(hit, tl.maximum(acc, iou[:, None]), acc)
        best_o = tl.maximum(best_o, tl.max(acc, axis=0))
        avg_b = tl.where(b_ok, tl.sum(acc, axis=1) / cnt, 0.0)
        s_avg = tl.maximum(s_avg, tl.max(avg_b, axis=0))
    tl.store(best_obj_ptr + c * O + offs_o, best_o, mask=offs_o < O)
    tl.store(score_max_ptr + c, tl.max(best_o, axis=0))
    tl.store(score_avg_ptr + c, s_avg)


@torch.library.custom_op("visioncoach::claim_iou", mutates_args=())
def _claim_iou_op(claim_t: torch.Tensor, claim_record: torch.Tensor, boxes: torch.Tensor,
                  box_count: torch.Tensor, frame_of: torch.Tensor, frame_time: torch.Tensor,
                  frame_boxes: torch.Tensor, box_obj: torch.Tensor, obj_count: torch.Tensor,
                  n_obj: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    C, Bmax = boxes.shape[:2]
    dev = boxes.device
    frame = torch.empty(C, dtype=torch.int64, device=dev)
    dt = torch.empty(C, dtype=torch.float32, device=dev)
    best_obj = torch.zeros(C, n_obj, dtype=torch.float32, device=dev)
    score_max = torch.empty(C, dtype=torch.float32, device=dev)
    score_avg = torch.empty(C, dtype=torch.float32, device=dev)
    if C:
        _claim_iou_kernel[(C,)](
            claim_t.contiguous(), claim_record.contiguous(), boxes.contiguous(), box_count.contiguous(),
            frame_of.contiguous(), frame_time.contiguous(), frame_boxes.contiguous(),
            box_obj.contiguous(), obj_count.contiguous(),
            frame, dt, best_obj, score_max, score_avg,
            Bmax, frame_of.shape[1], frame_boxes.shape[1], n_obj,
            BLOCK_B=max(2, min(64, triton.next_power_of_2(max(Bmax, 1)))),
            BLOCK_O=max(2, triton.next_power_of_2(max(n_obj, 1))),
        )
    return frame, dt, best_obj, score_max, score_avg


@_claim_iou_op.register_fake
def _(claim_t, claim_record, boxes, box_count, frame_of, frame_time, frame_boxes, box_obj,
      obj_count, n_obj):
    C = boxes.shape[0]
    f32 = dict(dtype=torch.float32, device=boxes.device)
    return (boxes.new_empty(C, dtype=torch.int64), boxes.new_empty(C, **f32),
            boxes.new_empty(C, n_obj, **f32), boxes.new_empty(C, **f32), boxes.new_empty(C, **f32))


def claim_iou(claim_t, claim_record, boxes, box_count, frame_of, frame_time, frame_boxes, box_obj,
              obj_count, n_obj: int, *, backend: Backend = "auto") -> ClaimIoU:
    """Nearest key frame and IoU maxima of every claim (see the module docstring)."""
    if frame_boxes.shape[0] == 0 or frame_of.shape[1] == 0:
        # No annotated frame anywhere: every claim is ungrounded.
        C = boxes.shape[0]
        z = torch.zeros(C, dtype=torch.float32, device=boxes.device)
        return ClaimIoU(torch.full((C,), -1, dtype=torch.int64, device=boxes.device),
                        torch.full_like(z, torch.inf), z.new_zeros(C, n_obj), z, z.clone())
    if resolve_backend(backend, boxes) == "torch":
        return claim_iou_reference(claim_t, claim_record, boxes, box_count, frame_of, frame_time,
                                   frame_boxes, box_obj, obj_count, n_obj)
    return ClaimIoU(*torch.ops.visioncoach.claim_iou(
        claim_t.float(), claim_record, boxes.float(), box_count, frame_of, frame_time.float(),
        frame_boxes.float(), box_obj, obj_count, n_obj))
