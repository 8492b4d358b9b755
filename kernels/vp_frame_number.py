"""Visual prompt ``numpro`` (VisionCoach appendix C.1): each frame's number drawn on it.

* ``numpro``: ``frame_index[f]`` in red (255, 0, 0) decimal digits at the bottom-right, drawn
  from the built-in 5x7 bitmap ``DIGIT_GLYPHS`` scaled by an integer s (each glyph cell is an
  s x s block): glyphs are 5s x 7s, s apart, right- and bottom-aligned 2s pixels from the
  frame's right and bottom edges (clipped at the left edge when wider than the frame). Indices
  are clamped to at most 10**NUM_DIGITS - 1; a negative index draws nothing.
  Default s: max(1, round(min(H, W) / 96)) (5 at 448 px).

Conventions shared with the other VP kernels (pixel centres, fp32, rounding, bit-exactness with
the reference): ``visioncoach.kernels.vp_common``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from visioncoach.kernels._backend import Backend, resolve_backend
from visioncoach.kernels.vp_common import (check_frames, copy_frames, empty_like_frames, launch_cfg, round_half_up, tile)

__all__ = ["vp_frame_number", "vp_frame_number_reference", "default_digit_scale", "DIGIT_GLYPHS",
           "GLYPH_H", "GLYPH_W", "NUM_DIGITS"]

NUM_DIGITS = 6                      # at most this many digits are drawn (index <= 999999)

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


def default_digit_scale(H: int, W: int) -> int:
    """Integer scale of the 5x7 digit glyphs (5 at 448 px: 25x35-pixel digits)."""
    return max(1, round_half_up(min(H, W) / 96))


def _check(frames, frame_index, digit_scale):
    check_frames(frames)
    F = frames.shape[0]
    if frame_index is None or frame_index.shape != (F,):
        raise ValueError(f"visual prompt 'numpro' needs frame_index [F={F}]")
    digit_scale = default_digit_scale(*frames.shape[1:3]) if digit_scale is None else int(digit_scale)
    if digit_scale < 1:
        raise ValueError(f"digit_scale must be >= 1, got {digit_scale}")
    return frame_index.to(device=frames.device, dtype=torch.int64).contiguous(), digit_scale


def vp_frame_number_reference(frames: torch.Tensor, frame_index: Optional[torch.Tensor] = None, *,
                              digit_scale: Optional[int] = None) -> torch.Tensor:
    """Plain PyTorch specification of ``vp_frame_number`` (bit-identical output)."""
    frame_index, digit_scale = _check(frames, frame_index, digit_scale)
    return _frame_number(frames, frame_index, digit_scale).contiguous()


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


def _frame_number(frames, frame_index, scale: int):
    F, H, W, _ = frames.shape
    on = _frame_number_mask(F, H, W, frame_index, scale)
    red = torch.tensor([255, 0, 0], dtype=torch.uint8, device=frames.device)
    return torch.where(on[..., None], red, frames)


@triton.jit
def _draw_frame_number_kernel(src_ptr, dst_ptr, index_ptr, glyph_ptr, H, W, scale,
                              GH: tl.constexpr, GW: tl.constexpr, NDIG: tl.constexpr,
                              CAP: tl.constexpr, BLOCK: tl.constexpr):
    """Red GWxGH glyphs (cells scale x scale) of frame_index[f], bottom-right aligned."""
    f, offs, x, y, ch, off3, m3 = tile(H, W, BLOCK)
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


@torch.library.custom_op("visioncoach::vp_frame_number", mutates_args=())
def _vp_frame_number_op(frames: torch.Tensor, frame_index: torch.Tensor, scale: int) -> torch.Tensor:
    F, H, W, _ = frames.shape
    if F == 0 or H * W == 0:
        return copy_frames(frames)
    src = frames.contiguous()
    out = empty_like_frames(src)
    grid, meta = launch_cfg(F, H, W, frames.device)
    _draw_frame_number_kernel[grid](
        src, out, frame_index.to(torch.int64).contiguous(), _glyphs(frames.device), H, W, int(scale),
        GH=GLYPH_H, GW=GLYPH_W, NDIG=NUM_DIGITS, CAP=10 ** NUM_DIGITS - 1, **meta)
    return out


@_vp_frame_number_op.register_fake
def _(frames, frame_index, scale):
    return empty_like_frames(frames)


def vp_frame_number(frames: torch.Tensor, frame_index: Optional[torch.Tensor] = None, *,
                    digit_scale: Optional[int] = None, backend: Backend = "auto") -> torch.Tensor:
    """``frame_index[f]`` [F] drawn in red digits at the bottom-right of ``frames`` [F, H, W, 3] uint8."""
    if resolve_backend(backend, frames) == "torch":
        return vp_frame_number_reference(frames, frame_index, digit_scale=digit_scale)
    frame_index, digit_scale = _check(frames, frame_index, digit_scale)
    return torch.ops.visioncoach.vp_frame_number(frames, frame_index, digit_scale)
