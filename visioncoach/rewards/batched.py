"""Batched rewards: the fast path used in training (``score``).

Each text is parsed once (``visioncoach.grounding.parse``); each distinct record object is
validated and converted once (rollouts of one prompt share it). Accuracy and format are
string work, done per text in Python (ROUGE cached per distinct (answer, ground truth)).
The temporal (eqs. 5-6) and spatial (eqs. 8/15, 13, 14) rewards are computed for the whole
batch with tensor ops over two layouts:

* ``ClaimBatch`` (``visioncoach.grounding``): claims and predicted times, flat over rollouts.
* ``GroundTruth`` (here): per distinct record, padded.

Segment structure (which rollout, which record, which claim) is carried by index tensors:
per-rollout means are ``index_add_`` sums, per-claim maxima over boxes are
``scatter_reduce(amax)`` over the flat box list derived from ``ClaimBatch.box_count``. This is the seam for Triton kernels (pairwise IoU,
nearest key frame, segment means) and a C++ parser producing ``ClaimBatch`` directly.

Precision: inputs are float32 (parsed numbers are rounded to float32, see
``visioncoach.grounding``); the math runs in ``dtype`` (float64 by default) so that every
comparison (closed intervals, dt <= tau, nearest-frame ties) agrees bit for bit with the
reference. A float32 kernel agrees to ~1e-6 except at exact ties of those comparisons.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from visioncoach.config import RewardConfig
from visioncoach.grounding import (ClaimBatch, Parsed, claim_batch, first_box, first_segment,
                                   normalize_name, option_letter, parse)
from visioncoach.rewards.records import (FREE_FORM_TASKS, MCQ_TASKS, TEMPORAL_SPATIAL_TASK,
                                         Record, convert)
from visioncoach.rewards.reference import (box_iou, check_config, identity_match, rouge,
                                           segment_iou, sigma_at)

__all__ = ["score", "GroundTruth", "ground_truth", "convert_records", "temporal_rewards",
           "spatial_rewards", "pairwise_iou"]

# Bound on claim boxes x GT boxes per IoU block (elements), so 100 kB of claims cannot
# allocate gigabytes.
_IOU_BLOCK = 1 << 22


@dataclass
class GroundTruth:
    """Ground truth of R distinct records, padded. K = key frames with annotated objects
    over all records (record-major, time-sorted within a record, stable for equal times).

    times       [R, Tmax] float32  T^gt (key-frame times, then segment endpoints); 0 pad
    time_mask   [R, Tmax] bool
    segments    [R, Smax, 2] float32  S^gt, s <= e; 0 pad
    seg_mask    [R, Smax] bool
    frame_of    [R, Kmax] int64    global key-frame index of the record's k-th frame, -1 pad
    frame_time  [K] float32
    frame_boxes [K, P, 4] float32  GT boxes in frame pixels, x1 <= x2, y1 <= y2; 0 pad
    box_obj     [K, P] int64       object slot (0 .. Omax-1) of each box in its frame, -1 pad
    obj_name    [K, Omax] int64    index into ``names`` of each object slot, -1 pad
    obj_count   [K] int64          objects in the frame (>= 1)
    names       normalized GT object names, deduplicated
    Tmax, Smax, Kmax, P, Omax are >= 1 so reductions over them never see an empty axis.
    """
    times: torch.Tensor
    time_mask: torch.Tensor
    segments: torch.Tensor
    seg_mask: torch.Tensor
    frame_of: torch.Tensor
    frame_time: torch.Tensor
    frame_boxes: torch.Tensor
    box_obj: torch.Tensor
    obj_name: torch.Tensor
    obj_count: torch.Tensor
    names: list[str]


def _pad(rows: list[list], width: int, fill) -> list[list]:
    return [r + [fill] * (width - len(r)) for r in rows]


def ground_truth(records: Sequence[Record], device: torch.device | str = "cpu") -> GroundTruth:
    """Pack converted records (one Python pass over their annotations)."""
    t_max = max([len(r.gt_times) for r in records] + [1])
    s_max = max([len(r.segments) for r in records] + [1])
    k_max = max([len(r.frames) for r in records] + [1])
    name_ids: dict[str, int] = {}
    frame_of, frame_time, frame_boxes, box_obj, obj_name, obj_count = [], [], [], [], [], []
    for rec in records:
        ids = []
        for kf in rec.frames:
            ids.append(len(frame_time))
            frame_time.append(kf.time)
            obj_count.append(len(kf.names))
            obj_name.append([name_ids.setdefault(normalize_name(n), len(name_ids)) for n in kf.names])
            frame_boxes.append([list(b) for boxes in kf.boxes for b in boxes])
            box_obj.append([o for o, boxes in enumerate(kf.boxes) for _ in boxes])
        frame_of.append(ids)
    p_max = max([len(b) for b in box_obj] + [1])
    o_max = max(obj_count + [1])
    f32 = dict(dtype=torch.float32, device=device)
    i64 = dict(dtype=torch.int64, device=device)
    return GroundTruth(
        times=torch.tensor(_pad([r.gt_times for r in records], t_max, 0.0), **f32).reshape(-1, t_max),
        time_mask=torch.tensor(_pad([[True] * len(r.gt_times) for r in records], t_max, False),
                               dtype=torch.bool, device=device).reshape(-1, t_max),
        segments=torch.tensor(_pad([[list(s) for s in r.segments] for r in records], s_max, [0.0, 0.0]),
                              **f32).reshape(-1, s_max, 2),
        seg_mask=torch.tensor(_pad([[True] * len(r.segments) for r in records], s_max, False),
                              dtype=torch.bool, device=device).reshape(-1, s_max),
        frame_of=torch.tensor(_pad(frame_of, k_max, -1), **i64).reshape(-1, k_max),
        frame_time=torch.tensor(frame_time, **f32),
        frame_boxes=torch.tensor(_pad(frame_boxes, p_max, [0.0] * 4), **f32).reshape(-1, p_max, 4),
        box_obj=torch.tensor(_pad(box_obj, p_max, -1), **i64).reshape(-1, p_max),
        obj_name=torch.tensor(_pad(obj_name, o_max, -1), **i64).reshape(-1, o_max),
        obj_count=torch.tensor(obj_count, **i64),
        names=list(name_ids),
    )


def convert_records(samples: Sequence[Mapping]) -> tuple[list[Record], list[int]]:
    """Distinct records (by object identity: the G rollouts of a prompt share one) and, for
    each sample, the index of its record."""
    seen: dict[int, int] = {}
    records: list[Record] = []
    index: list[int] = []
    for i, s in enumerate(samples):
        k = id(s)
        if k not in seen:
            seen[k] = len(records)
            records.append(convert(s, i))
        index.append(seen[k])
    return records, index


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of ordered xyxy boxes broadcast over leading dims ([..., 4] each -> [...]);
    continuous, 0 when either box has zero area (as ``reference.box_iou``)."""
    wa, ha = a[..., 2] - a[..., 0], a[..., 3] - a[..., 1]
    wb, hb = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = iw * ih
    union = wa * ha + wb * hb - inter
    ok = (wa > 0) & (ha > 0) & (wb > 0) & (hb > 0) & (union > 0)
    return torch.where(ok, inter / torch.where(ok, union, torch.ones_like(union)),
                       torch.zeros_like(inter)).clamp(max=1.0)


def _segment_mean(values: torch.Tensor, seg: torch.Tensor, weight: torch.Tensor, n: int) -> torch.Tensor:
    """sum(values) / sum(weight) per segment id ``seg`` in [0, n); 0 where the weight is 0."""
    num = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, seg, values)
    den = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, seg, weight.to(values.dtype))
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))


def temporal_rewards(cb: ClaimBatch, gt: GroundTruth, rollout_record: torch.Tensor, sigma: float,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """r_tmp per rollout [N] (eqs. 5-6), see ``reference.temporal_reward``."""
    n = cb.n_rollouts
    if cb.times.numel() == 0:
        return torch.zeros(n, dtype=dtype, device=cb.times.device)
    q = rollout_record[cb.time_rollout]                                  # [M] record of each time
    t = cb.times.to(dtype)[:, None]                                      # [M, 1]
    g_mask = gt.time_mask[q]                                             # [M, Tmax]
    dt = torch.where(g_mask, (t - gt.times[q].to(dtype)).abs(),
                     torch.full_like(t, float("inf"))).amin(1)           # [M] distance to T^gt
    seg = gt.segments[q].to(dtype)                                       # [M, Smax, 2]
    inside = (gt.seg_mask[q] & (seg[..., 0] <= t) & (t <= seg[..., 1])).any(1)   # closed [s, e]
    r_m = torch.where(inside, torch.ones_like(dt), torch.exp(-(dt * dt) / (2.0 * sigma * sigma)))
    has_gt = g_mask.any(1)
    r_m = torch.where(has_gt, r_m, torch.zeros_like(r_m))
    # All times of a rollout share its record, so "no T^gt" zeroes the whole rollout.
    return _segment_mean(r_m, cb.time_rollout, torch.ones_like(r_m), n)


def _name_match(pred_ids: torch.Tensor, gt_ids: torch.Tensor, pred_names: list[str],
                gt_names: list[str], identity: str) -> torch.Tensor:
    """I(o_m, o) for index pairs (same shapes; gt_ids >= 0): strings compared once per
    distinct (pred name, GT name) pair."""
    keys = pred_ids * len(gt_names) + gt_ids
    uniq, inverse = torch.unique(keys, return_inverse=True)
    ng = len(gt_names)
    table = [identity_match(pred_names[k // ng], gt_names[k % ng], identity) for k in uniq.tolist()]
    return torch.tensor(table, dtype=torch.bool, device=keys.device)[inverse]


def spatial_rewards(cb: ClaimBatch, gt: GroundTruth, rollout_record: torch.Tensor, tau: float,
                    mode: str, identity: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """r_spa per rollout [N]: object_aware (eqs. 7-8, 15), max (eq. 13) or avg (eq. 14); see
    ``reference.spatial_reward`` for the definitions."""
    n = cb.n_rollouts
    device = cb.claim_t.device
    n_claims = cb.claim_t.numel()
    if n_claims == 0 or gt.frame_time.numel() == 0:
        return torch.zeros(n, dtype=dtype, device=device)

    # Nearest annotated key frame t~_m of each claim; frames are time-sorted within a record,
    # so the first minimal slot is the earlier frame on ties.
    q = rollout_record[cb.claim_rollout]                                 # [C]
    cand = gt.frame_of[q]                                                # [C, Kmax]
    c_mask = cand >= 0
    k_max = cand.shape[1]
    t = cb.claim_t.to(dtype)
    f_t = gt.frame_time.to(dtype)[cand.clamp(min=0)]                     # [C, Kmax]
    dist = torch.where(c_mask, (t[:, None] - f_t).abs(), torch.full_like(f_t, float("inf")))
    d_min = dist.amin(1)                                                 # [C] dt_m
    slots = torch.arange(k_max, device=device)
    slot = torch.where(c_mask & (dist == d_min[:, None]), slots, k_max).amin(1).clamp(max=k_max - 1)
    frame = cand.gather(1, slot[:, None]).squeeze(1).clamp(min=0)        # [C] global frame
    gate = c_mask.any(1) & (d_min <= tau)                                # [C] 1[dt_m <= tau]

    # IoU over the flat list of claim boxes (not the padded [C, Bmax] grid: one claim with
    # thousands of boxes must not multiply the work of every other claim).
    row = torch.repeat_interleave(torch.arange(n_claims, device=device), cb.box_count)   # [Btot] claim
    col = torch.arange(row.numel(), device=device) - (torch.cumsum(cb.box_count, 0) - cb.box_count)[row]
    flat = cb.boxes[row, col].to(dtype)                                  # [Btot, 4]
    o_max, p_max = gt.obj_name.shape[1], gt.frame_boxes.shape[1]
    best_obj = torch.zeros(n_claims, o_max + 1, dtype=dtype, device=device)  # max IoU vs each object
    score_max = torch.zeros(n_claims, dtype=dtype, device=device)        # eq. 13 term
    score_avg = torch.zeros(n_claims, dtype=dtype, device=device)        # eq. 14 term
    step = max(1, _IOU_BLOCK // (p_max + o_max + 1))
    for lo in range(0, row.numel(), step):
        hi = min(row.numel(), lo + step)
        f = frame[row[lo:hi]]                                            # [b] frame of each box's claim
        g_obj = gt.box_obj[f]                                            # [b, P]
        iou = pairwise_iou(flat[lo:hi, None, :], gt.frame_boxes[f].to(dtype))   # [b, P]
        # IoU >= 0, so zeros for padding never win a max.
        iou = torch.where(g_obj >= 0, iou, torch.zeros_like(iou))
        # Max over each GT object's boxes: [b, Omax + 1], padded GT boxes land in the spare
        # last slot, which is dropped.
        per_obj = torch.zeros(hi - lo, o_max + 1, dtype=dtype, device=device).scatter_reduce(
            1, torch.where(g_obj >= 0, g_obj, o_max), iou, "amax")
        per_obj[:, o_max] = 0
        claims_of = row[lo:hi]
        # Segment maxima over each claim's boxes.
        best_obj.scatter_reduce_(0, claims_of[:, None].expand(-1, o_max + 1), per_obj, "amax")
        score_max.scatter_reduce_(0, claims_of, iou.amax(1), "amax")
        score_avg.scatter_reduce_(0, claims_of, per_obj.sum(1) / gt.obj_count[f].to(dtype), "amax")
    best_obj = best_obj[:, :o_max]

    if mode == "object_aware":
        names = gt.obj_name[frame]                                       # [C, Omax]
        o_ok = names >= 0
        if identity == "none":
            match = o_ok
        else:
            match = o_ok & _name_match(cb.claim_obj[:, None].expand_as(names), names.clamp(min=0),
                                       cb.names, gt.names, identity)
        n_match = match.sum(1)
        valid = gate & (n_match > 0)                                     # m in I
        claim_score = torch.where(match, best_obj, torch.zeros_like(best_obj)).sum(1) / n_match.clamp(min=1)
        return _segment_mean(torch.where(valid, claim_score, torch.zeros_like(claim_score)),
                             cb.claim_rollout, valid, n)
    claim_score = score_max if mode == "max" else score_avg
    return _segment_mean(torch.where(gate, claim_score, torch.zeros_like(claim_score)),
                         cb.claim_rollout, torch.ones_like(claim_score), n)


def _accuracy(parsed: Sequence[Parsed], records: Sequence[Record], index: Sequence[int]) -> list[float]:
    rouge_cache: dict[tuple[str, str], float] = {}
    out = []
    for p, r in zip(parsed, index):
        rec, answer = records[r], p.answer
        value = 0.0
        if answer is None:
            pass
        elif rec.task in MCQ_TASKS:
            letter = option_letter(answer)
            value = 1.0 if letter is not None and letter == rec.gt_letter else 0.0
        elif rec.task in FREE_FORM_TASKS:
            key = (answer, rec.answer)
            if key not in rouge_cache:
                rouge_cache[key] = rouge(answer, rec.answer)
            value = rouge_cache[key]
        elif rec.task == "temporal QA":
            pred = first_segment(answer)
            if pred is not None and rec.segments:
                value = max(segment_iou(pred, s) for s in rec.segments)
        elif rec.task == "visual QA":
            pred = first_box(answer)
            if pred is not None and rec.gt_box is not None:
                value = box_iou(pred, rec.gt_box)
        out.append(value)
    return out


def score(texts: Sequence[str], samples: Sequence[Mapping], cfg: RewardConfig, progress: float = 0.0,
          *, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Rewards of eq. 4 for each text: {accuracy, format, temporal, spatial, total}, each
    float32 [len(texts)]; ``samples[i]`` is the record of ``texts[i]``. Equals
    ``reference.score_reference`` (to ~1e-7)."""
    if len(texts) != len(samples):
        raise ValueError(f"{len(texts)} texts but {len(samples)} samples")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"text {i} must be a str, got {type(t).__name__}")
    records, index = convert_records(samples)
    sigma = sigma_at(progress, cfg.sigma)
    check_config(cfg, sigma)
    parsed = [parse(t) for t in texts]

    acc = torch.tensor(_accuracy(parsed, records, index), dtype=torch.float32)
    fmt = torch.tensor([1.0 if not p.errors and (records[r].task != TEMPORAL_SPATIAL_TASK or p.claims)
                        else 0.0 for p, r in zip(parsed, index)], dtype=torch.float32)
    cb = claim_batch(parsed).to(device)
    gt = ground_truth(records, device)
    rollout_record = torch.tensor(index, dtype=torch.int64, device=device)
    tmp = temporal_rewards(cb, gt, rollout_record, sigma).to(torch.float32).cpu()
    spa = spatial_rewards(cb, gt, rollout_record, cfg.tau, cfg.spatial_mode, cfg.identity).to(torch.float32).cpu()
    out = {"accuracy": acc, "format": fmt, "temporal": tmp, "spatial": spa}
    out["total"] = acc + fmt + tmp + spa
    return {k: v.to(device) for k, v in out.items()}
