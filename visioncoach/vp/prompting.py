"""A hard sample's visual prompt, end to end: boxes for its key frames, the prompt drawn on them,
and the model inputs with the hint appended (Algorithm 1 lines 8-9: x' = VP(x; v), q' = q + hint(v)).
"""

from __future__ import annotations

from typing import Optional

import torch

from visioncoach.processor import ModelInputs, sample_inputs
from visioncoach.vp.render import HeatmapFn, render_key_frames
from visioncoach.vp.spec import add_hint, vp_spec

__all__ = ["KEY_FRAME_MATCH_S", "key_frame_boxes", "key_frame_prompt", "prompted_inputs", "can_render",
           "eligible"]

# A decoded key frame is matched to the record's annotated key frame nearest in time, if
# within this many seconds (decoders land on the frame nearest the requested time).
KEY_FRAME_MATCH_S = 1.0


def key_frame_boxes(record, times: list[float]) -> list[list[list[float]]]:
    """Per decoded key-frame time: the pixel boxes of the annotated key frame nearest in time
    (within ``KEY_FRAME_MATCH_S``; none otherwise). ``record``: a ``rewards.records.Record``."""
    out = []
    for t in times:
        near = min(record.frames, key=lambda f: abs(f.time - t), default=None)
        ok = near is not None and abs(near.time - t) <= KEY_FRAME_MATCH_S
        out.append([b for boxes in near.boxes for b in boxes] if ok else [])
    return out


def _padded(per_frame: list[list[list[float]]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """[K, Bmax, 4] boxes (zero rows past each frame's count) and the counts [K]."""
    bmax = max(len(b) for b in per_frame)
    boxes = torch.zeros(len(per_frame), bmax, 4)
    for i, bs in enumerate(per_frame):
        if bs:
            boxes[i, :len(bs)] = torch.tensor(bs)
    return boxes.to(device), torch.tensor([len(b) for b in per_frame], device=device)


def _targets(is_key: torch.Tensor, vp_type: str, all_frames: bool) -> torch.Tensor:
    """[F] bool: the frames ``vp_type`` is drawn on: the key frames, or every frame for a
    frame_index type when ``all_frames`` (``vp.numpro_frames=all``, appendix C.1)."""
    if all_frames and vp_spec(vp_type).needs == "frame_index":
        return torch.ones_like(is_key, dtype=torch.bool)
    return is_key.bool()


def can_render(vp_type: str, times: torch.Tensor, is_key: torch.Tensor, record, *,
               all_frames: bool = False) -> bool:
    """Whether ``key_frame_prompt`` draws ``vp_type`` on this sample, by the table's ``needs``:
    nothing -> always; frame_index -> a key frame (any frame with ``all_frames``); boxes -> a
    key frame with annotated boxes; heatmap -> a key frame (the caller offers a heatmap type
    only when a CLIP checkpoint is configured)."""
    needs = vp_spec(vp_type).needs
    target = _targets(is_key, vp_type, all_frames)
    if needs is None or not target.any():
        return needs is None
    if needs == "boxes":
        return any(key_frame_boxes(record, times[target].tolist()))
    return True


def eligible(sample, types, *, all_frames: bool = False) -> bool:
    """Whether a ``ClipSample`` can be visually prompted by at least one of ``types`` (the
    types its chooser may pick, ``VPChooser.may_pick``): only such samples go through the
    hard gate with ``vp.hard_eligible=promptable``."""
    return any(can_render(t, sample.times, sample.is_key, sample.reward_record, all_frames=all_frames)
               for t in types)


def key_frame_prompt(frames: torch.Tensor, times: torch.Tensor, is_key: torch.Tensor, record,
                     vp_type: str, *, darken_factor: float, heatmap_fn: Optional[HeatmapFn] = None,
                     question: str = "", all_frames: bool = False) -> torch.Tensor | None:
    """The frames [F, h, w, 3] (already at the model's size, so ``record``'s pixel boxes apply)
    with ``vp_type`` rendered on the key frames (on every frame for a frame_index type when
    ``all_frames``); None when the sample offers nothing to render it from (``can_render``: no
    key frame among the frames, or no annotated box for a box type); a type that needs nothing
    always renders. Numbers are each frame's 1-based position among all frames (the "Frame i"
    of the prompt text); a heatmap's query is the key objects' names (else the question)."""
    if not can_render(vp_type, times, is_key, record, all_frames=all_frames):
        return None
    key = _targets(is_key, vp_type, all_frames).nonzero().flatten()        # [K]
    if key.numel() == 0:                                                   # a type needing nothing
        return frames.clone()
    boxes = box_count = None
    if vp_spec(vp_type).needs == "boxes":
        boxes, box_count = _padded(key_frame_boxes(record, times[key].tolist()), frames.device)
    names = sorted({n for f in record.frames for n in f.names if n})
    out = frames.clone()
    out[key] = render_key_frames(frames[key], vp_type, boxes=boxes, box_count=box_count,
                                 frame_index=key + 1, heatmap_fn=heatmap_fn,
                                 query=", ".join(names) if names else question,
                                 darken_factor=darken_factor)
    return out


def prompted_inputs(sample, frames: torch.Tensor, vp_type: str, tokenizer, data_cfg, *,
                    darken_factor: float, heatmap_fn: Optional[HeatmapFn] = None,
                    all_frames: bool = False) -> ModelInputs | None:
    """Model inputs of ``sample`` (a ``ClipSample``) with ``vp_type`` on its key frames
    (``frames``: its frames at model resolution) and the type's hint appended to the question;
    None when the prompt cannot be rendered on this sample (``key_frame_prompt``)."""
    question = sample.record["question"]
    prompted = key_frame_prompt(frames, sample.times, sample.is_key, sample.reward_record, vp_type,
                                darken_factor=darken_factor, heatmap_fn=heatmap_fn, question=question,
                                all_frames=all_frames)
    if prompted is None:
        return None
    return sample_inputs(sample, prompted, add_hint(question, vp_type), tokenizer, data_cfg)
