"""Plug-and-play visual prompting on benchmark items (paper Table 6, appendix C.4 "Inference"):
``python -m visioncoach.predict ... --vp TYPE`` or ``--selector DIR``.

Each item's visual prompt is a fixed type (``--vp``) or the trained VP-Selector's choice
(``--selector``, greedy; its input is the question and the item's key frames, all frames when
it has none), drawn with the same code as RL (``vp.prompting.key_frame_prompt``, the table's
renderers) on the frames the model sees, with the type's hint appended to every question of
the item (``vp.add_hint``). What each benchmark offers to draw from:

* V-STAR: its ground-truth boxes per timestamp. Those timestamps are decoded as key frames
  among the uniform frames (as training inserts annotated key frames) and the boxes, rescaled
  from video pixels, are the key-object boxes: an oracle visual prompt, as Table 6 uses the
  annotated key objects.
* Charades-STA and MCQ: no key frames and no boxes. ``numpro`` with ``--numpro-frames all``
  (the default, appendix C.1) numbers every frame; every other type falls back to raw.

A type that cannot be drawn on an item (no key frames, no boxes, a heatmap type without
``--clip-path``) falls back to raw: the item gets exactly the input of a run without a visual
prompt. Every prediction line records ``vp`` (what was drawn), ``vp_requested`` (what ``--vp``
or the selector asked for) and, after a fallback, ``vp_note`` (why); ``summary`` counts both.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import torch

from visioncoach.data.clip import DecodedClip
from visioncoach.eval.vstar import VStarItem
from visioncoach.processor import resize_frames
from visioncoach.rewards.records import TEMPORAL_SPATIAL_TASK, KeyFrame, Record
from visioncoach.vp.prompting import key_frame_prompt
from visioncoach.vp.spec import RAW, clip_required, vp_spec, vp_types

__all__ = ["PlugAndPlay", "item_question", "benchmark_record"]


def item_question(item) -> str:
    """The question of a ``predict.Item`` (V-STAR / MCQ question, Charades query)."""
    data = item.data
    return str(getattr(data, "question", None) or getattr(data, "query", "") or "")


def benchmark_record(boxes, video_size: tuple[float, float], frame_size: tuple[int, int]) -> Record:
    """A reward ``Record`` holding only what ``key_frame_prompt`` reads: one key frame per
    annotated timestamp with its boxes, rescaled from video pixels (``video_size``) to those
    of the frames the model sees (``frame_size``). Unnamed objects: a heatmap's query is then
    the question."""
    sx, sy = frame_size[0] / video_size[0], frame_size[1] / video_size[1]
    by_time: dict[float, list] = {}
    for t, (x1, y1, x2, y2) in boxes:
        by_time.setdefault(float(t), []).append((x1 * sx, y1 * sy, x2 * sx, y2 * sy))
    frames = [KeyFrame(t, [""], [bs]) for t, bs in sorted(by_time.items())]
    return Record(task=TEMPORAL_SPATIAL_TASK, answer="", frame_size=tuple(map(float, frame_size)),
                  frames=frames)


class PlugAndPlay:
    """The visual prompt of each benchmark item (module docstring). ``vp_type`` or ``selector``
    (a loaded ``visioncoach.selector.Selector``); ``heatmap_fn`` for heatmap types."""

    def __init__(self, vp_type: Optional[str] = None, selector=None, *, heatmap_fn=None,
                 numpro_frames: str = "all", darken_factor: float = 0.3):
        if (vp_type is None) == (selector is None):
            raise ValueError("give exactly one of --vp TYPE and --selector DIR")
        if vp_type is not None and vp_type not in vp_types():
            raise ValueError(f"--vp {vp_type!r}: unknown visual prompt type; known: {list(vp_types())}")
        if vp_type is not None and vp_spec(vp_type).needs_clip and heatmap_fn is None:
            raise ValueError(f"--vp {vp_type}: " + clip_required(vp_type, "--clip-path DIR"))
        if numpro_frames not in ("all", "key"):
            raise ValueError(f"--numpro-frames must be all or key, got {numpro_frames!r}")
        self.vp_type, self.selector, self.heatmap_fn = vp_type, selector, heatmap_fn
        self.all_frames, self.darken_factor = numpro_frames == "all", darken_factor
        self.applied: Counter = Counter()      # type drawn -> items
        self.fallbacks: Counter = Counter()    # (requested, why) -> items
        self._cache: tuple | None = None       # (frames, times, vision) of the last input

    @classmethod
    def build(cls, *, vp: Optional[str], selector: Optional[str], clip_path: Optional[str],
              numpro_frames: str, device) -> "PlugAndPlay":
        """From ``predict``'s flags; ValueError / FileNotFoundError name the flag."""
        sel = heat = None
        if selector:
            from visioncoach.selector.model import Selector

            if not Path(selector).is_dir():
                raise FileNotFoundError(f"--selector {selector}: not a folder")
            sel = Selector(selector, device=device)
        if clip_path:
            from visioncoach.vp.heatmap import clip_heatmap_fn

            heat = clip_heatmap_fn(clip_path, device=device)
        return cls(vp, sel, heatmap_fn=heat, numpro_frames=numpro_frames)

    # -- one item ------------------------------------------------------------------------------
    def prepare(self, session, item, clip: DecodedClip) -> tuple[DecodedClip, object, dict]:
        """(the clip the model sees, the item with its applied type, the fields for its
        prediction line) for one item; ``clip``: its video's uniform frames."""
        data = item.data
        boxes = data.boxes if isinstance(data, VStarItem) else []
        key_times = tuple(sorted({float(t) for t, _ in boxes}))
        keyed = session.decode(item.video, key_times) if key_times else clip
        question = item_question(item)
        requested = self.vp_type or self._select(question, keyed)
        applied, note, prompted = requested, "", None
        if requested != RAW:
            frames = resize_frames(keyed.frames.to(session.device), session.min_pixels, session.max_pixels)
            size = (int(frames.shape[2]), int(frames.shape[1]))
            record = benchmark_record(boxes, (data.width, data.height), size) if boxes else \
                Record(task=TEMPORAL_SPATIAL_TASK, answer="", frame_size=tuple(map(float, size)))
            if vp_spec(requested).needs_clip and self.heatmap_fn is None:
                note = clip_required(requested, "--clip-path DIR")
            else:
                prompted = key_frame_prompt(frames, keyed.times, keyed.is_key, record, requested,
                                            darken_factor=self.darken_factor, heatmap_fn=self.heatmap_fn,
                                            question=question, all_frames=self.all_frames)
                if prompted is None:
                    note = (f"{requested} needs key-frame boxes; this item has none" if keyed.is_key.any()
                            else f"{requested} needs key frames; this item has none")
            if prompted is None:
                applied = RAW
                self.fallbacks[(requested, note)] += 1
        self.applied[applied] += 1
        fields = {"vp": applied, "vp_requested": requested, **({"vp_note": note} if note else {})}
        if prompted is None:     # nothing drawn: the very input of a run without a visual prompt
            return clip, dataclasses.replace(item, vp=None), fields
        return (DecodedClip(prompted, keyed.times, keyed.is_key, keyed.duration),
                dataclasses.replace(item, vp=applied), fields)

    def _select(self, question: str, clip: DecodedClip) -> str:
        frames = clip.frames[clip.is_key] if clip.is_key.any() else clip.frames
        return self.selector.predict([{"question": question, "frames": frames, "key_objects": ()}])[0]

    def wrap(self, predict: Callable) -> Callable:
        """``predict`` (a ``visioncoach.predict`` benchmark function) on prompted inputs, its
        lines extended with the ``vp`` fields. Visual features are reused across items only
        when their frames are the same (prompted frames differ per item)."""
        def prompted_predict(session, clip, item, vision):
            pclip, pitem, fields = self.prepare(session, item, clip)
            cached = None
            if self._cache is not None and self._cache[0].shape == pclip.frames.shape \
                    and torch.equal(self._cache[1], pclip.times) and torch.equal(self._cache[0], pclip.frames):
                cached = self._cache[2]
            rec, vision = predict(session, pclip, pitem, cached)
            self._cache = (pclip.frames, pclip.times, vision)
            return {**rec, **fields}, None
        return prompted_predict

    def summary(self) -> str:
        """One line: how many items got which visual prompt, and the fallbacks to raw by cause."""
        out = "visual prompts drawn: " + (", ".join(f"{k} {v}" for k, v in sorted(self.applied.items())) or "none")
        if self.fallbacks:
            out += "; fell back to raw: " + "; ".join(f"{n} x {why}" for (_, why), n in sorted(self.fallbacks.items()))
        return out
