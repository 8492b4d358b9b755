"""Sample records (STGR schema): validation and conversion to the rewards' ground truth.

A record (one per prompt, shared by its G rollouts) has

    task        one of TASKS (required)
    answer      str (required): option letter, free text, "[s, e]", or a box; temporal QA also
                "From <t>s</t>s to <t>e</t>s"; temporal QA (MCQ) "B\\n[s, e]" (STGR) or
                "From <t>s</t>s to <t>e</t>s.\\nCorrect Option: B" (Open-o3-Video)
    frame_size  [W, H] of the frames the model saw, after resizing (required)
    image_size  [W, H] of the source image (optional; visual QA answers are in its pixels)
    key_frames  [{idx: int, time: seconds, ...}, ...] (optional)
    key_items   {str(idx): {object_name: [[x1, y1, x2, y2] normalized to [0, 1], ...]}} (optional)
    segments    [[s, e], ...] seconds (optional)

``validate`` raises ValueError naming the sample index and the field; ``convert`` returns
the ground truth in the units the rewards compare in (frame pixels, seconds), with every
number rounded to float32 like the parsed predictions (see ``visioncoach.grounding``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter

import numpy as np

from visioncoach.grounding import Box, answer_letter, first_box, first_segment, to_f32

__all__ = ["TASKS", "MCQ_TASKS", "FREE_FORM_TASKS", "TEMPORAL_QA_TASKS", "VISUAL_QA_TASKS",
           "TEMPORAL_SPATIAL_TASK", "Record", "KeyFrame", "RewardTargets", "validate", "convert",
           "convert_many"]

TEMPORAL_SPATIAL_TASK = "temporal-spatial free-form QA"
TASKS = (
    TEMPORAL_SPATIAL_TASK,
    "temporal QA",
    "temporal QA (MCQ)",
    "visual QA",
    "General video QA MCQ",
    "General video QA Free-form",
)
MCQ_TASKS = frozenset({"General video QA MCQ", "temporal QA (MCQ)"})
FREE_FORM_TASKS = frozenset({TEMPORAL_SPATIAL_TASK, "General video QA Free-form"})
# Tasks whose answer carries the ground-truth segment when `segments` is absent.
TEMPORAL_QA_TASKS = frozenset({"temporal QA", "temporal QA (MCQ)"})
VISUAL_QA_TASKS = frozenset({"visual QA"})


def _is_num(v: object) -> bool:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond float range
        return False


def _fits_f32(v: float) -> bool:
    return to_f32(float(v)) is not None


class _Checker:
    def __init__(self, index: int | None) -> None:
        self.prefix = "sample" if index is None else f"sample {index}"

    def fail(self, name: str, what: str, got: object) -> None:
        text = repr(got)
        if len(text) > 80:
            text = text[:77] + "..."
        raise ValueError(f"{self.prefix}: field {name!r} {what}, got {text}")


def _size(chk: _Checker, sample: Mapping, name: str) -> tuple[float, float]:
    v = sample[name]
    if (not isinstance(v, (list, tuple)) or len(v) != 2
            or not all(_is_num(x) and x > 0 and _fits_f32(x) for x in v)):
        chk.fail(name, "must be [W, H] with positive numbers", v)
    return float(v[0]), float(v[1])


def validate(sample: object, index: int | None = None) -> None:
    """Raise ValueError (naming ``index`` and the field) unless ``sample`` is a valid record."""
    chk = _Checker(index)
    if not isinstance(sample, Mapping):
        raise ValueError(f"{chk.prefix}: must be a dict (a sample record), got {type(sample).__name__}")
    for name in ("task", "answer", "frame_size"):
        if name not in sample:
            chk.fail(name, "is required", None)
    if sample["task"] not in TASKS:
        chk.fail("task", f"must be one of {list(TASKS)}", sample["task"])
    if not isinstance(sample["answer"], str):
        chk.fail("answer", "must be a string", sample["answer"])
    w, h = _size(chk, sample, "frame_size")
    if sample.get("image_size") is not None:
        _size(chk, sample, "image_size")

    frames = sample.get("key_frames")
    if frames is not None:
        if not isinstance(frames, (list, tuple)):
            chk.fail("key_frames", "must be a list of {idx, time}", frames)
        for k, f in enumerate(frames):
            if not isinstance(f, Mapping) or "idx" not in f or "time" not in f:
                chk.fail(f"key_frames[{k}]", "must be a dict with 'idx' and 'time'", f)
            if not isinstance(f["idx"], int) or isinstance(f["idx"], bool):
                chk.fail(f"key_frames[{k}].idx", "must be an integer", f["idx"])
            if not _is_num(f["time"]) or not _fits_f32(f["time"]):
                chk.fail(f"key_frames[{k}].time", "must be a finite number of seconds", f["time"])

    items = sample.get("key_items")
    if items is not None:
        if not isinstance(items, Mapping):
            chk.fail("key_items", "must be a dict {str(frame idx): {object name: [boxes]}}", items)
        for key, objects in items.items():
            if not isinstance(key, str):
                chk.fail("key_items", "keys must be frame indices as strings", key)
            if not isinstance(objects, Mapping):
                chk.fail(f"key_items[{key!r}]", "must be a dict {object name: [boxes]}", objects)
            for name, boxes in objects.items():
                where = f"key_items[{key!r}][{name!r}]"
                if not isinstance(name, str):
                    chk.fail(f"key_items[{key!r}]", "object names must be strings", name)
                if not isinstance(boxes, (list, tuple)):
                    chk.fail(where, "must be a list of [x1, y1, x2, y2]", boxes)
                for b in boxes:
                    if (not isinstance(b, (list, tuple)) or len(b) != 4
                            or not all(_is_num(x) for x in b)
                            or not all(_fits_f32(x * s) for x, s in zip(b, (w, h, w, h)))):
                        chk.fail(where, "boxes must be [x1, y1, x2, y2] of finite normalized numbers", b)

    segments = sample.get("segments")
    if segments is not None:
        if not isinstance(segments, (list, tuple)):
            chk.fail("segments", "must be a list of [start, end] in seconds", segments)
        for k, seg in enumerate(segments):
            if (not isinstance(seg, (list, tuple)) or len(seg) != 2
                    or not all(_is_num(x) and _fits_f32(x) for x in seg)):
                chk.fail(f"segments[{k}]", "must be [start, end] with finite numbers of seconds", seg)


@dataclass
class KeyFrame:
    """A key frame with annotated objects: time and, per object, its boxes in frame pixels."""
    time: float
    names: list[str]            # object names as written in the record
    boxes: list[list[Box]]      # boxes[i] belongs to names[i]; each list non-empty


@dataclass
class Record:
    task: str
    answer: str
    frame_size: tuple[float, float]
    # T^gt of eqs. 5-6: every key-frame time, then the segment endpoints.
    gt_times: list[float] = field(default_factory=list)
    # S^gt of eq. 6, ends ordered.
    segments: list[tuple[float, float]] = field(default_factory=list)
    # Key frames with at least one annotated box, sorted by time (stable: ties keep list
    # order) so "nearest, ties to the earlier frame" is "first minimum".
    frames: list[KeyFrame] = field(default_factory=list)
    gt_letter: str | None = None      # MCQ tasks: grounding.answer_letter of the answer
    gt_box: Box | None = None         # visual QA, frame pixels


def convert(sample: Mapping, index: int | None = None) -> Record:
    """Validate ``sample`` and return its ground truth in frame pixels and seconds."""
    validate(sample, index)
    task, answer = sample["task"], sample["answer"]
    w, h = (float(x) for x in sample["frame_size"])
    rec = Record(task=task, answer=answer, frame_size=(w, h))

    key_frames = sample.get("key_frames") or []
    items = sample.get("key_items") or {}
    times = [to_f32(float(f["time"])) for f in key_frames]
    frames: list[tuple[float, int, KeyFrame]] = []
    for order, f in enumerate(key_frames):
        objects = items.get(str(f["idx"]))
        if not objects:
            continue
        names, boxes = [], []
        for name, obj_boxes in objects.items():
            px = []
            for x1, y1, x2, y2 in obj_boxes:
                a, b, c, d = (to_f32(x1 * w), to_f32(y1 * h), to_f32(x2 * w), to_f32(y2 * h))
                px.append((min(a, c), min(b, d), max(a, c), max(b, d)))
            # An object with no box is not annotated at this frame.
            if px:
                names.append(name)
                boxes.append(px)
        if names:
            frames.append((times[order], order, KeyFrame(times[order], names, boxes)))
    frames.sort(key=lambda x: (x[0], x[1]))
    rec.frames = [kf for _, _, kf in frames]

    if sample.get("segments") is not None:
        for s, e in sample["segments"]:
            s, e = to_f32(float(s)), to_f32(float(e))
            rec.segments.append((s, e) if s <= e else (e, s))
    _from_answer(rec, sample, times)
    return rec


def _from_answer(rec: Record, sample: Mapping, times: list[float]) -> None:
    """The rest of ``convert`` once frames and ``segments`` are in: a temporal QA answer's
    segment (when the record has no ``segments``), T^gt, the MCQ letter, the visual QA box."""
    task, answer = rec.task, rec.answer
    w, h = rec.frame_size
    if sample.get("segments") is None and task in TEMPORAL_QA_TASKS:
        seg = first_segment(answer)
        if seg is not None:
            rec.segments.append(seg)
    rec.gt_times = times + [x for seg in rec.segments for x in seg]

    if task in MCQ_TASKS:
        rec.gt_letter = answer_letter(answer)
    if task in VISUAL_QA_TASKS:
        box = first_box(answer)
        if box is not None:
            image_size = sample.get("image_size")
            if image_size is not None:
                iw, ih = (float(x) for x in image_size)
                px = [to_f32(box[0] * w / iw), to_f32(box[1] * h / ih),
                      to_f32(box[2] * w / iw), to_f32(box[3] * h / ih)]
            else:
                px = [to_f32(box[0] * w), to_f32(box[1] * h), to_f32(box[2] * w), to_f32(box[3] * h)]
            if all(v is not None for v in px):
                rec.gt_box = (px[0], px[1], px[2], px[3])


# ---------------------------------------------------------------------------------------
# Many records at once
# ---------------------------------------------------------------------------------------

_TASK_SET = frozenset(TASKS)
_TIME_ORDER = itemgetter(0, 1)
_NUMBER_TYPES = frozenset({int, float})
_SEQUENCES = (list, tuple)


class _Unusual(Exception):
    """A record the batch path leaves to ``convert``: invalid, or valid in a form it does not
    take (Mapping and number subclasses, numbers that overflow a float64)."""


def _size_of(v: object) -> tuple[float, float]:
    # validate's _size on the exact types only
    if (type(v) not in _SEQUENCES or len(v) != 2
            or not all(type(x) in _NUMBER_TYPES and _is_num(x) and x > 0 and _fits_f32(x) for x in v)):
        raise _Unusual
    return float(v[0]), float(v[1])


def _walk(sample: object, times: list, coords: list, seg_nums: list) -> tuple:
    """Check the structure of one record (dict, list, str types: exactly those ``validate``
    takes, less their subclasses) and queue its numbers on the flat lists, whose values and
    types ``convert_many`` checks all at once; raise _Unusual for anything else."""
    if type(sample) is not dict:
        raise _Unusual
    task, answer, frame_size = sample.get("task"), sample.get("answer"), sample.get("frame_size")
    if type(task) is not str or task not in _TASK_SET or type(answer) is not str or frame_size is None:
        raise _Unusual
    w, h = _size_of(frame_size)
    if sample.get("image_size") is not None:
        _size_of(sample["image_size"])
    frames = sample.get("key_frames")
    if frames is not None:
        if type(frames) not in _SEQUENCES:
            raise _Unusual
        for f in frames:
            if type(f) is not dict or "idx" not in f or "time" not in f or type(f["idx"]) is not int:
                raise _Unusual
            times.append(f["time"])
    # key -> [(object name, first box in coords / 4, box count)] of every key_items entry
    # (all are validated, whether or not a key frame names them)
    objects_of: dict[str, list[tuple[str, int, int]]] = {}
    items = sample.get("key_items")
    if items is not None:
        if type(items) is not dict:
            raise _Unusual
        for key, objects in items.items():
            if type(key) is not str or type(objects) is not dict:
                raise _Unusual
            entry = objects_of[key] = []
            for name, boxes in objects.items():
                if type(name) is not str or type(boxes) not in _SEQUENCES:
                    raise _Unusual
                entry.append((name, len(coords) // 4, len(boxes)))
                for b in boxes:
                    if type(b) not in _SEQUENCES or len(b) != 4:
                        raise _Unusual
                    coords += b
    segments = sample.get("segments")
    if segments is not None:
        if type(segments) not in _SEQUENCES:
            raise _Unusual
        for seg in segments:
            if type(seg) not in _SEQUENCES or len(seg) != 2:
                raise _Unusual
            seg_nums += seg
    return w, h, objects_of


def _as_f32(values: list, scale: np.ndarray | None = None) -> np.ndarray:
    """to_f32(float(v) [* scale]) of every value as float64, after validate's number checks
    (exact int or float, finite, the float32 rounding finite); raise _Unusual otherwise.
    numpy's float64 -> float32 cast rounds as struct's "f" packing does (to nearest, even)."""
    if not set(map(type, values)) <= _NUMBER_TYPES:
        raise _Unusual
    try:
        x = np.fromiter(map(float, values), np.float64, len(values))
    except OverflowError:        # an int beyond float64: validate rejects it
        raise _Unusual from None
    if scale is not None and not np.isfinite(x).all():
        raise _Unusual
    # An overflow (to inf, rejected below) must not warn: validate raises ValueError there.
    with np.errstate(over="ignore", invalid="ignore"):
        if scale is not None:
            x = x * scale
        y = x.astype(np.float32)
    if not np.isfinite(y).all():
        raise _Unusual
    return y.astype(np.float64)


def convert_many(samples: Sequence[Mapping], indices: Sequence[int]) -> list[Record]:
    """``[convert(s, i) for s, i in zip(samples, indices)]``, the same Records and the same
    ValueError (the first invalid sample's), in one pass: the structure is walked per record
    but the ~100 numbers of each are checked and rounded to float32 by a few numpy operations
    for all records together (``convert`` pays ~1 us of Python per number, twice). Any record
    the batch path does not take sends the whole call to ``convert``."""
    times: list = []
    coords: list = []
    seg_nums: list = []
    walked = []
    n_boxes = []
    try:
        for sample in samples:
            first = len(coords)
            walked.append(_walk(sample, times, coords, seg_nums))
            n_boxes.append((len(coords) - first) // 4)
        t32 = _as_f32(times).tolist()
        # each box's x1, y1, x2, y2 times its record's W, H, W, H
        scale = np.repeat(np.array([(w, h, w, h) for w, h, _ in walked], dtype=np.float64).reshape(-1, 4),
                          n_boxes, axis=0).reshape(-1)
        px = _as_f32(coords, scale).reshape(-1, 4)
        s32 = _as_f32(seg_nums).tolist()
    except _Unusual:
        return [convert(s, i) for s, i in zip(samples, indices)]
    # convert's corner order: (min(a, c), min(b, d), max(a, c), max(b, d)), Python's min/max
    # (the first argument on ties)
    a, b, c, d = px[:, 0], px[:, 1], px[:, 2], px[:, 3]
    ordered = np.stack([np.where(c < a, c, a), np.where(d < b, d, b),
                        np.where(c > a, c, a), np.where(d > b, d, b)], 1)
    boxes = list(map(tuple, ordered.tolist()))

    out = []
    t_at = s_at = 0
    for sample, (w, h, objects_of) in zip(samples, walked):
        rec = Record(task=sample["task"], answer=sample["answer"], frame_size=(w, h))
        key_frames = sample.get("key_frames") or ()
        rec_times = t32[t_at:t_at + len(key_frames)]
        t_at += len(key_frames)
        frames = []
        for order, f in enumerate(key_frames):
            names, obj_boxes = [], []
            for name, first, count in objects_of.get(str(f["idx"]), ()):
                if count:        # an object with no box is not annotated at this frame
                    names.append(name)
                    obj_boxes.append(boxes[first:first + count])
            if names:
                frames.append((rec_times[order], order, KeyFrame(rec_times[order], names, obj_boxes)))
        frames.sort(key=_TIME_ORDER)
        rec.frames = [kf for _, _, kf in frames]
        if sample.get("segments") is not None:
            n = len(sample["segments"])
            ends = s32[s_at:s_at + 2 * n]
            s_at += 2 * n
            rec.segments = [(s, e) if s <= e else (e, s) for s, e in zip(ends[::2], ends[1::2])]
        _from_answer(rec, sample, rec_times)
        out.append(rec)
    return out



class RewardTargets:
    """A sample's ``Record`` for the frame size the model will see: the data loader's ``targets``
    hook (``visioncoach.data.loader.ClipDataset``), so each record is converted once, in the
    loader's worker, rather than per reward call. ``pixels``: the processor's (min, max) budget."""

    def __init__(self, pixels: tuple[int, int]):
        self.pixels = tuple(pixels)

    def __call__(self, record: Mapping, index: int, frames) -> Record:
        from visioncoach.processor import smart_resize

        h, w = smart_resize(int(frames.shape[1]), int(frames.shape[2]), *self.pixels)
        return convert({**record, "frame_size": [w, h]}, index)
