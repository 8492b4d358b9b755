"""Reference rewards: the specification, written plainly, one text and one record at a time.

Paper section 3.4, eq. 4: r(x, y) = r_acc + r_fmt + r_tmp + r_spa. Every component lies in
[0, 1] and is 0 where the record lacks the ground truth it needs. These functions are
slow and obvious on purpose: ``visioncoach.rewards.batched.score`` (the fast path used in
training) is tested to equal ``score_reference`` on hand-written and generated cases.

They read the parser's claims and times (``visioncoach.grounding``), and compute the
ground truth from the raw record dict themselves (not via ``records.convert``) so the
batched path's record conversion is checked too. Arithmetic is Python float64 on the
float32-rounded numbers both paths read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from visioncoach.config import RewardConfig
from visioncoach.grounding import (Box, answer_letter, first_box, first_segment, normalize_name,
                                   parse, parse_box, parse_number, to_f32)
from visioncoach.rewards.components import ACCURACY, FORMAT, SPATIAL, TEMPORAL, TOTAL
from visioncoach.rewards.records import (FREE_FORM_TASKS, MCQ_TASKS, TEMPORAL_QA_TASKS,
                                         TEMPORAL_SPATIAL_TASK, validate)

__all__ = ["accuracy_reward", "format_reward", "temporal_reward", "spatial_reward", "box_iou",
           "segment_iou", "identity_match", "sigma_at", "rouge", "score_reference",
           "SPATIAL_MODES", "IDENTITY_MODES", "check_config"]

SPATIAL_MODES = ("object_aware", "max", "avg")
IDENTITY_MODES = ("soft", "exact", "none")

_scorer = None


def rouge(prediction: str, target: str) -> float:
    """Mean of ROUGE-1, ROUGE-2 and ROUGE-L F1 (Porter stemming), the free-form r_acc."""
    global _scorer
    if _scorer is None:
        from rouge_score import rouge_scorer
        _scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    s = _scorer.score(target, prediction)
    return (s["rouge1"].fmeasure + s["rouge2"].fmeasure + s["rougeL"].fmeasure) / 3.0


def box_iou(a: Box, b: Box) -> float:
    """IoU of two xyxy boxes: continuous (no +1 pixel), reversed corners swapped, and 0 when
    either box has zero area."""
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    if ax2 < ax1:
        ax1, ax2 = ax2, ax1
    if ay2 < ay1:
        ay1, ay2 = ay2, ay1
    if bx2 < bx1:
        bx1, bx2 = bx2, bx1
    if by2 < by1:
        by1, by2 = by2, by1
    wa, ha, wb, hb = ax2 - ax1, ay2 - ay1, bx2 - bx1, by2 - by1
    if wa <= 0 or ha <= 0 or wb <= 0 or hb <= 0:
        return 0.0
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = wa * ha + wb * hb - inter
    return min(1.0, inter / union) if union > 0 else 0.0


def segment_iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Temporal IoU of two [s, e] segments (reversed ends swapped); 0 for an empty union."""
    s1, e1 = min(a), max(a)
    s2, e2 = min(b), max(b)
    inter = max(0.0, min(e1, e2) - max(s1, s2))
    union = (e1 - s1) + (e2 - s2) - inter
    return min(1.0, inter / union) if union > 0 else 0.0


def identity_match(pred: str, gt: str, mode: str) -> bool:
    """I(o_m, o) of eq. 7. ``soft``: exact or substring either way; ``exact``: equal;
    ``none``: always. Names are normalized (lower-cased, trimmed, whitespace collapsed);
    with ``soft``/``exact`` an empty name matches nothing."""
    if mode == "none":
        return True
    a, b = normalize_name(pred), normalize_name(gt)
    if not a or not b:
        return False
    if mode == "exact":
        return a == b
    if mode == "soft":
        return a == b or a in b or b in a
    raise ValueError(f"identity mode must be one of {IDENTITY_MODES}, got {mode!r}")


def sigma_at(progress: float, sigma: float | None) -> float:
    """sigma of eq. 6: the configured value, or the schedule 4(1 - p) for training progress
    p < 0.75, then 1."""
    if sigma is not None:
        return float(sigma)
    p = float(progress)
    return 4.0 * (1.0 - p) if p < 0.75 else 1.0


def check_config(cfg: RewardConfig, sigma: float) -> None:
    if cfg.spatial_mode not in SPATIAL_MODES:
        raise ValueError(f"reward spatial_mode must be one of {SPATIAL_MODES}, got {cfg.spatial_mode!r}")
    if cfg.identity not in IDENTITY_MODES:
        raise ValueError(f"reward identity must be one of {IDENTITY_MODES}, got {cfg.identity!r}")
    if not (math.isfinite(cfg.tau) and cfg.tau >= 0):
        raise ValueError(f"reward tau must be a finite number >= 0, got {cfg.tau!r}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"reward sigma must be > 0, got {sigma!r}")


# ---------------------------------------------------------------------------------------
# Ground truth, read plainly from the record dict
# ---------------------------------------------------------------------------------------

def _block(text: str, name: str) -> str | None:
    start = text.find(f"<{name}>")
    if start < 0:
        return None
    start += len(name) + 2
    end = text.find(f"</{name}>", start)
    return text[start:end] if end >= 0 else None


def _gt_segments(sample: Mapping) -> list[tuple[float, float]]:
    if sample.get("segments") is not None:
        out = []
        for s, e in sample["segments"]:
            s, e = to_f32(float(s)), to_f32(float(e))
            out.append((min(s, e), max(s, e)))
        return out
    if sample["task"] in TEMPORAL_QA_TASKS:
        seg = first_segment(sample["answer"])
        return [seg] if seg is not None else []
    return []


def _gt_times(sample: Mapping) -> list[float]:
    """T^gt: key-frame times and segment endpoints."""
    times = [to_f32(float(f["time"])) for f in sample.get("key_frames") or []]
    for s, e in _gt_segments(sample):
        times += [s, e]
    return times


@dataclass
class _Frame:
    time: float
    order: int
    objects: list[tuple[str, list[Box]]]   # (name as written, boxes in frame pixels)


def _gt_frames(sample: Mapping) -> list[_Frame]:
    """Key frames that have annotated boxes; boxes scaled from [0, 1] to frame pixels."""
    w, h = (float(x) for x in sample["frame_size"])
    items = sample.get("key_items") or {}
    frames = []
    for order, f in enumerate(sample.get("key_frames") or []):
        objects = []
        for name, boxes in (items.get(str(f["idx"])) or {}).items():
            px = []
            for x1, y1, x2, y2 in boxes:
                px.append((to_f32(x1 * w), to_f32(y1 * h), to_f32(x2 * w), to_f32(y2 * h)))
            if px:
                objects.append((name, px))
        if objects:
            frames.append(_Frame(to_f32(float(f["time"])), order, objects))
    return frames


def _gt_box(sample: Mapping) -> Box | None:
    """Visual QA ground truth in frame pixels (answer in image_size pixels, else normalized)."""
    box = first_box(sample["answer"])
    if box is None:
        return None
    w, h = (float(x) for x in sample["frame_size"])
    if sample.get("image_size") is not None:
        iw, ih = (float(x) for x in sample["image_size"])
        px = (to_f32(box[0] * w / iw), to_f32(box[1] * h / ih),
              to_f32(box[2] * w / iw), to_f32(box[3] * h / ih))
    else:
        px = (to_f32(box[0] * w), to_f32(box[1] * h), to_f32(box[2] * w), to_f32(box[3] * h))
    return None if any(v is None for v in px) else px


# ---------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------

def accuracy_reward(text: str, sample: Mapping) -> float:
    """r_acc: MCQ -> 1 if the answer's option letter equals the ground truth's (both read by
    ``answer_letter``: "Correct Option: B" or a leading letter); free-form -> mean
    ROUGE-1/2/L F1; temporal QA -> best temporal IoU of the first answered segment with a
    ground-truth segment; visual QA -> IoU of the first answered box with the ground-truth box.
    0 without an answer block or without ground truth."""
    validate(sample)
    answer = _block(text, "answer")
    if answer is None:
        return 0.0
    task = sample["task"]
    if task in MCQ_TASKS:
        letter = answer_letter(answer)
        return 1.0 if letter is not None and letter == answer_letter(sample["answer"]) else 0.0
    if task in FREE_FORM_TASKS:
        return rouge(answer, sample["answer"])
    if task == "temporal QA":
        pred = first_segment(answer)
        segments = _gt_segments(sample)
        if pred is None or not segments:
            return 0.0
        return max(segment_iou(pred, s) for s in segments)
    if task == "visual QA":
        pred, gt = first_box(answer), _gt_box(sample)
        return box_iou(pred, gt) if pred is not None and gt is not None else 0.0
    return 0.0


_TAG = re.compile(r"<(/?)(obj|box|t)>")
_COMPLETE_CLAIM = re.compile(r"<obj>[^<]*+</obj>(?:\s*+<box>[^<]*+</box>)++\s*+at\s*+<t>[^<]*+</t>")


def format_reward(text: str, sample: Mapping) -> float:
    """r_fmt (binary): exactly one <think>...</think> then exactly one <answer>...</answer>,
    only whitespace outside, neither empty; inside think every <obj>/<box>/<t> is closed by
    its own closing tag with no '<' in between (no nesting), an <obj> names something, a
    <box> is [x1, y1, x2, y2] and a <t> a number; the temporal-spatial task also needs one
    complete claim <obj>..</obj><box>..</box>...at<t>..</t>."""
    validate(sample)
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        if text.count(tag) != 1:
            return 0.0
    m = re.fullmatch(r"\s*<think>(.*)</think>\s*<answer>(.*)</answer>\s*", text, re.S)
    if m is None:
        return 0.0
    think, answer = m.groups()
    if not think.strip() or not answer.strip():
        return 0.0
    tags = list(_TAG.finditer(think))
    i = 0
    while i < len(tags):
        opening = tags[i]
        if opening.group(1) or i + 1 == len(tags):
            return 0.0
        closing = tags[i + 1]
        kind = opening.group(2)
        if not closing.group(1) or closing.group(2) != kind:
            return 0.0
        content = think[opening.end():closing.start()]
        if "<" in content:
            return 0.0
        if kind == "obj" and not content.strip():
            return 0.0
        if kind == "box" and parse_box(content) is None:
            return 0.0
        if kind == "t" and parse_number(content) is None:
            return 0.0
        i += 2
    if sample["task"] == TEMPORAL_SPATIAL_TASK and _COMPLETE_CLAIM.search(think) is None:
        return 0.0
    return 1.0


def temporal_reward(text: str, sample: Mapping, sigma: float) -> float:
    """r_tmp, eqs. 5-6: r_tmp = (1/M) sum_m r_m over the M predicted times t_m of think, with
    r_m = 1 if t_m lies in a ground-truth segment [s, e] (closed), else
    exp(-dt_m^2 / (2 sigma^2)), dt_m = distance from t_m to the nearest ground-truth time
    (key-frame times and segment endpoints). 0 with no predicted or no ground-truth time."""
    validate(sample)
    preds = parse(text).times
    gt_times = _gt_times(sample)
    segments = _gt_segments(sample)
    if not preds or not gt_times:
        return 0.0
    total = 0.0
    for t in preds:
        if any(s <= t <= e for s, e in segments):
            total += 1.0
        else:
            dt = min(abs(t - g) for g in gt_times)
            total += math.exp(-(dt * dt) / (2.0 * sigma * sigma))
    return total / len(preds)


def spatial_reward(text: str, sample: Mapping, tau: float, mode: str = "object_aware",
                   identity: str = "soft") -> float:
    """r_spa. Each claim m = (o_m, t_m, boxes b_m) is matched to the nearest key frame
    t~_m with annotated objects (ties: the earlier frame), dt_m = |t_m - t~_m|.

    object_aware (eqs. 7-8, 15):
        O_m^match = {o in O^gt(t~_m) | I(o_m, o)},  I = {m | dt_m <= tau and |O_m^match| > 0}
        r = (1/|I|) sum_{m in I} (1/|O_m^match|) sum_{o in O_m^match} max IoU(b, b^gt)
        (max over the claim's boxes b and o's boxes b^gt); 0 if I is empty.
    max (eq. 13):  r = (1/M) sum_m 1[dt_m <= tau] max_{b^gt in B^gt(t~_m)} IoU(b_m, b^gt)
    avg (eq. 14):  r = (1/M) sum_m 1[dt_m <= tau] (1/|O^gt(t~_m)|) sum_o max_{b^gt of o} IoU(b_m, b^gt)
    For max and avg a claim with several boxes is scored by its best box b_m, and identity
    is ignored. M = number of claims; 0 when M = 0 or the record has no annotated frame."""
    validate(sample)
    if mode not in SPATIAL_MODES:
        raise ValueError(f"spatial mode must be one of {SPATIAL_MODES}, got {mode!r}")
    claims = parse(text).claims
    frames = _gt_frames(sample)
    if not claims or not frames:
        return 0.0
    valid_scores: list[float] = []
    total = 0.0
    for c in claims:
        frame = min(frames, key=lambda f: (abs(c.t - f.time), f.time, f.order))
        in_time = abs(c.t - frame.time) <= tau
        if mode == "object_aware":
            matched = [boxes for name, boxes in frame.objects if identity_match(c.obj, name, identity)]
            if in_time and matched:
                per_object = [max(box_iou(b, g) for b in c.boxes for g in gt) for gt in matched]
                valid_scores.append(sum(per_object) / len(per_object))
        elif mode == "max":
            if in_time:
                total += max(box_iou(b, g) for b in c.boxes for _, gt in frame.objects for g in gt)
        else:
            if in_time:
                total += max(
                    sum(max(box_iou(b, g) for g in gt) for _, gt in frame.objects) / len(frame.objects)
                    for b in c.boxes)
    if mode == "object_aware":
        return sum(valid_scores) / len(valid_scores) if valid_scores else 0.0
    return total / len(claims)


def score_reference(texts: list[str], samples: list[Mapping], cfg: RewardConfig,
                    progress: float = 0.0) -> dict[str, torch.Tensor]:
    """The rewards of eq. 4 for each text, by looping over the functions above."""
    if len(texts) != len(samples):
        raise ValueError(f"{len(texts)} texts but {len(samples)} samples")
    for i, s in enumerate(samples):
        validate(s, i)
    sigma = sigma_at(progress, cfg.sigma)
    check_config(cfg, sigma)
    rows = [(accuracy_reward(t, s), format_reward(t, s), temporal_reward(t, s, sigma),
             spatial_reward(t, s, cfg.tau, cfg.spatial_mode, cfg.identity))
            for t, s in zip(texts, samples)]
    cols = torch.tensor(rows, dtype=torch.float32).reshape(len(texts), 4)
    out = {k: cols[:, i].contiguous() for i, k in enumerate((ACCURACY, FORMAT, TEMPORAL, SPATIAL))}
    out[TOTAL] = out[ACCURACY] + out[FORMAT] + out[TEMPORAL] + out[SPATIAL]
    return out
