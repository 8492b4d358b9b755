"""Visual prompt ``circle`` (VisionCoach appendix C.1): a red elliptical ring around each key object.

* ``circle``: a pure red (255, 0, 0) elliptical ring around each box (no anti-aliasing), after
  Shtedritski et al. (2023). With box centre (cx, cy) and half sizes (hw, hh), the ring's inner
  edge is the ellipse through the box corners, semi-axes (a_i, b_i) = sqrt(2) (hw, hh), and its
  outer edge has semi-axes (a_i + t, b_i + t) for stroke width t; a pixel is on the ring when

      q_o = dx^2 / (a_i + t)^2 + dy^2 / (b_i + t)^2 <= 1   and   q_i = dx^2 / a_i^2 + dy^2 / b_i^2 >= 1

  with (dx, dy) = (px - cx, py - cy). The box itself lies inside the inner ellipse, so the ring
  never covers the object. A box with a_i or b_i below 1e-3 px (zero width or height) gets a
  filled ellipse (q_i counts as >= 1). Default t: max(2, round(max(H, W) / 112)).
  The per-box reciprocals are computed once in torch (``_ellipse_params``) and shared by the
  kernel and the reference, so the per-pixel work has no division.

Conventions shared with the other VP kernels (pixel centres, fp32, rounding, bit-exactness with
the reference): ``visioncoach.kernels.vp_common``.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import triton
import triton.language as tl

from visioncoach.kernels._backend import Backend, resolve_backend
from visioncoach.kernels.vp_common import (check_boxes, copy_frames, empty_like_frames, f32,
                                           launch_cfg, pixel_centres, round_half_up, tile)

__all__ = ["vp_circle", "vp_circle_reference", "default_thickness"]

_SQRT2 = float(np.float32(math.sqrt(2.0)))
_MIN_SEMI_AXIS = 1e-3               # px; a thinner inner ellipse is treated as empty (filled ring)
_N_PARAM = 8                        # per-box ellipse parameters (7 used, padded to 8)


def default_thickness(H: int, W: int) -> int:
    """Red-ellipse stroke width in pixels (4 at 448 px, 6 at 640 px)."""
    return max(2, round_half_up(max(H, W) / 112))


def _thickness(frames, thickness):
    thickness = default_thickness(*frames.shape[1:3]) if thickness is None else thickness
    if thickness <= 0:
        raise ValueError(f"thickness must be > 0, got {thickness}")
    return float(thickness)


def vp_circle_reference(frames: torch.Tensor, boxes: Optional[torch.Tensor] = None,
                        box_count: Optional[torch.Tensor] = None, *,
                        thickness: Optional[float] = None) -> torch.Tensor:
    """Plain PyTorch specification of ``vp_circle`` (bit-identical output)."""
    boxes, box_count = check_boxes(frames, boxes, box_count, "circle")
    return _circle(frames, boxes, box_count, _thickness(frames, thickness)).contiguous()


def _ellipse_params(boxes: torch.Tensor, thickness: float) -> torch.Tensor:
    """[F, Bmax, 4] xyxy -> [F, Bmax, 8] (cx, cy, 1/a_o^2, 1/b_o^2, 1/a_i^2, 1/b_i^2, bias, 0).

    Used by both the kernel path and the reference, so the divisions happen once, in torch.
    """
    b = boxes.to(torch.float32)
    x1 = torch.minimum(b[..., 0], b[..., 2])
    x2 = torch.maximum(b[..., 0], b[..., 2])
    y1 = torch.minimum(b[..., 1], b[..., 3])
    y2 = torch.maximum(b[..., 1], b[..., 3])
    cx = (x1 + x2) * 0.5
    cy = (y1 + y2) * 0.5
    ai = ((x2 - x1) * 0.5) * _SQRT2
    bi = ((y2 - y1) * 0.5) * _SQRT2
    t = f32(thickness)
    ao = ai + t
    bo = bi + t
    degenerate = (ai < _MIN_SEMI_AXIS) | (bi < _MIN_SEMI_AXIS)
    ia_o = 1.0 / (ao * ao)
    ib_o = 1.0 / (bo * bo)
    ia_i = torch.where(degenerate, 0.0, 1.0 / torch.where(degenerate, 1.0, ai * ai))
    ib_i = torch.where(degenerate, 0.0, 1.0 / torch.where(degenerate, 1.0, bi * bi))
    bias = degenerate.to(torch.float32)
    zero = torch.zeros_like(cx)
    return torch.stack([cx, cy, ia_o, ib_o, ia_i, ib_i, bias, zero], dim=-1).contiguous()


def _circle(frames, boxes, box_count, thickness: float):
    F, H, W, _ = frames.shape
    px, py = pixel_centres(H, W, frames.device)
    prm = _ellipse_params(boxes, thickness)
    on = torch.zeros(F, H, W, dtype=torch.bool, device=frames.device)
    for k in range(prm.shape[1]):
        valid = (k < box_count).view(F, 1, 1)
        cx, cy, iao, ibo, iai, ibi, bias = (prm[:, k, j].view(F, 1, 1) for j in range(7))
        dx = px - cx
        dy = py - cy
        dx2 = dx * dx
        dy2 = dy * dy
        qo = dx2 * iao + dy2 * ibo
        qi = dx2 * iai + dy2 * ibi + bias
        on |= valid & (qo <= 1.0) & (qi >= 1.0)
    red = torch.tensor([255, 0, 0], dtype=torch.uint8, device=frames.device)
    return torch.where(on[..., None], red, frames)


@triton.jit
def _draw_ellipses_kernel(src_ptr, dst_ptr, params_ptr, count_ptr, H, W, Bmax,
                          NPARAM: tl.constexpr, BLOCK: tl.constexpr):
    """Pure red where a pixel centre lies on any box's elliptical ring (module docstring)."""
    f, offs, x, y, ch, off3, m3 = tile(H, W, BLOCK)
    pxc = x.to(tl.float32) + 0.5
    pyc = y.to(tl.float32) + 0.5
    nb = tl.minimum(tl.maximum(tl.load(count_ptr + f), 0), Bmax)
    on = offs < 0
    for b in range(nb):
        p = params_ptr + (f * Bmax + b) * NPARAM
        cx = tl.load(p + 0)
        cy = tl.load(p + 1)
        iao = tl.load(p + 2)
        ibo = tl.load(p + 3)
        iai = tl.load(p + 4)
        ibi = tl.load(p + 5)
        bias = tl.load(p + 6)
        dx = pxc - cx
        dy = pyc - cy
        dx2 = dx * dx
        dy2 = dy * dy
        qo = dx2 * iao + dy2 * ibo
        qi = dx2 * iai + dy2 * ibi + bias
        on = on | ((qo <= 1.0) & (qi >= 1.0))
    c = tl.load(src_ptr + off3, mask=m3, other=0)
    red = tl.where(ch == 0, 255, 0).to(tl.uint8)
    out = tl.where(on[:, None], red[None, :], c)
    tl.store(dst_ptr + off3, out, mask=m3)


@torch.library.custom_op("visioncoach::vp_circle", mutates_args=())
def _vp_circle_op(frames: torch.Tensor, boxes: torch.Tensor, box_count: torch.Tensor,
                  thickness: float) -> torch.Tensor:
    F, H, W, _ = frames.shape
    if F == 0 or H * W == 0 or boxes.shape[1] == 0:
        return copy_frames(frames)
    src = frames.contiguous()
    out = empty_like_frames(src)
    params = _ellipse_params(boxes, thickness)
    grid, meta = launch_cfg(F, H, W, frames.device)
    _draw_ellipses_kernel[grid](
        src, out, params, box_count.to(torch.int64).contiguous(), H, W, boxes.shape[1],
        NPARAM=_N_PARAM, **meta)
    return out


@_vp_circle_op.register_fake
def _(frames, boxes, box_count, thickness):
    return empty_like_frames(frames)


def vp_circle(frames: torch.Tensor, boxes: Optional[torch.Tensor] = None,
              box_count: Optional[torch.Tensor] = None, *, thickness: Optional[float] = None,
              backend: Backend = "auto") -> torch.Tensor:
    """Red rings of stroke ``thickness`` px around the boxes [F, Bmax, 4] (pixel xyxy; the first
    ``box_count[f]`` rows of frame f, default all) on ``frames`` [F, H, W, 3] uint8."""
    if resolve_backend(backend, frames) == "torch":
        return vp_circle_reference(frames, boxes, box_count, thickness=thickness)
    boxes, box_count = check_boxes(frames, boxes, box_count, "circle")
    return torch.ops.visioncoach.vp_circle(frames, boxes, box_count, _thickness(frames, thickness))
