"""Batched rewards: the fast path used in training (``score``).

The batch is parsed once by the front-end ``visioncoach.grounding.parse_texts``: the C++ op
(csrc/grounding.cpp) by default, the per-text Python ``parse`` as fallback (``FRONTEND`` or
``score(frontend=...)``). It yields the claims, the predicted times, each text's answer span
and error count, so format is a tensor expression and accuracy the only per-text string work
(option letter, first segment or box of the answer; ROUGE once per distinct (answer,
ground truth), all pairs in one ``rewards.rouge.rouge_batch`` call). Each distinct record
object is validated and converted once (rollouts of one prompt share it). The temporal
(eqs. 5-6) and spatial (eqs. 8/15, 13, 14) rewards are computed for the whole batch with
tensor ops over two layouts:

* ``ClaimBatch`` (``visioncoach.grounding``): claims and predicted times, flat over rollouts.
* ``GroundTruth`` (here): per distinct record, padded.

Segment structure (which rollout, which record, which claim) is carried by index tensors:
per-rollout means are ``index_add_`` sums, per-claim maxima over boxes are
``scatter_reduce(amax)`` over the flat box list derived from ``ClaimBatch.box_count``. This
is the seam for Triton kernels (pairwise IoU, nearest key frame, segment means). Identity
(eq. 7) is one [distinct predicted names, distinct GT names] matrix, from the C++ op
``visioncoach::identity_match`` with the native front-end.

Precision: inputs are float32 (parsed numbers are rounded to float32, see
``visioncoach.grounding``); the math runs in ``dtype`` (float64 by default) so that every
comparison (closed intervals, dt <= tau, nearest-frame ties) agrees bit for bit with the
reference. A float32 kernel agrees to ~1e-6 except at exact ties of those comparisons.
"""

from __future__ import annotations

import array
import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, repeat

import numpy as np

import torch

from visioncoach.kernels import resolve_backend
from visioncoach.kernels.claim_iou import claim_iou, pairwise_iou  # the one IoU formula (eqs. 8, 13-15)
from visioncoach.kernels.temporal_reward import temporal_point_reward

from visioncoach.config import RewardConfig
# _BOX_IN_TEXT / _SEGMENT_IN_TEXT: the patterns of first_box / first_segment (one definition)
from visioncoach.grounding import (_BOX_IN_TEXT, _SEGMENT_IN_TEXT, BACKENDS, ClaimBatch,
                                   answer_letter, normalize_name, parse_texts)
from visioncoach.rewards.components import ACCURACY, FORMAT, SPATIAL, TEMPORAL, TOTAL
from visioncoach.rewards.records import (FREE_FORM_TASKS, MCQ_TASKS, TEMPORAL_SPATIAL_TASK,
                                         Record, convert_many)
from visioncoach.rewards.reference import check_config, identity_match, sigma_at
from visioncoach.rewards.rouge import rouge_batch

try:
    from visioncoach import ops
except ImportError:  # the extension is not built: only the Python front-end runs
    ops = None

__all__ = ["score", "GroundTruth", "ground_truth", "convert_records", "temporal_rewards",
           "spatial_rewards", "pairwise_iou", "FRONTEND"]

# Parser front-end of ``score`` (``grounding.BACKENDS``): "auto" = the C++ op when the
# extension has it, else the Python parser; "native" / "python" force one. The identity
# matrix follows the same choice.
FRONTEND = "auto"

try:  # csrc/gt_pack.cpp (absent from an extension built before it)
    from visioncoach._C import pack_ground_truth as _pack_native
except ImportError:
    _pack_native = None

# The C++ CPU loops for the temporal and spatial rewards (csrc/rewards.cpp); an extension
# built before they existed lacks them, and the tensor-op paths run instead.
_NATIVE_REWARDS = ops is not None and hasattr(torch.ops.visioncoach, "spatial_reward_cpu")
_SPATIAL_MODE_CODES = {"object_aware": 0, "max": 1, "avg": 2}

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


_ARRAY_TYPECODES = {torch.float32: "f", torch.float64: "d", torch.int64: "q"}


def _tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
    """1-D tensor of a flat list of Python numbers, through ``array.array``: ``torch.tensor``
    converts a list one Python object at a time, ~4x slower (6000 numbers: ~0.7 ms vs
    ~0.2 ms, which adds up over the ground truth's lists)."""
    if not values:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(array.array(_ARRAY_TYPECODES[dtype], values), dtype=dtype)


def _rows(values: np.ndarray, counts: np.ndarray, width: int, fill) -> torch.Tensor:
    """Padded rows [R, width, ...] from flat ``values`` [sum(counts), ...]: row r holds the
    next counts[r] values (in order), then ``fill``. (numpy: a few us per op where torch
    pays ~10 us, and this runs on small arrays.)"""
    out = np.full((counts.size, width, *values.shape[1:]), fill, dtype=values.dtype)
    # A boolean mask assigns in row-major order: row r's first counts[r] slots, in turn.
    out[np.arange(width) < counts[:, None]] = values
    return torch.from_numpy(out)


def ground_truth(records: Sequence[Record], device: torch.device | str = "cpu",
                 native: bool = True) -> GroundTruth:
    """Pack converted records. ``native``: by the C++ walk ``visioncoach._C.pack_ground_truth``
    (csrc/gt_pack.cpp) where the extension has it, falling back to the Python packing below
    (its specification) for records it does not take."""
    if native and _pack_native is not None:
        try:
            *tensors, names = _pack_native(records, normalize_name)
        except (TypeError, ValueError, AttributeError, OverflowError):
            pass                         # not the Record layout it expects: pack in Python
        else:
            gt = GroundTruth(*tensors, names=list(names))
            if torch.device(device).type == "cpu":
                return gt
            return GroundTruth(**{k: v.to(device) if isinstance(v, torch.Tensor) else v
                                  for k, v in vars(gt).items()})
    return _ground_truth_python(records, device)


def _ground_truth_python(records: Sequence[Record], device: torch.device | str = "cpu") -> GroundTruth:
    """Pack converted records: flat lists gathered by C-level iteration (chain, map), then
    padded by numpy; no Python loop per frame, object or box."""
    flatten = chain.from_iterable
    n_times = np.fromiter(map(len, (r.gt_times for r in records)), np.int64, len(records))
    n_segments = np.fromiter(map(len, (r.segments for r in records)), np.int64, len(records))
    n_frames = np.fromiter(map(len, (r.frames for r in records)), np.int64, len(records))
    frames = list(flatten(r.frames for r in records))
    k = len(frames)
    obj_count = np.fromiter(map(len, (kf.names for kf in frames)), np.int64, k)
    raw_names = list(flatten(kf.names for kf in frames))                  # [objects]
    # Each distinct name as written is normalized once; ids follow first appearance.
    name_ids: dict[str, int] = {}
    raw_ids = {raw: name_ids.setdefault(normalize_name(raw), len(name_ids))
               for raw in dict.fromkeys(raw_names)}
    obj_boxes = list(flatten(kf.boxes for kf in frames))                   # [objects] box lists
    n_obj = len(obj_boxes)
    per_obj = np.fromiter(map(len, obj_boxes), np.int64, n_obj)            # boxes per object
    # Slot of each object within its frame, repeated over the object's boxes.
    first_obj = np.cumsum(obj_count) - obj_count
    slot = np.arange(n_obj, dtype=np.int64) - np.repeat(first_obj, obj_count)
    box_obj = np.repeat(slot, per_obj)
    box_end = np.concatenate([[0], np.cumsum(per_obj)])                  # frames' objects are
    n_boxes = box_end[first_obj + obj_count] - box_end[first_obj]          # contiguous
    times = np.fromiter(flatten(r.gt_times for r in records), np.float32)
    segments = np.fromiter(flatten(flatten(r.segments for r in records)), np.float32).reshape(-1, 2)
    boxes = np.fromiter(flatten(flatten(obj_boxes)), np.float32).reshape(-1, 4)

    t_max, s_max, k_max, p_max, o_max = (
        int(c.max(initial=0)) or 1 for c in (n_times, n_segments, n_frames, n_boxes, obj_count))
    first_frame = np.cumsum(n_frames) - n_frames                           # [R]
    slots = np.arange(k_max)
    frame_of = np.where(slots < n_frames[:, None], first_frame[:, None] + slots, -1)
    gt = GroundTruth(
        times=_rows(times, n_times, t_max, 0.0),
        time_mask=torch.from_numpy(np.arange(t_max) < n_times[:, None]),
        segments=_rows(segments, n_segments, s_max, 0.0),
        seg_mask=torch.from_numpy(np.arange(s_max) < n_segments[:, None]),
        frame_of=torch.from_numpy(frame_of),
        frame_time=torch.from_numpy(np.fromiter((kf.time for kf in frames), np.float32, k)),
        frame_boxes=_rows(boxes, n_boxes, p_max, 0.0),
        box_obj=_rows(box_obj, n_boxes, p_max, -1),
        obj_name=_rows(np.fromiter(map(raw_ids.__getitem__, raw_names), np.int64, n_obj),
                       obj_count, o_max, -1),
        obj_count=torch.from_numpy(obj_count),
        names=list(name_ids),
    )
    if torch.device(device).type == "cpu":
        return gt
    return GroundTruth(**{k: v.to(device) if isinstance(v, torch.Tensor) else v
                          for k, v in vars(gt).items()})


def convert_records(samples: Sequence[Mapping | Record]) -> tuple[list[Record], list[int]]:
    """Distinct records (by object identity: the G rollouts of a prompt share one) and, for
    each sample, the index of its record. A ``Record`` (already validated and converted by
    ``records.convert``, as the data loader does once per record) is used as is; the dicts
    are converted together by ``records.convert_many``."""
    seen: dict[int, int] = {}
    records: list[Record | None] = []
    index: list[int] = []
    todo: list[int] = []                 # samples (by index) to convert, in order
    for i, s in enumerate(samples):
        k = id(s)
        if k not in seen:
            seen[k] = len(records)
            if isinstance(s, Record):
                records.append(s)
            else:
                records.append(None)
                todo.append(i)
        index.append(seen[k])
    if todo:
        converted = iter(convert_many([samples[i] for i in todo], todo))
        records = [next(converted) if r is None else r for r in records]
    return records, index


def _segment_mean(values: torch.Tensor, seg: torch.Tensor, weight: torch.Tensor, n: int) -> torch.Tensor:
    """sum(values) / sum(weight) per segment id ``seg`` in [0, n); 0 where the weight is 0."""
    num = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, seg, values)
    den = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, seg, weight.to(values.dtype))
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))


def temporal_rewards(cb: ClaimBatch, gt: GroundTruth, rollout_record: torch.Tensor, sigma: float,
                     dtype: torch.dtype = torch.float64, backend: str = "auto",
                     native: bool = True) -> torch.Tensor:
    """r_tmp per rollout [N] (eqs. 5-6), see ``reference.temporal_reward``. ``backend``:
    ``triton`` computes the per-time terms with ``kernels.temporal_point_reward`` (float32;
    ``auto`` = on CUDA tensors), ``torch`` with the tensor ops below in ``dtype``; on CPU
    tensors, the same float64 arithmetic in one loop of the C++ op ``temporal_reward_cpu``
    (csrc/rewards.cpp) when the extension has it, unless ``native`` is False (the op is
    ~10x faster there: each tensor op below pays ~10 us of dispatch for little work)."""
    n = cb.n_rollouts
    if cb.times.numel() == 0:
        return torch.zeros(n, dtype=dtype, device=cb.times.device)
    resolved = resolve_backend(backend, cb.times)
    if resolved == "torch" and native and _NATIVE_REWARDS and cb.times.device.type == "cpu":
        return torch.ops.visioncoach.temporal_reward_cpu(
            cb.times, cb.time_rollout, rollout_record, gt.times, gt.time_mask, gt.segments,
            gt.seg_mask, n, sigma).to(dtype)
    if resolved == "triton":
        r_m = temporal_point_reward(cb.times, rollout_record.index_select(0, cb.time_rollout),
                                    gt.times, gt.time_mask, gt.segments, gt.seg_mask, sigma,
                                    backend="triton").to(dtype)                      # [M]
        return _segment_mean(r_m, cb.time_rollout, torch.ones_like(r_m), n)
    # Masks folded into the [R, *] ground truth first, so the [M, *] work is a gather and one
    # pass: padded times are +inf (never nearest), padded segments [+inf, -inf] (hold nothing).
    inf = float("inf")
    g_times = torch.where(gt.time_mask, gt.times.to(dtype), inf)         # [R, Tmax]
    seg = gt.segments.to(dtype)
    seg_lo = torch.where(gt.seg_mask, seg[..., 0], inf)                  # [R, Smax]
    seg_hi = torch.where(gt.seg_mask, seg[..., 1], -inf)                 # [R, Smax]
    q = rollout_record.index_select(0, cb.time_rollout)                  # [M] record of each time
    t = cb.times.to(dtype)[:, None]                                      # [M, 1]
    dt = (t - g_times.index_select(0, q)).abs().amin(1)                  # [M] distance to T^gt
    inside = ((seg_lo.index_select(0, q) <= t) & (t <= seg_hi.index_select(0, q))).any(1)  # closed
    r_m = torch.where(inside, 1.0, torch.exp(-(dt * dt) / (2.0 * sigma * sigma)))
    # All times of a rollout share its record, so "no T^gt" zeroes the whole rollout.
    r_m = torch.where(gt.time_mask.any(1).index_select(0, q), r_m, 0.0)
    return _segment_mean(r_m, cb.time_rollout, torch.ones_like(r_m), n)


def _name_match(pred_ids: torch.Tensor, gt_ids: torch.Tensor, pred_names: list[str],
                gt_names: list[str], identity: str, native: bool) -> torch.Tensor:
    """I(o_m, o) for index pairs (same shapes; gt_ids >= 0). Native: one [P, G] matrix over
    the distinct names from the C++ op; else strings compared once per distinct pair."""
    if native:
        table = ops.identity_match(pred_names, gt_names, identity).to(pred_ids.device)   # [P, G]
        return table[pred_ids, gt_ids]
    keys = pred_ids * len(gt_names) + gt_ids
    uniq, inverse = torch.unique(keys, return_inverse=True)
    ng = len(gt_names)
    table = [identity_match(pred_names[k // ng], gt_names[k % ng], identity) for k in uniq.tolist()]
    return torch.tensor(table, dtype=torch.bool, device=keys.device)[inverse]


def spatial_rewards(cb: ClaimBatch, gt: GroundTruth, rollout_record: torch.Tensor, tau: float,
                    mode: str, identity: str, dtype: torch.dtype = torch.float64,
                    native_identity: bool = False, backend: str = "auto",
                    native: bool = True) -> torch.Tensor:
    """r_spa per rollout [N]: object_aware (eqs. 7-8, 15), max (eq. 13) or avg (eq. 14); see
    ``reference.spatial_reward`` for the definitions. ``native_identity``: I(o_m, o) from the
    C++ op instead of Python string compares. ``backend``: ``triton`` takes the nearest key
    frame and the IoU maxima from one ``kernels.claim_iou`` launch (float32; ``auto`` = on
    CUDA tensors), ``torch`` computes them with the blocked tensor ops below in ``dtype``; on
    CPU tensors, when the identity matrix comes from the C++ op (``native_identity``, or
    ``identity="none"``), the same float64 arithmetic in one loop of the C++ op
    ``spatial_reward_cpu`` (csrc/rewards.cpp) unless ``native`` is False."""
    n = cb.n_rollouts
    device = cb.claim_t.device
    n_claims = cb.claim_t.numel()
    if n_claims == 0 or gt.frame_time.numel() == 0:
        return torch.zeros(n, dtype=dtype, device=device)
    o_max = gt.obj_name.shape[1]
    resolved = resolve_backend(backend, cb.claim_t)
    if (resolved == "torch" and native and _NATIVE_REWARDS and device.type == "cpu"
            and (native_identity or identity == "none" or mode != "object_aware")):
        if mode == "object_aware" and identity != "none":
            match = ops.identity_match(cb.names, gt.names, identity)          # [U, G]
        else:  # read only by object_aware, where "none" matches every pair
            match = torch.ones(len(cb.names), len(gt.names), dtype=torch.bool)
        return torch.ops.visioncoach.spatial_reward_cpu(
            cb.claim_t, cb.claim_rollout, rollout_record, cb.boxes, cb.box_count, cb.claim_obj,
            gt.frame_of, gt.frame_time, gt.frame_boxes, gt.box_obj, gt.obj_name, gt.obj_count,
            match, n, tau, _SPATIAL_MODE_CODES[mode]).to(dtype)
    if resolved == "triton":
        q = rollout_record.index_select(0, cb.claim_rollout)             # [C]
        ci = claim_iou(cb.claim_t, q, cb.boxes, cb.box_count, gt.frame_of, gt.frame_time,
                       gt.frame_boxes, gt.box_obj, gt.obj_count, o_max, backend="triton")
        return _claim_scores(cb, gt, ci.frame.clamp(min=0), ci.dt.to(dtype) <= tau,
                             ci.best_obj.to(dtype), ci.score_max.to(dtype), ci.score_avg.to(dtype),
                             mode, identity, native_identity)

    # Nearest annotated key frame t~_m of each claim: key-frame times per record with +inf
    # padding, then a min whose index is the first minimal slot, i.e. the earlier frame on
    # ties (frames are time-sorted within a record).
    q = rollout_record.index_select(0, cb.claim_rollout)                 # [C]
    frame_t = torch.where(gt.frame_of >= 0, gt.frame_time.to(dtype)[gt.frame_of.clamp(min=0)],
                          float("inf"))                                  # [R, Kmax]
    t = cb.claim_t.to(dtype)
    d_min, slot = (t[:, None] - frame_t.index_select(0, q)).abs().min(1)  # [C] dt_m, [C]
    frame = gt.frame_of.index_select(0, q).gather(1, slot[:, None]).squeeze(1).clamp(min=0)  # [C]
    # 1[dt_m <= tau]; a record without annotated frames has dt_m = inf (tau is finite).
    gate = d_min <= tau                                                  # [C]

    # IoU over the flat list of claim boxes (not the padded [C, Bmax] grid: one claim with
    # thousands of boxes must not multiply the work of every other claim).
    row = torch.repeat_interleave(torch.arange(n_claims, device=device), cb.box_count)   # [Btot] claim
    has_box = torch.arange(cb.boxes.shape[1], device=device) < cb.box_count[:, None]      # [C, Bmax]
    flat = cb.boxes[has_box].to(dtype)                                   # [Btot, 4] claim-major
    p_max = gt.frame_boxes.shape[1]
    g_boxes = gt.frame_boxes.to(dtype)                                   # [K, P, 4]
    # Object slot of each GT box; padding goes to a spare last slot, dropped below. Padding
    # boxes are all zero: zero area, so IoU 0, which never wins a max (IoU >= 0).
    g_slot = torch.where(gt.box_obj >= 0, gt.box_obj, o_max)             # [K, P]
    g_count = gt.obj_count.to(dtype)                                     # [K]
    best_obj = torch.zeros(n_claims, o_max + 1, dtype=dtype, device=device)  # max IoU vs each object
    score_max = torch.zeros(n_claims, dtype=dtype, device=device)        # eq. 13 term
    score_avg = torch.zeros(n_claims, dtype=dtype, device=device)        # eq. 14 term
    step = max(1, _IOU_BLOCK // (p_max + o_max + 1))
    for lo in range(0, row.numel(), step):
        hi = min(row.numel(), lo + step)
        claims_of = row[lo:hi]                                           # [b] claim of each box
        f = frame.index_select(0, claims_of)                             # [b] its frame
        iou = pairwise_iou(flat[lo:hi, None, :], g_boxes.index_select(0, f))   # [b, P]
        # Max over each GT object's boxes: [b, Omax + 1].
        per_obj = torch.zeros(hi - lo, o_max + 1, dtype=dtype, device=device).scatter_reduce(
            1, g_slot.index_select(0, f), iou, "amax")
        per_obj[:, o_max] = 0
        # Segment maxima over each claim's boxes.
        best_obj.scatter_reduce_(0, claims_of[:, None].expand(-1, o_max + 1), per_obj, "amax")
        score_max.scatter_reduce_(0, claims_of, iou.amax(1), "amax")
        score_avg.scatter_reduce_(0, claims_of, per_obj.sum(1) / g_count.index_select(0, f), "amax")
    best_obj = best_obj[:, :o_max]
    return _claim_scores(cb, gt, frame, gate, best_obj, score_max, score_avg, mode, identity,
                         native_identity)


def _claim_scores(cb: ClaimBatch, gt: GroundTruth, frame: torch.Tensor, gate: torch.Tensor,
                  best_obj: torch.Tensor, score_max: torch.Tensor, score_avg: torch.Tensor,
                  mode: str, identity: str, native_identity: bool) -> torch.Tensor:
    """Per-rollout r_spa from each claim's nearest frame [C], temporal gate [C] and IoU maxima
    (best_obj [C, Omax], score_max / score_avg [C]): identity, validity and the means."""
    n = cb.n_rollouts
    if mode == "object_aware":
        names = gt.obj_name.index_select(0, frame)                       # [C, Omax]
        o_ok = names >= 0
        if identity == "none":
            match = o_ok
        else:
            match = o_ok & _name_match(cb.claim_obj[:, None].expand_as(names), names.clamp(min=0),
                                       cb.names, gt.names, identity, native_identity)
        n_match = match.sum(1)
        valid = gate & (n_match > 0)                                     # m in I
        claim_score = torch.where(match, best_obj, torch.zeros_like(best_obj)).sum(1) / n_match.clamp(min=1)
        return _segment_mean(torch.where(valid, claim_score, torch.zeros_like(claim_score)),
                             cb.claim_rollout, valid, n)
    claim_score = score_max if mode == "max" else score_avg
    return _segment_mean(torch.where(gate, claim_score, torch.zeros_like(claim_score)),
                         cb.claim_rollout, torch.ones_like(claim_score), n)


def _first_numbers(pattern: re.Pattern, texts: list[str], k: int) -> list[tuple[float, ...] | None]:
    """For each text, the numbers of the first match of ``pattern`` (``grounding``'s box or
    segment pattern) whose ``k`` numbers are all finite in float32, as ``first_box`` /
    ``first_segment`` read them (unordered: the IoUs order the ends themselves), else None.
    One ``findall`` per text and one float32 rounding of all numbers together, instead of a
    Python function call per text and a ``to_f32`` call per number."""
    out: list[tuple[float, ...] | None] = [None] * len(texts)
    owner, groups = [], []
    for i, m in enumerate(map(pattern.search, texts)):
        if m is not None:
            g = m.groups()
            owner.append(i)
            # The segment pattern's second form fills groups 3-4; a group that did not take
            # part is None.
            groups += g[:k] if g[0] is not None else g[k:2 * k]
    if not owner:
        return out
    # Usually every number is a finite float32: struct rounds them all in one call (the "f"
    # format rounds as to_f32 does, raising where that gives None), and each text's first
    # match is its answer. Otherwise a later match may be: numpy sorts out which counts.
    try:
        f32 = struct.unpack(f"<{len(groups)}f", struct.pack(f"<{len(groups)}f", *map(float, groups)))
    except OverflowError:
        f32 = None
    if f32 is not None and all(map(math.isfinite, f32)):
        for j, i in enumerate(owner):
            out[i] = f32[k * j:k * j + k]
        return out
    owner, groups = [], []
    for i, matches in enumerate(map(pattern.findall, texts)):
        for g in matches:
            owner.append(i)
            groups += g[:k] if g[0] else g[k:2 * k]     # findall: "" for a group not taken
    with np.errstate(over="ignore"):
        nums = np.fromiter(map(float, groups), np.float64, len(groups)).astype(np.float32).reshape(-1, k)
    ok = np.isfinite(nums).all(1)
    owner_np = np.array(owner)[ok]
    # matches are in text order, so the first of each owner is the first valid match
    _, first = np.unique(owner_np, return_index=True)
    rows = np.flatnonzero(ok)[first]
    for i, v in zip(owner_np[first].tolist(), nums[rows].astype(np.float64).tolist()):
        out[i] = tuple(v)
    return out


def _box_ious(preds: list, truths: list) -> np.ndarray:
    """``reference.box_iou`` of each (pred, truth) pair, the same float64 operations; rows
    of 4 numbers, or flat lists of them (one array conversion instead of one per row)."""
    a, b = np.array(preds, dtype=np.float64).reshape(-1, 4), np.array(truths, dtype=np.float64).reshape(-1, 4)
    # reversed corners swapped: [x1, y1] the minima, [x2, y2] the maxima of each pair
    a_lo, a_hi = np.minimum(a[:, :2], a[:, 2:]), np.maximum(a[:, :2], a[:, 2:])
    b_lo, b_hi = np.minimum(b[:, :2], b[:, 2:]), np.maximum(b[:, :2], b[:, 2:])
    wh_a, wh_b = a_hi - a_lo, b_hi - b_lo                         # [n, 2] widths, heights
    inter_wh = np.maximum(0.0, np.minimum(a_hi, b_hi) - np.maximum(a_lo, b_lo))
    inter = inter_wh[:, 0] * inter_wh[:, 1]
    union = wh_a[:, 0] * wh_a[:, 1] + wh_b[:, 0] * wh_b[:, 1] - inter
    ok = (wh_a > 0).all(1) & (wh_b > 0).all(1) & (union > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, np.minimum(1.0, inter / union), 0.0)


def _accuracy(answers: Sequence[str | None], records: Sequence[Record], index: Sequence[int]) -> list[float]:
    """r_acc per text. It is a function of (answer, record), and the G rollouts of a prompt
    often answer alike, so each distinct pair is scored once: ROUGE for each distinct (answer,
    ground-truth answer) across records in one ``rouge_batch`` call, the answers' numbers read
    and the temporal and box IoUs of all pairs computed together (per pair, Python function
    calls cost more than the parsing of a whole batch)."""
    value: dict[tuple[str | None, int], float] = {}
    task_of = [r.task for r in records]
    by_task: dict[str, list[tuple[str, int]]] = {task: [] for task in set(task_of)}
    for key in dict.fromkeys(zip(answers, index)):
        if key[0] is not None:          # no answer block: 0
            by_task[task_of[key[1]]].append(key)

    free = [key for task in FREE_FORM_TASKS for key in by_task.pop(task, ())]
    rouge_pairs = list(dict.fromkeys((a, records[r].answer) for a, r in free))
    rouge_value = dict(zip(rouge_pairs, rouge_batch([a for a, _ in rouge_pairs],
                                                    [t for _, t in rouge_pairs]).tolist()))
    for a, r in free:
        value[(a, r)] = rouge_value[(a, records[r].answer)]

    for task in MCQ_TASKS:
        keys = by_task.pop(task, ())
        letters = {a: answer_letter(a) for a in {a for a, _ in keys}}
        gt_letter = [r.gt_letter for r in records]
        value.update({(a, r): 1.0 if letters[a] is not None and letters[a] == gt_letter[r] else 0.0
                      for a, r in keys})

    # temporal QA (the first answered segment against each of the record's segments) and
    # visual QA (the first answered box against the record's box) in one ``_box_ious`` call:
    # a segment [s, e] is the box (s, 0, e, 1), whose IoU is exactly segment_iou's (widths and
    # overlap times 1, the same float64 values; zero length gives 0 on both sides).
    owners: list[tuple[str, int]] = []                 # (answer, record) of each IoU row
    preds: list[float] = []                            # flat: 4 per row, one array at the end
    truths: list[float] = []
    keys = [(a, r) for a, r in by_task.pop("temporal QA", ()) if records[r].segments]
    for key, seg in zip(keys, _first_numbers(_SEGMENT_IN_TEXT, [a for a, _ in keys], 2)):
        if seg is not None:
            for s, e in records[key[1]].segments:
                owners.append(key)
                preds += (seg[0], 0.0, seg[1], 1.0)
                truths += (s, 0.0, e, 1.0)
    keys = [(a, r) for a, r in by_task.pop("visual QA", ()) if records[r].gt_box is not None]
    for key, box in zip(keys, _first_numbers(_BOX_IN_TEXT, [a for a, _ in keys], 4)):
        if box is not None:
            owners.append(key)
            preds += box
            truths += records[key[1]].gt_box
    if owners:
        ious = _box_ious(preds, truths).tolist()
        if len(set(owners)) == len(owners):
            value.update(zip(owners, ious))
        else:                   # a record with several segments: the best of its rows
            for key, v in zip(owners, ious):
                value[key] = max(value.get(key, 0.0), v)

    for keys in by_task.values():       # no ground truth to score against, or any other task
        value.update(dict.fromkeys(keys, 0.0))
    return [value.get(key, 0.0) for key in zip(answers, index)]


def score(texts: Sequence[str], samples: Sequence[Mapping | Record], cfg: RewardConfig,
          progress: float = 0.0, *, device: torch.device | str = "cpu", frontend: str | None = None,
          backend: str = "auto") -> dict[str, torch.Tensor]:
    """Rewards of eq. 4 for each text: {accuracy, format, temporal, spatial, total}, each
    float32 [len(texts)]; ``samples[i]`` is the record of ``texts[i]``: a record dict, or a
    ``Record`` converted once ahead (the data loader does, so training never re-validates).
    Equals ``reference.score_reference`` (to ~1e-7). ``frontend``: parser backend (see
    ``FRONTEND``, the default); every choice gives the same rewards. ``backend``: the
    temporal/spatial math on ``device``: ``auto`` = the Triton kernels on CUDA, tensor ops
    elsewhere; ``triton`` / ``torch`` force one (the kernels are float32, so they can differ
    from the float64 tensor path at exact ties of dt <= tau and interval ends)."""
    frontend = FRONTEND if frontend is None else frontend
    if frontend not in BACKENDS:
        raise ValueError(f"frontend must be one of {BACKENDS}, got {frontend!r}")
    if len(texts) != len(samples):
        raise ValueError(f"{len(texts)} texts but {len(samples)} samples")
    if not all(map(isinstance, texts, repeat(str))):
        i, t = next((i, t) for i, t in enumerate(texts) if not isinstance(t, str))
        raise TypeError(f"text {i} must be a str, got {type(t).__name__}")
    records, index = convert_records(samples)
    sigma = sigma_at(progress, cfg.sigma)
    check_config(cfg, sigma)
    batch = parse_texts(texts, frontend)
    native = batch.backend == "native"

    n = len(texts)
    rollout_record = _tensor(index, torch.int64)                            # [N]
    acc = _tensor(_accuracy(batch.answers(), records, index), torch.float32)
    # r_fmt: well-formed, and the temporal-spatial task also needs a claim. (numpy: these
    # are a few small CPU arrays, where a torch op's dispatch costs more than its work.)
    needs_claim = np.fromiter((r.task == TEMPORAL_SPATIAL_TASK for r in records), np.bool_,
                              len(records))[rollout_record.numpy()]          # [N]
    has_claim = np.bincount(batch.claims.claim_rollout.numpy(), minlength=n) > 0  # [N]
    fmt = torch.from_numpy(((batch.n_errors.numpy() == 0) & (has_claim | ~needs_claim)).astype(np.float32))
    cb = batch.claims.to(device)
    gt = ground_truth(records, device)
    rollout_record = rollout_record.to(device)
    tmp = temporal_rewards(cb, gt, rollout_record, sigma, backend=backend).to(torch.float32).cpu()
    spa = spatial_rewards(cb, gt, rollout_record, cfg.tau, cfg.spatial_mode, cfg.identity,
                          native_identity=native, backend=backend).to(torch.float32).cpu()
    out = {ACCURACY: acc, FORMAT: fmt, TEMPORAL: tmp, SPATIAL: spa}
    out[TOTAL] = acc + fmt + tmp + spa
    return {k: v.to(device) for k, v in out.items()}
