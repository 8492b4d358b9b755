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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from visioncoach.kernels import resolve_backend
from visioncoach.kernels.claim_iou import claim_iou, pairwise_iou  # the one IoU formula (eqs. 8, 13-15)
from visioncoach.kernels.temporal_reward import temporal_point_reward

from visioncoach.config import RewardConfig
from visioncoach.grounding import (BACKENDS, ClaimBatch, answer_letter, first_box, first_segment,
                                   normalize_name, parse_texts)
from visioncoach.rewards.components import ACCURACY, FORMAT, SPATIAL, TEMPORAL, TOTAL
from visioncoach.rewards.records import (FREE_FORM_TASKS, MCQ_TASKS, TEMPORAL_SPATIAL_TASK,
                                         Record, convert)
from visioncoach.rewards.reference import (box_iou, check_config, identity_match, segment_iou,
                                           sigma_at)
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


def _rows(values: torch.Tensor, counts: torch.Tensor, width: int, fill) -> torch.Tensor:
    """Padded rows [R, width, ...] from flat ``values`` [sum(counts), ...]: row r holds the
    next counts[r] values (in order), then ``fill``."""
    out = torch.full((counts.numel(), width, *values.shape[1:]), fill, dtype=values.dtype)
    if values.shape[0]:
        row = torch.repeat_interleave(torch.arange(counts.numel()), counts)     # [L]
        col = torch.arange(values.shape[0]) - (torch.cumsum(counts, 0) - counts)[row]
        out[row, col] = values
    return out


def ground_truth(records: Sequence[Record], device: torch.device | str = "cpu") -> GroundTruth:
    """Pack converted records: one Python pass gathers flat lists, tensor ops pad them."""
    raw_ids: dict[str, int] = {}     # name as written -> id: normalize each distinct name once
    name_ids: dict[str, int] = {}    # normalized name -> id
    times: list[float] = []
    segments: list[float] = []       # s, e, s, e, ...
    n_times, n_segments, n_frames = [], [], []
    frame_time: list[float] = []
    obj_count: list[int] = []
    obj_name: list[int] = []
    boxes: list[float] = []          # x1, y1, x2, y2, x1, ...
    box_obj: list[int] = []
    n_boxes: list[int] = []
    for rec in records:
        times += rec.gt_times
        n_times.append(len(rec.gt_times))
        for seg in rec.segments:
            segments += seg
        n_segments.append(len(rec.segments))
        n_frames.append(len(rec.frames))
        for kf in rec.frames:
            frame_time.append(kf.time)
            obj_count.append(len(kf.names))
            for name in kf.names:
                i = raw_ids.get(name)
                if i is None:
                    i = raw_ids[name] = name_ids.setdefault(normalize_name(name), len(name_ids))
                obj_name.append(i)
            n = len(box_obj)
            for slot, obj_boxes in enumerate(kf.boxes):
                for box in obj_boxes:
                    boxes += box
                box_obj += [slot] * len(obj_boxes)
            n_boxes.append(len(box_obj) - n)
    i64, f32 = torch.int64, torch.float32
    n_times_t, n_segments_t, n_frames_t, n_boxes_t, obj_count_t = (
        _tensor(c, i64) for c in (n_times, n_segments, n_frames, n_boxes, obj_count))
    t_max, s_max, k_max, p_max, o_max = (
        max(c, default=0) or 1 for c in (n_times, n_segments, n_frames, n_boxes, obj_count))
    first_frame = torch.cumsum(n_frames_t, 0) - n_frames_t                  # [R]
    slots = torch.arange(k_max)
    gt = GroundTruth(
        times=_rows(_tensor(times, f32), n_times_t, t_max, 0.0),
        time_mask=torch.arange(t_max) < n_times_t[:, None],
        segments=_rows(_tensor(segments, f32).reshape(-1, 2), n_segments_t, s_max, 0.0),
        seg_mask=torch.arange(s_max) < n_segments_t[:, None],
        frame_of=torch.where(slots < n_frames_t[:, None], first_frame[:, None] + slots, -1),
        frame_time=_tensor(frame_time, f32),
        frame_boxes=_rows(_tensor(boxes, f32).reshape(-1, 4), n_boxes_t, p_max, 0.0),
        box_obj=_rows(_tensor(box_obj, i64), n_boxes_t, p_max, -1),
        obj_name=_rows(_tensor(obj_name, i64), obj_count_t, o_max, -1),
        obj_count=obj_count_t,
        names=list(name_ids),
    )
    if torch.device(device).type == "cpu":
        return gt
    return GroundTruth(**{k: v.to(device) if isinstance(v, torch.Tensor) else v
                          for k, v in vars(gt).items()})


def convert_records(samples: Sequence[Mapping | Record]) -> tuple[list[Record], list[int]]:
    """Distinct records (by object identity: the G rollouts of a prompt share one) and, for
    each sample, the index of its record. A ``Record`` (already validated and converted by
    ``records.convert``, as the data loader does once per record) is used as is."""
    seen: dict[int, int] = {}
    records: list[Record] = []
    index: list[int] = []
    for i, s in enumerate(samples):
        k = id(s)
        if k not in seen:
            seen[k] = len(records)
            records.append(s if isinstance(s, Record) else convert(s, i))
        index.append(seen[k])
    return records, index


def _segment_mean(values: torch.Tensor, seg: torch.Tensor, weight: torch.Tensor, n: int) -> torch.Tensor:
    """sum(values) / sum(weight) per segment id ``seg`` in [0, n); 0 where the weight is 0."""
    num = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, seg, values)
    den = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, seg, weight.to(values.dtype))
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))


def temporal_rewards(cb: ClaimBatch, gt: GroundTruth, rollout_record: torch.Tensor, sigma: float,
                     dtype: torch.dtype = torch.float64, backend: str = "auto") -> torch.Tensor:
    """r_tmp per rollout [N] (eqs. 5-6), see ``reference.temporal_reward``. ``backend``:
    ``triton`` computes the per-time terms with ``kernels.temporal_point_reward`` (float32;
    ``auto`` = on CUDA tensors), ``torch`` with the tensor ops below in ``dtype``."""
    n = cb.n_rollouts
    if cb.times.numel() == 0:
        return torch.zeros(n, dtype=dtype, device=cb.times.device)
    if resolve_backend(backend, cb.times) == "triton":
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
                    native_identity: bool = False, backend: str = "auto") -> torch.Tensor:
    """r_spa per rollout [N]: object_aware (eqs. 7-8, 15), max (eq. 13) or avg (eq. 14); see
    ``reference.spatial_reward`` for the definitions. ``native_identity``: I(o_m, o) from the
    C++ op instead of Python string compares. ``backend``: ``triton`` takes the nearest key
    frame and the IoU maxima from one ``kernels.claim_iou`` launch (float32; ``auto`` = on
    CUDA tensors), ``torch`` computes them with the blocked tensor ops below in ``dtype``."""
    n = cb.n_rollouts
    device = cb.claim_t.device
    n_claims = cb.claim_t.numel()
    if n_claims == 0 or gt.frame_time.numel() == 0:
        return torch.zeros(n, dtype=dtype, device=device)
    o_max = gt.obj_name.shape[1]
    if resolve_backend(backend, cb.claim_t) == "triton":
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


def _accuracy(answers: Sequence[str | None], records: Sequence[Record], index: Sequence[int]) -> list[float]:
    """r_acc per text. It is a function of (answer, record), and the G rollouts of a prompt
    often answer alike, so each distinct pair is scored once (ROUGE: each distinct (answer,
    ground-truth answer), across records, all in one ``rouge_batch`` call)."""
    cache: dict[tuple[str, int], float] = {}
    rouge_pairs = list(dict.fromkeys(
        (answer, records[r].answer) for answer, r in zip(answers, index)
        if answer is not None and records[r].task in FREE_FORM_TASKS))
    rouge_cache = dict(zip(rouge_pairs, rouge_batch([a for a, _ in rouge_pairs],
                                                    [t for _, t in rouge_pairs]).tolist()))
    out = []
    for answer, r in zip(answers, index):
        if answer is None:
            out.append(0.0)
            continue
        value = cache.get((answer, r))
        if value is None:
            rec = records[r]
            value = 0.0
            if rec.task in MCQ_TASKS:
                letter = answer_letter(answer)
                value = 1.0 if letter is not None and letter == rec.gt_letter else 0.0
            elif rec.task in FREE_FORM_TASKS:
                value = rouge_cache[(answer, rec.answer)]
            elif rec.task == "temporal QA":
                pred = first_segment(answer)
                if pred is not None and rec.segments:
                    value = max(segment_iou(pred, s) for s in rec.segments)
            elif rec.task == "visual QA":
                pred = first_box(answer)
                if pred is not None and rec.gt_box is not None:
                    value = box_iou(pred, rec.gt_box)
            cache[(answer, r)] = value
        out.append(value)
    return out


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
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"text {i} must be a str, got {type(t).__name__}")
    records, index = convert_records(samples)
    sigma = sigma_at(progress, cfg.sigma)
    check_config(cfg, sigma)
    batch = parse_texts(texts, frontend)
    native = batch.backend == "native"

    n = len(texts)
    rollout_record = _tensor(index, torch.int64)                            # [N]
    acc = _tensor(_accuracy(batch.answers(), records, index), torch.float32)
    # r_fmt: well-formed, and the temporal-spatial task also needs a claim.
    needs_claim = torch.tensor([r.task == TEMPORAL_SPATIAL_TASK for r in records],
                               dtype=torch.bool).reshape(-1)[rollout_record]    # [N]
    has_claim = torch.bincount(batch.claims.claim_rollout, minlength=n) > 0  # [N]
    fmt = ((batch.n_errors == 0) & (has_claim | ~needs_claim)).to(torch.float32)
    cb = batch.claims.to(device)
    gt = ground_truth(records, device)
    rollout_record = rollout_record.to(device)
    tmp = temporal_rewards(cb, gt, rollout_record, sigma, backend=backend).to(torch.float32).cpu()
    spa = spatial_rewards(cb, gt, rollout_record, cfg.tau, cfg.spatial_mode, cfg.identity,
                          native_identity=native, backend=backend).to(torch.float32).cpu()
    out = {ACCURACY: acc, FORMAT: fmt, TEMPORAL: tmp, SPATIAL: spa}
    out[TOTAL] = acc + fmt + tmp + spa
    return {k: v.to(device) for k, v in out.items()}
