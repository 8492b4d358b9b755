"""Key frames of a sample, the visual-prompt candidates rendered on them, and the contact sheet.

Section 3.3 / appendix C.1: every candidate v_k in V is rendered on the sample's key frames,
x'_k = VP(x; v_k), with ``visioncoach.vp.render_key_frames`` (the visual-prompt table's
renderers); for the paper's pool:

* ``darken`` / ``circle`` use the key-object boxes annotated for each key frame (normalised
  xyxy in the record, scaled here to the decoded frame's pixels); a key frame without boxes is
  left unchanged by both, as the kernel defines;
* ``numpro`` draws each key frame's 1-based position among the key frames (the same number as
  the "Key frame i" text the reasoners see, and the convention of the RL pipeline's clips);
* ``api_prompt`` blends a query-conditioned CLIP relevance map (``visioncoach.vp.heatmap``);
  it needs a local CLIP checkpoint. Without one a heatmap type cannot be rendered: the build
  and apply entry points refuse it with an error naming ``--clip-path`` rather than render it
  as something else (see ``resolve_vp_types``);
* ``raw``: the frames unchanged.

The selector itself sees one image per sample: ``contact_sheet`` tiles the raw key frames in
a near-square grid (appendix C.4).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from visioncoach.vp.render import HeatmapFn, render_key_frames
from visioncoach.vp.spec import clip_required, renderable, vp_spec, vp_types

log = logging.getLogger(__name__)

__all__ = ["KeyFrames", "load_key_frames", "key_frames_at", "render_candidates", "contact_sheet",
           "resolve_vp_types", "boxes_tensor"]

Box = tuple[float, float, float, float]


@dataclass
class KeyFrames:
    """K key frames of one sample, in time order, with their annotated key objects."""
    frames: torch.Tensor                                   # uint8 [K, H, W, 3]
    times: list[float]                                     # seconds
    # Per key frame: object name -> boxes, normalised [0, 1] xyxy.
    objects: list[dict[str, list[Box]]] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        """(W, H) of the frames."""
        return int(self.frames.shape[2]), int(self.frames.shape[1])

    def object_names(self) -> list[str]:
        """Distinct annotated object names, in first-appearance order."""
        seen: dict[str, None] = {}
        for objs in self.objects:
            for name in objs:
                seen.setdefault(name, None)
        return list(seen)


def key_frames_at(path: str | Path, times: Sequence[float], *, max_side: Optional[int] = None,
                  backend: str = "pyav", flag: Optional[str] = None) -> tuple[torch.Tensor, list[float]]:
    """Frames [K, H, W, 3] at the given times (one per time, in the given order) and the
    decoded frames' times. Raises ``visioncoach.data.decode.DecodeError``; with ``flag`` (the
    option the times came from), a time past the clip's end is a ValueError naming it and the
    clip's duration (the decoder would silently take the last frame)."""
    from visioncoach.data.decode import DecodeError, decode

    if not times:
        raise DecodeError(path, "no key-frame times")
    clip = decode(path, nframes=0, key_times=list(times), backend=backend, max_side=max_side)
    late = [t for t in times if t > clip.duration + 1e-3]
    if flag and late:
        raise ValueError(f"{flag} {late[0]:g}: {path} is only {clip.duration:.2f} s long "
                         f"(key-frame times must be in [0, {clip.duration:.2f}])")
    # decode() returns distinct frames in time order; two key times on one frame share it.
    ct = clip.times.tolist()
    pick = [min(range(len(ct)), key=lambda j: abs(ct[j] - t)) for t in times]
    return clip.frames[pick].cpu(), [float(ct[j]) for j in pick]


def load_key_frames(record: Mapping, video: str | Path, *, max_side: Optional[int] = None,
                    backend: str = "pyav") -> KeyFrames:
    """Decode an STGR record's key frames (``key_frames``, sorted by time) and read the key
    objects of each from ``key_items``. Raises ``DecodeError`` (bad video) or ValueError
    (no key frames)."""
    kfs = sorted(record.get("key_frames") or [], key=lambda f: float(f["time"]))
    if not kfs:
        raise ValueError(f"record {record.get('id')!r} has no key_frames")
    frames, _ = key_frames_at(video, [float(f["time"]) for f in kfs], max_side=max_side,
                              backend=backend)
    items = record.get("key_items") or {}
    objects = []
    for f in kfs:
        objs = {}
        for name, boxes in (items.get(str(f["idx"])) or {}).items():
            bs = [tuple(float(v) for v in b) for b in boxes if len(b) == 4]
            if bs:
                objs[str(name)] = bs
        objects.append(objs)
    return KeyFrames(frames, [float(f["time"]) for f in kfs], objects)


def boxes_tensor(objects: Sequence[Mapping[str, Sequence[Box]]], width: int,
                 height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame key-object boxes as ``render_vp`` takes them: [K, Bmax, 4] pixel xyxy
    (normalised boxes scaled by the frame size) and the counts [K]."""
    per = [[b for bs in objs.values() for b in bs] for objs in objects]
    bmax = max([len(p) for p in per] + [1])
    boxes = torch.zeros(len(per), bmax, 4, dtype=torch.float32)
    for k, bs in enumerate(per):
        for j, (x1, y1, x2, y2) in enumerate(bs):
            boxes[k, j] = torch.tensor([x1 * width, y1 * height, x2 * width, y2 * height])
    return boxes, torch.tensor([len(p) for p in per], dtype=torch.int64)


def resolve_vp_types(requested: Optional[Sequence[str]], have_heatmaps: bool,
                     flag: str = "--vp-types") -> list[str]:
    """The candidate types to render. ``None`` = every type of the visual-prompt table, minus
    those needing a CLIP heatmap (with a warning) when no CLIP checkpoint is configured; naming
    such a type explicitly without one, or an unknown type, is an error."""
    if requested is None:
        types = renderable(vp_types(), have_heatmaps)
        for t in vp_types():
            if t not in types:
                log.warning("%s is not a candidate: %s", t, clip_required(t, "--clip-path"))
        return types
    types = list(dict.fromkeys(requested))
    bad = [t for t in types if t not in vp_types()]
    if bad:
        raise ValueError(f"{flag}: unknown visual prompt type(s) {bad}; known: {list(vp_types())}")
    for t in types:
        if vp_spec(t).needs_clip and not have_heatmaps:
            raise ValueError(f"{flag} includes {t}: " + clip_required(t, "--clip-path DIR"))
    if not types:
        raise ValueError(f"{flag}: no visual prompt types given")
    return types


def render_candidates(kf: KeyFrames, vp_types: Sequence[str], question: str = "",
                      heatmap_fn: Optional[HeatmapFn] = None, *,
                      darken_factor: float = 0.3) -> dict[str, torch.Tensor]:
    """x'_k = VP(x; v_k) for every requested type: type -> uint8 [K, H, W, 3]. Key frames are
    numbered 1..K; a heatmap's query is the question."""
    frames = kf.frames
    w, h = kf.size
    k = frames.shape[0]
    boxes, counts = boxes_tensor(kf.objects or [{}] * k, w, h)
    return {vp: render_key_frames(frames, vp, boxes=boxes, box_count=counts,
                                  frame_index=torch.arange(1, k + 1), heatmap_fn=heatmap_fn,
                                  query=question, darken_factor=darken_factor, clip_flag="--clip-path")
            for vp in vp_types}


def contact_sheet(frames: torch.Tensor | np.ndarray, *, gap: int = 4,
                  background: int = 0) -> np.ndarray:
    """Tile K frames [K, H, W, 3] uint8 into one image: ceil(sqrt(K)) columns, rows filled
    left to right, top to bottom, ``gap`` pixels between tiles."""
    arr = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8 or arr.shape[0] == 0:
        raise ValueError(f"contact_sheet needs uint8 [K>=1, H, W, 3] frames, got {arr.dtype} {arr.shape}")
    k, h, w, _ = arr.shape
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    sheet = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), background,
                    dtype=np.uint8)
    for i in range(k):
        r, c = divmod(i, cols)
        sheet[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = arr[i]
    return sheet
