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
from collections.abc import Mapping
from dataclasses import dataclass, field

from visioncoach.grounding import Box, answer_letter, first_box, first_segment, to_f32

__all__ = ["TASKS", "MCQ_TASKS", "FREE_FORM_TASKS", "TEMPORAL_QA_TASKS", "VISUAL_QA_TASKS",
           "TEMPORAL_SPATIAL_TASK", "Record", "KeyFrame", "RewardTargets", "validate", "convert"]

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
    elif task in TEMPORAL_QA_TASKS:
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
    return rec


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
