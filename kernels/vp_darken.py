"""Visual prompt ``darken`` (VisionCoach appendix C.1): key objects stand out, the rest is dimmed.

* ``darken``: a pixel is *kept* when its centre lies in some padded key-object box,
  x1 - pad <= px <= x2 + pad and y1 - pad <= py <= y2 + pad; every other pixel becomes
  round(c * darken_factor) per channel. A frame with no boxes (box_count 0) is left unchanged:
  with no key object there is nothing to highlight. A box with a NaN coordinate keeps no pixel
  (its bounds are NaN; the frame is still darkened). Default pad: max(2, round(0.01 max(H, W))).

Conventions shared with the other VP kernels (pixel centres, fp32, rounding, bit-exactness with
the reference): ``visioncoach.kernels.vp_common``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from visioncoach.kernels._backend import Backend, resolve_backend
from visioncoach.kernels.vp_common import (check_boxes, copy_frames, empty_like_frames, f32,
                                           launch_cfg, pixel_centres, round_half_up, round_u8, tile)

__all__ = ["vp_darken", "vp_darken_reference", "default_pad"]


def default_pad(H: int, W: int) -> int:
    """Darken padding around key-object boxes, in pixels."""
    return max(2, round_half_up(0.01 * max(H, W)))


def vp_darken_reference(frames: torch.Tensor, boxes: Optional[torch.Tensor] = None,
                        box_count: Optional[torch.Tensor] = None, *, darken_factor: float = 0.3,
                        pad: Optional[float] = None) -> torch.Tensor:
    """Plain PyTorch specification of ``vp_darken`` (bit-identical output)."""
    boxes, box_count = check_boxes(frames, boxes, box_count, "darken")
    pad = default_pad(*frames.shape[1:3]) if pad is None else pad
    return _darken(frames, boxes, box_count, darken_factor, float(pad)).contiguous()


def _darken(frames, boxes, box_count, factor: float, pad: float):
    F, H, W, _ = frames.shape
    px, py = pixel_centres(H, W, frames.device)
    inside = torch.zeros(F, H, W, dtype=torch.bool, device=frames.device)
    b = boxes.to(torch.float32)
    pad = f32(pad)
    for k in range(b.shape[1]):
        valid = (k < box_count).view(F, 1, 1)
        x1 = (torch.minimum(b[:, k, 0], b[:, k, 2]) - pad).view(F, 1, 1)
        x2 = (torch.maximum(b[:, k, 0], b[:, k, 2]) + pad).view(F, 1, 1)
        y1 = (torch.minimum(b[:, k, 1], b[:, k, 3]) - pad).view(F, 1, 1)
        y2 = (torch.maximum(b[:, k, 1], b[:, k, 3]) + pad).view(F, 1, 1)
        inside |= valid & (px >= x1) & (px <= x2) & (py >= y1) & (py <= y2)
    fac = torch.where(box_count > 0, f32(factor), 1.0).to(torch.float32).view(F, 1, 1, 1)
    dark = round_u8(frames.to(torch.float32) * fac)
    return torch.where(inside[..., None], frames, dark)


@triton.jit
def _darken_outside_boxes_kernel(src_ptr, dst_ptr, boxes_ptr, count_ptr, H, W, Bmax,
                                 factor, pad, BLOCK: tl.constexpr):
    """out = round(c * factor) outside the union of padded boxes, c inside (or no boxes)."""
    f, offs, x, y, ch, off3, m3 = tile(H, W, BLOCK)
    pxc = x.to(tl.float32) + 0.5
    pyc = y.to(tl.float32) + 0.5
    nb = tl.minimum(tl.maximum(tl.load(count_ptr + f), 0), Bmax)
    inside = offs < 0
    for b in range(nb):
        base = boxes_ptr + (f * Bmax + b) * 4
        bx1 = tl.load(base + 0)
        by1 = tl.load(base + 1)
        bx2 = tl.load(base + 2)
        by2 = tl.load(base + 3)
        # NaN-propagating, as torch.minimum/maximum in the reference: a NaN corner makes the
        # bounds NaN and the box cover nothing (vp_common). The default min.f32 / max.f32 would
        # return the other corner and cover pixels the reference does not.
        x1 = tl.minimum(bx1, bx2, propagate_nan=tl.PropagateNan.ALL) - pad
        x2 = tl.maximum(bx1, bx2, propagate_nan=tl.PropagateNan.ALL) + pad
        y1 = tl.minimum(by1, by2, propagate_nan=tl.PropagateNan.ALL) - pad
        y2 = tl.maximum(by1, by2, propagate_nan=tl.PropagateNan.ALL) + pad
        inside = inside | ((pxc >= x1) & (pxc <= x2) & (pyc >= y1) & (pyc <= y2))
    fac = tl.where(nb > 0, factor, 1.0)
    c = tl.load(src_ptr + off3, mask=m3, other=0)
    v = c.to(tl.float32) * fac
    v = tl.minimum(tl.maximum(tl.floor(v + 0.5), 0.0), 255.0)
    out = tl.where(inside[:, None], c, v.to(tl.uint8))
    tl.store(dst_ptr + off3, out, mask=m3)


@torch.library.custom_op("visioncoach::vp_darken", mutates_args=())
def _vp_darken_op(frames: torch.Tensor, boxes: torch.Tensor, box_count: torch.Tensor,
                  factor: float, pad: float) -> torch.Tensor:
    F, H, W, _ = frames.shape
    if F == 0 or H * W == 0 or boxes.shape[1] == 0:
        return copy_frames(frames)
    src = frames.contiguous()
    out = empty_like_frames(src)
    grid, meta = launch_cfg(F, H, W, frames.device)
    _darken_outside_boxes_kernel[grid](
        src, out, boxes.to(torch.float32).contiguous(), box_count.to(torch.int64).contiguous(),
        H, W, boxes.shape[1], f32(factor), f32(pad), **meta)
    return out


@_vp_darken_op.register_fake
def _(frames, boxes, box_count, factor, pad):
    return empty_like_frames(frames)


def vp_darken(frames: torch.Tensor, boxes: Optional[torch.Tensor] = None,
              box_count: Optional[torch.Tensor] = None, *, darken_factor: float = 0.3,
              pad: Optional[float] = None, backend: Backend = "auto") -> torch.Tensor:
    """Darken ``frames`` [F, H, W, 3] uint8 outside the boxes [F, Bmax, 4] (pixel xyxy; only the
    first ``box_count[f]`` rows of frame f, default all) padded by ``pad`` px."""
    if resolve_backend(backend, frames) == "torch":
        return vp_darken_reference(frames, boxes, box_count, darken_factor=darken_factor, pad=pad)
    boxes, box_count = check_boxes(frames, boxes, box_count, "darken")
    pad = default_pad(*frames.shape[1:3]) if pad is None else pad
    return torch.ops.visioncoach.vp_darken(frames, boxes, box_count, float(darken_factor), float(pad))
