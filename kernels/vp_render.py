"""Visual-prompt (VP) rendering on key frames (VisionCoach appendix C.1), batched over frames.

``render_vp(frames [F, H, W, 3] uint8, vp_type, ...)`` returns a new uint8 tensor on the frames'
device. The F frames may come from many samples (stack every sample's key frames); each type is
one kernel launch over a grid of (frame, pixel tile). Per-frame inputs: ``boxes [F, Bmax, 4]``
fp32 pixel xyxy (padded, only the first ``box_count[f]`` rows are read), ``frame_index [F]``
int64, ``heatmap [F, h, w]`` fp32.

Geometry. Pixel (x, y) has its centre at (px, py) = (x + 0.5, y + 0.5) in the box coordinate
frame (pixels, origin at the top-left corner of the frame). Boxes may lie partly or wholly
outside the frame (rasterisation clips them), may be 1x1, may overlap; swapped corners are
reordered. NaN boxes cover nothing.

Types (all arithmetic fp32, every output value v is written as clamp(floor(v + 0.5), 0, 255)):

* ``darken``: a pixel is *kept* when its centre lies in some padded key-object box,
  x1 - pad <= px <= x2 + pad and y1 - pad <= py <= y2 + pad; every other pixel becomes
  round(c * darken_factor) per channel. A frame with no boxes (box_count 0) is left unchanged:
  with no key object there is nothing to highlight. Default pad: max(2, round(0.01 max(H, W))).
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
* ``numpro``: ``frame_index[f]`` in red (255, 0, 0) decimal digits at the bottom-right, drawn
  from the built-in 5x7 bitmap ``DIGIT_GLYPHS`` scaled by an integer s (each glyph cell is an
  s x s block): glyphs are 5s x 7s, s apart, right- and bottom-aligned 2s pixels from the
  frame's right and bottom edges (clipped at the left edge when wider than the frame). Indices
  are clamped to at most 10**NUM_DIGITS - 1; a negative index draws nothing.
  Default s: max(1, round(min(H, W) / 96)) (5 at 448 px).
* ``api_prompt``: the heatmap m (values clamped to [0, 1], NaN -> 0, +inf -> 1) is bilinearly
  upsampled to H x W with the half-pixel rule of ``F.interpolate(mode="bilinear",
  align_corners=False)`` (source x = (x + 0.5) * w/W - 0.5 clamped at 0, likewise y with h/H;
  computed in the kernel), then with a = alpha * m:  out = c * (1 - a) + color(m) * a, color(m) = (255, 255 m, 0)
  (a red -> yellow ramp). m = 0 leaves the pixel unchanged.
* ``raw``: a copy.

Exactness. ``render_vp_reference`` is plain PyTorch performing the same fp32 operations in the
same order; kernel and reference agree bit for bit on uint8. The kernels are compiled with
``enable_fp_fusion=False`` so that no multiply-add is contracted to an FMA on GPU (which would
round differently from torch's separate ops); scalars (factor, pad, alpha, scales) are rounded
to fp32 on the host once and passed identically to both paths.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import triton
import triton.language as tl

from visioncoach.kernels._backend import Backend, resolve_backend

__all__ = [
    "VP_TYPES", "DIGIT_GLYPHS", "GLYPH_H", "GLYPH_W", "NUM_DIGITS", "render_vp", "render_vp_reference",
    "default_pad", "default_thickness", "default_digit_scale",
]

VP_TYPES = ("api_prompt", "circle", "darken", "numpro", "raw")
NUM_DIGITS = 6                      # at most this many digits are drawn (index <= 999999)
_SQRT2 = float(np.float32(math.sqrt(2.0)))
_MIN_SEMI_AXIS = 1e-3               # px; a thinner inner ellipse is treated as empty (filled ring)
_N_PARAM = 8                        # per-box ellipse parameters (7 used, padded to 8)

# 5x7 glyphs of 0-9 (the classic LCD character-ROM shapes, unslashed zero), rows top to
# bottom, 1 = ink.
_GLYPH_ROWS = {
    0: ("01110", "10001", "10001", "10001", "10001", "10001", "01110"),
    1: ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    2: ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    3: ("11111", "00010", "00100", "00010", "00001", "10001", "01110"),
    4: ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    5: ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    6: ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    7: ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    8: ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    9: ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
}
GLYPH_H, GLYPH_W = 7, 5
DIGIT_GLYPHS = torch.tensor([[[int(c) for c in row] for row in _GLYPH_ROWS[d]] for d in range(10)],
                            dtype=torch.uint8)                              # [10, 7, 5]
_glyph_cache: dict[torch.device, torch.Tensor] = {}


def _glyphs(device: torch.device) -> torch.Tensor:
    g = _glyph_cache.get(device)
    if g is None:
        g = _glyph_cache[device] = DIGIT_GLYPHS.to(device).contiguous()
    return g


def _f32(v: float) -> float:
    """A Python float rounded to fp32, as a Triton fp32 scalar argument sees it."""
    return float(np.float32(v))


def _round_half_up(v: float) -> int:
    return int(math.floor(v + 0.5))


def default_pad(H: int, W: int) -> int:
    """Darken padding around key-object boxes, in pixels."""
    return max(2, _round_half_up(0.01 * max(H, W)))


def default_thickness(H: int, W: int) -> int:
    """Red-ellipse stroke width in pixels (4 at 448 px, 6 at 640 px)."""
    return max(2, _round_half_up(max(H, W) / 112))


def default_digit_scale(H: int, W: int) -> int:
    """Integer scale of the 5x7 digit glyphs (5 at 448 px: 25x35-pixel digits)."""
    return max(1, _round_half_up(min(H, W) / 96))


# --------------------------------------------------------------------------- shared helpers


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
    t = _f32(thickness)
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


def _round_u8(v: torch.Tensor) -> torch.Tensor:
    return torch.floor(v + 0.5).clamp(0.0, 255.0).to(torch.uint8)


def _pixel_centres(H: int, W: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """px [1, 1, W], py [1, H, 1] fp32 pixel centres."""
    px = torch.arange(W, device=device, dtype=torch.float32) + 0.5
    py = torch.arange(H, device=device, dtype=torch.float32) + 0.5
    return px.view(1, 1, W), py.view(1, H, 1)


# --------------------------------------------------------------------------- reference


def _darken_reference(frames, boxes, box_count, factor: float, pad: float):
    F, H, W, _ = frames.shape
    px, py = _pixel_centres(H, W, frames.device)
    inside = torch.zeros(F, H, W, dtype=torch.bool, device=frames.device)
    b = boxes.to(torch.float32)
    pad = _f32(pad)
    for k in range(b.shape[1]):
        valid = (k < box_count).view(F, 1, 1)
        x1 = (torch.minimum(b[:, k, 0], b[:, k, 2]) - pad).view(F, 1, 1)
        x2 = (torch.maximum(b[:, k, 0], b[:, k, 2]) + pad).view(F, 1, 1)
        y1 = (torch.minimum(b[:, k, 1], b[:, k, 3]) - pad).view(F, 1, 1)
        y2 = (torch.maximum(b[:, k, 1], b[:, k, 3]) + pad).view(F, 1, 1)
        inside |= valid & (px >= x1) & (px <= x2) & (py >= y1) & (py <= y2)
    fac = torch.where(box_count > 0, _f32(factor), 1.0).to(torch.float32).view(F, 1, 1, 1)
    dark = _round_u8(frames.to(torch.float32) * fac)
    return torch.where(inside[..., None], frames, dark)


def _circle_reference(frames, boxes, box_count, thickness: float):
    F, H, W, _ = frames.shape
    px, py = _pixel_centres(H, W, frames.device)
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


def _frame_number_mask(F: int, H: int, W: int, frame_index: torch.Tensor, scale: int) -> torch.Tensor:
    """[F, H, W] bool: the ink pixels of each frame's index label."""
    dev = frame_index.device
    s = int(scale)
    margin = 2 * s
    gh, gw = GLYPH_H * s, GLYPH_W * s
    idx = frame_index.to(torch.int64).view(F, 1, 1)
    nd = torch.where(idx >= 0, 1, 0)
    for r in range(1, NUM_DIGITS):
        nd = nd + (idx >= 10 ** r).to(torch.int64)
    idx = idx.clamp(0, 10 ** NUM_DIGITS - 1)
    on = torch.zeros(F, H, W, dtype=torch.bool, device=dev)
    # Only the label's band of rows can hold ink: evaluate the glyph lookup there.
    y_lo = max(H - margin - gh, 0)
    y_hi = max(H - margin, 0)
    if y_hi <= y_lo:
        return on
    x = torch.arange(W, device=dev).view(1, 1, W)
    y = torch.arange(y_lo, y_hi, device=dev).view(1, -1, 1)
    gy = y - (H - margin - gh)
    row_ok = (gy >= 0) & (gy < gh)
    row = (gy.clamp(min=0) // s).clamp(max=GLYPH_H - 1)
    glyph = _glyphs(dev).view(-1).to(torch.int64)
    band = torch.zeros(F, y_hi - y_lo, W, dtype=torch.bool, device=dev)
    for r in range(NUM_DIGITS):
        digit = (idx // 10 ** r) % 10                                      # [F, 1, 1]
        lim = torch.where(nd > r, gw, 0)                                   # [F, 1, 1]
        gx = x - (W - margin - gw - r * (GLYPH_W + 1) * s)
        ok = row_ok & (gx >= 0) & (gx < lim)
        col = (gx.clamp(min=0) // s).clamp(max=GLYPH_W - 1)
        bit = glyph[(digit * (GLYPH_H * GLYPH_W) + row * GLYPH_W + col).clamp(0, glyph.numel() - 1)]
        band |= ok & (bit != 0)
    on[:, y_lo:y_hi] = band
    return on


def _frame_number_reference(frames, frame_index, scale: int):
    F, H, W, _ = frames.shape
    on = _frame_number_mask(F, H, W, frame_index, scale)
    red = torch.tensor([255, 0, 0], dtype=torch.uint8, device=frames.device)
    return torch.where(on[..., None], red, frames)


def _upsample_heatmap_reference(heatmap: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """[F, h, w] -> [F, H, W] bilinear (align_corners=False), clamped to [0, 1], fp32."""
    F, h, w = heatmap.shape
    dev = heatmap.device
    rw, rh = _f32(w / W), _f32(h / H)
    sx = ((torch.arange(W, device=dev, dtype=torch.float32) + 0.5) * rw - 0.5).clamp(min=0.0)
    sy = ((torch.arange(H, device=dev, dtype=torch.float32) + 0.5) * rh - 0.5).clamp(min=0.0)
    x0 = torch.floor(sx).to(torch.int64).clamp(max=w - 1)
    y0 = torch.floor(sy).to(torch.int64).clamp(max=h - 1)
    x1 = (x0 + 1).clamp(max=w - 1)
    y1 = (y0 + 1).clamp(max=h - 1)
    lx = (sx - x0.to(torch.float32)).view(1, 1, W)
    ly = (sy - y0.to(torch.float32)).view(1, H, 1)
    hm = heatmap.to(torch.float32)
    v00 = hm[:, y0][:, :, x0]
    v01 = hm[:, y0][:, :, x1]
    v10 = hm[:, y1][:, :, x0]
    v11 = hm[:, y1][:, :, x1]
    top = (1.0 - lx) * v00 + lx * v01
    bot = (1.0 - lx) * v10 + lx * v11
    m = (1.0 - ly) * top + ly * bot
    return m.clamp(0.0, 1.0)


def _heatmap_blend_reference(frames, heatmap, alpha: float):
    F, H, W, _ = frames.shape
    m = _upsample_heatmap_reference(heatmap, H, W)                         # [F, H, W]
    am = _f32(alpha) * m
    keep = 1.0 - am
    col = torch.stack([torch.full_like(m, 255.0), 255.0 * m, torch.zeros_like(m)], dim=-1)
    out = frames.to(torch.float32) * keep[..., None] + col * am[..., None]
    return _round_u8(out)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _tile(H, W, BLOCK: tl.constexpr):
    """This program's pixel ids and coordinates, channel offsets of a [BLOCK, 4] RGB tile."""
    f = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    pix_ok = offs < H * W
    y = offs // W
    x = offs - y * W
    ch = tl.arange(0, 4)
    off3 = f * H * W * 3 + offs[:, None] * 3 + ch[None, :]
    m3 = pix_ok[:, None] & (ch[None, :] < 3)
    return f, offs, x, y, ch, off3, m3


@triton.jit
def _darken_outside_boxes_kernel(src_ptr, dst_ptr, boxes_ptr, count_ptr, H, W, Bmax,
                                 factor, pad, BLOCK: tl.constexpr):
    """out = round(c * factor) outside the union of padded boxes, c inside (or no boxes)."""
    f, offs, x, y, ch, off3, m3 = _tile(H, W, BLOCK)
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
        x1 = tl.minimum(bx1, bx2) - pad
        x2 = tl.maximum(bx1, bx2) + pad
        y1 = tl.minimum(by1, by2) - pad
        y2 = tl.maximum(by1, by2) + pad
        inside = inside | ((pxc >= x1) & (pxc <= x2) & (pyc >= y1) & (pyc <= y2))
    fac = tl.where(nb > 0, factor, 1.0)
    c = tl.load(src_ptr + off3, mask=m3, other=0)
    v = c.to(tl.float32) * fac
    v = tl.minimum(tl.maximum(tl.floor(v + 0.5), 0.0), 255.0)
    out = tl.where(inside[:, None], c, v.to(tl.uint8))
    tl.store(dst_ptr + off3, out, mask=m3)


@triton.jit
def _draw_ellipses_kernel(src_ptr, dst_ptr, params_ptr, count_ptr, H, W, Bmax,
                          NPARAM: tl.constexpr, BLOCK: tl.constexpr):
    """Pure red where a pixel centre lies on any box's elliptical ring (module docstring)."""
    f, offs, x, y, ch, off3, m3 = _tile(H, W, BLOCK)
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


@triton.jit
def _draw_frame_number_kernel(src_ptr, dst_ptr, index_ptr, glyph_ptr, H, W, scale,
                              GH: tl.constexpr, GW: tl.constexpr, NDIG: tl.constexpr,
                              CAP: tl.constexpr, BLOCK: tl.constexpr):
    """Red GWxGH glyphs (cells scale x scale) of frame_index[f], bottom-right aligned."""
    f, offs, x, y, ch, off3, m3 = _tile(H, W, BLOCK)
    idx = tl.load(index_ptr + f).to(tl.int64)
    nd = tl.where(idx >= 0, 1, 0)
    p = tl.full([], 10, tl.int64)
    for r in range(1, NDIG):
        nd += tl.where(idx >= p, 1, 0)
        p = p * 10
    idx = tl.minimum(tl.maximum(idx, 0), CAP)
    margin = 2 * scale
    gy = y - (H - margin - GH * scale)
    row_ok = (gy >= 0) & (gy < GH * scale) & (offs < H * W)
    row = tl.minimum(tl.maximum(gy, 0) // scale, GH - 1)
    on = offs < 0
    p = tl.full([], 1, tl.int64)
    for r in range(NDIG):
        digit = ((idx // p) % 10).to(tl.int32)
        lim = tl.where(nd > r, GW * scale, 0)
        gx = x - (W - margin - GW * scale - r * (GW + 1) * scale)
        ok = row_ok & (gx >= 0) & (gx < lim)
        col = tl.minimum(tl.maximum(gx, 0) // scale, GW - 1)
        bit = tl.load(glyph_ptr + digit * (GH * GW) + row * GW + col, mask=ok, other=0)
        on = on | (bit != 0)
        p = p * 10
    c = tl.load(src_ptr + off3, mask=m3, other=0)
    red = tl.where(ch == 0, 255, 0).to(tl.uint8)
    out = tl.where(on[:, None], red[None, :], c)
    tl.store(dst_ptr + off3, out, mask=m3)


@triton.jit
def _blend_heatmap_kernel(src_ptr, dst_ptr, heat_ptr, H, W, h, w, rh, rw, alpha,
                          BLOCK: tl.constexpr):
    """Bilinear upsampling of heatmap[f] to the frame, then the red-yellow alpha blend."""
    f, offs, x, y, ch, off3, m3 = _tile(H, W, BLOCK)
    pix_ok = offs < H * W
    sx = tl.maximum((x.to(tl.float32) + 0.5) * rw - 0.5, 0.0)
    sy = tl.maximum((y.to(tl.float32) + 0.5) * rh - 0.5, 0.0)
    x0 = tl.minimum(tl.floor(sx).to(tl.int32), w - 1)
    y0 = tl.minimum(tl.floor(sy).to(tl.int32), h - 1)
    x1 = tl.minimum(x0 + 1, w - 1)
    y1 = tl.minimum(y0 + 1, h - 1)
    lx = sx - x0.to(tl.float32)
    ly = sy - y0.to(tl.float32)
    hb = heat_ptr + f * h * w
    v00 = tl.load(hb + y0 * w + x0, mask=pix_ok, other=0.0)
    v01 = tl.load(hb + y0 * w + x1, mask=pix_ok, other=0.0)
    v10 = tl.load(hb + y1 * w + x0, mask=pix_ok, other=0.0)
    v11 = tl.load(hb + y1 * w + x1, mask=pix_ok, other=0.0)
    top = (1.0 - lx) * v00 + lx * v01
    bot = (1.0 - lx) * v10 + lx * v11
    m = (1.0 - ly) * top + ly * bot
    m = tl.minimum(tl.maximum(m, 0.0), 1.0)
    am = alpha * m
    keep = 1.0 - am
    green = 255.0 * m
    col = tl.where(ch[None, :] == 0, 255.0, tl.where(ch[None, :] == 1, green[:, None], 0.0))
    c = tl.load(src_ptr + off3, mask=m3, other=0).to(tl.float32)
    v = c * keep[:, None] + col * am[:, None]
    v = tl.minimum(tl.maximum(tl.floor(v + 0.5), 0.0), 255.0)
    tl.store(dst_ptr + off3, v.to(tl.uint8), mask=m3)


# --------------------------------------------------------------------------- launchers


def _launch_cfg(F: int, H: int, W: int, device: torch.device):
    """(grid, meta) for a frames x pixel-tiles launch."""
    hw = H * W
    if device.type == "cuda":
        block, meta = 512, dict(num_warps=4, enable_fp_fusion=False)
    else:   # the interpreter: one big tile per frame is far cheaper than many small ones
        block, meta = max(16, min(4096, triton.next_power_of_2(hw))), {}
    return (F, triton.cdiv(hw, block)), dict(BLOCK=block, **meta)


def _empty_like_frames(frames):
    return torch.empty_like(frames, memory_format=torch.contiguous_format)


@torch.library.custom_op("visioncoach::vp_darken", mutates_args=())
def _vp_darken_op(frames: torch.Tensor, boxes: torch.Tensor, box_count: torch.Tensor,
                  factor: float, pad: float) -> torch.Tensor:
    F, H, W, _ = frames.shape
    if F == 0 or H * W == 0 or boxes.shape[1] == 0:
        return frames.clone(memory_format=torch.contiguous_format)
    src = frames.contiguous()
    out = _empty_like_frames(src)
    grid, meta = _launch_cfg(F, H, W, frames.device)
    _darken_outside_boxes_kernel[grid](
        src, out, boxes.to(torch.float32).contiguous(), box_count.to(torch.int64).contiguous(),
        H, W, boxes.shape[1], _f32(factor), _f32(pad), **meta)
    return out


@_vp_darken_op.register_fake
def _(frames, boxes, box_count, factor, pad):
    return _empty_like_frames(frames)


@torch.library.custom_op("visioncoach::vp_circle", mutates_args=())
def _vp_circle_op(frames: torch.Tensor, boxes: torch.Tensor, box_count: torch.Tensor,
                  thickness: float) -> torch.Tensor:
    F, H, W, _ = frames.shape
    if F == 0 or H * W == 0 or boxes.shape[1] == 0:
        return frames.clone(memory_format=torch.contiguous_format)
    src = frames.contiguous()
    out = _empty_like_frames(src)
    params = _ellipse_params(boxes, thickness)
    grid, meta = _launch_cfg(F, H, W, frames.device)
    _draw_ellipses_kernel[grid](
        src, out, params, box_count.to(torch.int64).contiguous(), H, W, boxes.shape[1],
        NPARAM=_N_PARAM, **meta)
    return out


@_vp_circle_op.register_fake
def _(frames, boxes, box_count, thickness):
    return _empty_like_frames(frames)


@torch.library.custom_op("visioncoach::vp_frame_number", mutates_args=())
def _vp_frame_number_op(frames: torch.Tensor, frame_index: torch.Tensor, scale: int) -> torch.Tensor:
    F, H, W, _ = frames.shape
    if F == 0 or H * W == 0:
        return frames.clone(memory_format=torch.contiguous_format)
    src = frames.contiguous()
    out = _empty_like_frames(src)
    grid, meta = _launch_cfg(F, H, W, frames.device)
    _draw_frame_number_kernel[grid](
        src, out, frame_index.to(torch.int64).contiguous(), _glyphs(frames.device), H, W, int(scale),
        GH=GLYPH_H, GW=GLYPH_W, NDIG=NUM_DIGITS, CAP=10 ** NUM_DIGITS - 1, **meta)
    return out


@_vp_frame_number_op.register_fake
def _(frames, frame_index, scale):
    return _empty_like_frames(frames)


@torch.library.custom_op("visioncoach::vp_heatmap_blend", mutates_args=())
def _vp_heatmap_blend_op(frames: torch.Tensor, heatmap: torch.Tensor, alpha: float) -> torch.Tensor:
    F, H, W, _ = frames.shape
    if F == 0 or H * W == 0:
        return frames.clone(memory_format=torch.contiguous_format)
    h, w = heatmap.shape[1:]
    src = frames.contiguous()
    out = _empty_like_frames(src)
    grid, meta = _launch_cfg(F, H, W, frames.device)
    _blend_heatmap_kernel[grid](
        src, out, heatmap.to(torch.float32).contiguous(), H, W, h, w,
        _f32(h / H), _f32(w / W), _f32(alpha), **meta)
    return out


@_vp_heatmap_blend_op.register_fake
def _(frames, heatmap, alpha):
    return _empty_like_frames(frames)


# --------------------------------------------------------------------------- public


def _prepare(frames, vp_type, boxes, box_count, frame_index, heatmap, pad, thickness, digit_scale):
    """Validate, move the per-frame inputs to the frames' device, fill in defaults."""
    if vp_type not in VP_TYPES:
        raise ValueError(f"unknown visual prompt type {vp_type!r}; known: {list(VP_TYPES)}")
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    F, H, W, _ = frames.shape
    dev = frames.device
    if vp_type in ("darken", "circle"):
        if boxes is None:
            raise ValueError(f"vp_type {vp_type!r} needs boxes [F, Bmax, 4]")
        if boxes.dim() != 3 or boxes.shape[0] != F or boxes.shape[2] != 4:
            raise ValueError(f"boxes must be [F={F}, Bmax, 4], got {tuple(boxes.shape)}")
        boxes = boxes.to(device=dev, dtype=torch.float32).contiguous()
        if box_count is None:
            box_count = torch.full((F,), boxes.shape[1], dtype=torch.int64, device=dev)
        if box_count.shape != (F,):
            raise ValueError(f"box_count must be [F={F}], got {tuple(box_count.shape)}")
        box_count = box_count.to(device=dev, dtype=torch.int64).contiguous()
    if vp_type == "numpro":
        if frame_index is None or frame_index.shape != (F,):
            raise ValueError(f"vp_type 'numpro' needs frame_index [F={F}]")
        frame_index = frame_index.to(device=dev, dtype=torch.int64).contiguous()
    if vp_type == "api_prompt":
        if heatmap is None or heatmap.dim() != 3 or heatmap.shape[0] != F \
                or heatmap.shape[1] == 0 or heatmap.shape[2] == 0:
            raise ValueError(f"vp_type 'api_prompt' needs a non-empty heatmap [F={F}, h, w]")
        heatmap = heatmap.to(device=dev, dtype=torch.float32)
        heatmap = heatmap.nan_to_num(nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0).contiguous()
    pad = default_pad(H, W) if pad is None else pad
    thickness = default_thickness(H, W) if thickness is None else thickness
    if thickness <= 0:
        raise ValueError(f"thickness must be > 0, got {thickness}")
    digit_scale = default_digit_scale(H, W) if digit_scale is None else int(digit_scale)
    if digit_scale < 1:
        raise ValueError(f"digit_scale must be >= 1, got {digit_scale}")
    return boxes, box_count, frame_index, heatmap, float(pad), float(thickness), digit_scale


def render_vp_reference(frames: torch.Tensor, vp_type: str, boxes: Optional[torch.Tensor] = None,
                        box_count: Optional[torch.Tensor] = None,
                        frame_index: Optional[torch.Tensor] = None,
                        heatmap: Optional[torch.Tensor] = None, *, darken_factor: float = 0.3,
                        pad: Optional[float] = None, thickness: Optional[float] = None,
                        digit_scale: Optional[int] = None, alpha: float = 0.5) -> torch.Tensor:
    """Plain PyTorch specification of ``render_vp`` (bit-identical output)."""
    boxes, box_count, frame_index, heatmap, pad, thickness, digit_scale = _prepare(
        frames, vp_type, boxes, box_count, frame_index, heatmap, pad, thickness, digit_scale)
    if vp_type == "raw":
        return frames.clone(memory_format=torch.contiguous_format)
    if vp_type == "darken":
        return _darken_reference(frames, boxes, box_count, darken_factor, pad).contiguous()
    if vp_type == "circle":
        return _circle_reference(frames, boxes, box_count, thickness).contiguous()
    if vp_type == "numpro":
        return _frame_number_reference(frames, frame_index, digit_scale).contiguous()
    return _heatmap_blend_reference(frames, heatmap, alpha).contiguous()


def render_vp(frames: torch.Tensor, vp_type: str, boxes: Optional[torch.Tensor] = None,
              box_count: Optional[torch.Tensor] = None, frame_index: Optional[torch.Tensor] = None,
              heatmap: Optional[torch.Tensor] = None, *, darken_factor: float = 0.3,
              pad: Optional[float] = None, thickness: Optional[float] = None,
              digit_scale: Optional[int] = None, alpha: float = 0.5,
              backend: Backend = "auto") -> torch.Tensor:
    """Render visual prompt ``vp_type`` on key frames [F, H, W, 3] uint8 (module docstring).

    ``boxes`` [F, Bmax, 4] xyxy pixels and ``box_count`` [F] (default: all Bmax rows) for
    ``darken``/``circle``; ``frame_index`` [F] for ``numpro``; ``heatmap`` [F, h, w] for
    ``api_prompt``. Returns a new contiguous uint8 tensor on the frames' device; one kernel
    launch for the whole batch.
    """
    if resolve_backend(backend, frames) == "torch":
        return render_vp_reference(frames, vp_type, boxes, box_count, frame_index, heatmap,
                                   darken_factor=darken_factor, pad=pad, thickness=thickness,
                                   digit_scale=digit_scale, alpha=alpha)
    boxes, box_count, frame_index, heatmap, pad, thickness, digit_scale = _prepare(
        frames, vp_type, boxes, box_count, frame_index, heatmap, pad, thickness, digit_scale)
    if vp_type == "raw":
        return frames.clone(memory_format=torch.contiguous_format)
    if vp_type == "darken":
        return torch.ops.visioncoach.vp_darken(frames, boxes, box_count, float(darken_factor), pad)
    if vp_type == "circle":
        return torch.ops.visioncoach.vp_circle(frames, boxes, box_count, thickness)
    if vp_type == "numpro":
        return torch.ops.visioncoach.vp_frame_number(frames, frame_index, digit_scale)
    return torch.ops.visioncoach.vp_heatmap_blend(frames, heatmap, float(alpha))
