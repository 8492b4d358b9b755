"""Drawing a visual prompt on key frames: the table's renderer of each type, with only the input
it needs (``visioncoach.vp.spec``).

``render_vp`` / ``render_vp_reference`` take every per-frame input a type could need, for a
batch of frames [F, H, W, 3] uint8 (stack every sample's key frames): ``boxes`` [F, Bmax, 4]
pixel xyxy and ``box_count`` [F] for ``boxes``, ``frame_index`` [F] for ``frame_index``,
``heatmap`` [F, h, w] for ``heatmap``. ``render_key_frames`` is what the trainer, the selector
build and ``selector.apply`` call: it computes a heatmap only for types that need one.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from visioncoach.kernels import Backend, resolve_backend
from visioncoach.vp.spec import clip_required, vp_spec

__all__ = ["render_vp", "render_vp_reference", "render_key_frames", "HeatmapFn"]

# (frames [K, H, W, 3] uint8, query text) -> relevance maps [K, g, g] (``vp.heatmap``).
HeatmapFn = Callable[[torch.Tensor, str], torch.Tensor]


def _call(fn, spec, frames, boxes, box_count, frame_index, heatmap, options, **extra):
    inputs = {"boxes": (boxes, box_count), "frame_index": (frame_index,), "heatmap": (heatmap,),
              None: ()}[spec.needs]
    return fn(frames, *inputs, **{k: options[k] for k in spec.options}, **extra)


def render_vp_reference(frames: torch.Tensor, vp_type: str, boxes: Optional[torch.Tensor] = None,
                        box_count: Optional[torch.Tensor] = None,
                        frame_index: Optional[torch.Tensor] = None,
                        heatmap: Optional[torch.Tensor] = None, *, darken_factor: float = 0.3,
                        pad: Optional[float] = None, thickness: Optional[float] = None,
                        digit_scale: Optional[int] = None, alpha: float = 0.5) -> torch.Tensor:
    """Plain PyTorch specification of ``render_vp`` (bit-identical output)."""
    spec = vp_spec(vp_type)
    options = dict(darken_factor=darken_factor, pad=pad, thickness=thickness, digit_scale=digit_scale,
                   alpha=alpha)
    return _call(spec.reference, spec, frames, boxes, box_count, frame_index, heatmap, options)


def render_vp(frames: torch.Tensor, vp_type: str, boxes: Optional[torch.Tensor] = None,
              box_count: Optional[torch.Tensor] = None, frame_index: Optional[torch.Tensor] = None,
              heatmap: Optional[torch.Tensor] = None, *, darken_factor: float = 0.3,
              pad: Optional[float] = None, thickness: Optional[float] = None,
              digit_scale: Optional[int] = None, alpha: float = 0.5,
              backend: Backend = "auto") -> torch.Tensor:
    """Render visual prompt ``vp_type`` on key frames [F, H, W, 3] uint8 (module docstring):
    its kernel (Triton on CUDA) or, on CPU or without a kernel, its reference. Returns a new
    contiguous uint8 tensor on the frames' device; one kernel launch for the whole batch."""
    spec = vp_spec(vp_type)
    if resolve_backend(backend, frames) == "torch" or spec.kernel is None:
        return render_vp_reference(frames, vp_type, boxes, box_count, frame_index, heatmap,
                                   darken_factor=darken_factor, pad=pad, thickness=thickness,
                                   digit_scale=digit_scale, alpha=alpha)
    options = dict(darken_factor=darken_factor, pad=pad, thickness=thickness, digit_scale=digit_scale,
                   alpha=alpha)
    return _call(spec.kernel, spec, frames, boxes, box_count, frame_index, heatmap, options,
                 backend=backend)


def render_key_frames(frames: torch.Tensor, vp_type: str, *, boxes: Optional[torch.Tensor] = None,
                      box_count: Optional[torch.Tensor] = None,
                      frame_index: Optional[torch.Tensor] = None,
                      heatmap_fn: Optional[HeatmapFn] = None, query: str = "",
                      darken_factor: float = 0.3, clip_flag: str = "vp.clip_path") -> torch.Tensor:
    """``vp_type`` drawn on key frames [K, H, W, 3] uint8. A heatmap (``heatmap_fn(frames,
    query)``) is computed only for types that need one; without ``heatmap_fn`` such a type is an
    error naming ``clip_flag``. A frame without boxes is left unchanged by box types."""
    spec = vp_spec(vp_type)
    heatmap = None
    if spec.needs == "heatmap":
        if heatmap_fn is None:
            raise ValueError(clip_required(vp_type, clip_flag))
        heatmap = heatmap_fn(frames, query)
    return render_vp(frames, vp_type, boxes, box_count, frame_index, heatmap, darken_factor=darken_factor)
