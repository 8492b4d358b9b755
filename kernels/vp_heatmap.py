"""Visual prompt ``api_prompt`` (VisionCoach appendix C.1): a query-conditioned attention heatmap
blended over the frame (the maps come from ``visioncoach.vp.heatmap``, CLIP relevance).

* ``api_prompt``: the heatmap m (values clamped to [0, 1], NaN -> 0, +inf -> 1) is bilinearly
  upsampled to H x W with the half-pixel rule of ``F.interpolate(mode="bilinear",
  align_corners=False)`` (source x = (x + 0.5) * w/W - 0.5 clamped at 0, likewise y with h/H;
  computed in the kernel), then with a = alpha * m:  out = c * (1 - a) + color(m) * a, color(m) = (255, 255 m, 0)
  (a red -> yellow ramp). m = 0 leaves the pixel unchanged.

Conventions shared with the other VP kernels (pixel centres, fp32, rounding, bit-exactness with
the reference): ``visioncoach.kernels.vp_common``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from visioncoach.kernels._backend import Backend, resolve_backend
from visioncoach.kernels.vp_common import (check_frames, copy_frames, empty_like_frames, f32,
                                           launch_cfg, round_u8, tile)

__all__ = ["vp_heatmap_blend", "vp_heatmap_blend_reference"]


def _check(frames, heatmap):
    check_frames(frames)
    F = frames.shape[0]
    if heatmap is None or heatmap.dim() != 3 or heatmap.shape[0] != F \
            or heatmap.shape[1] == 0 or heatmap.shape[2] == 0:
        raise ValueError(f"visual prompt 'api_prompt' needs a non-empty heatmap [F={F}, h, w]")
    heatmap = heatmap.to(device=frames.device, dtype=torch.float32)
    return heatmap.nan_to_num(nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0).contiguous()


def vp_heatmap_blend_reference(frames: torch.Tensor, heatmap: Optional[torch.Tensor] = None, *,
                               alpha: float = 0.5) -> torch.Tensor:
    """Plain PyTorch specification of ``vp_heatmap_blend`` (bit-identical output)."""
    return _heatmap_blend(frames, _check(frames, heatmap), alpha).contiguous()


def _upsample_heatmap_reference(heatmap: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """[F, h, w] -> [F, H, W] bilinear (align_corners=False), clamped to [0, 1], fp32."""
    F, h, w = heatmap.shape
    dev = heatmap.device
    rw, rh = f32(w / W), f32(h / H)
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


def _heatmap_blend(frames, heatmap, alpha: float):
    F, H, W, _ = frames.shape
    m = _upsample_heatmap_reference(heatmap, H, W)                         # [F, H, W]
    am = f32(alpha) * m
    keep = 1.0 - am
    col = torch.stack([torch.full_like(m, 255.0), 255.0 * m, torch.zeros_like(m)], dim=-1)
    out = frames.to(torch.float32) * keep[..., None] + col * am[..., None]
    return round_u8(out)


@triton.jit
def _blend_heatmap_kernel(src_ptr, dst_ptr, heat_ptr, H, W, h, w, rh, rw, alpha,
                          BLOCK: tl.constexpr):
    """Bilinear upsampling of heatmap[f] to the frame, then the red-yellow alpha blend."""
    f, offs, x, y, ch, off3, m3 = tile(H, W, BLOCK)
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


@torch.library.custom_op("visioncoach::vp_heatmap_blend", mutates_args=())
def _vp_heatmap_blend_op(frames: torch.Tensor, heatmap: torch.Tensor, alpha: float) -> torch.Tensor:
    F, H, W, _ = frames.shape
    if F == 0 or H * W == 0:
        return copy_frames(frames)
    h, w = heatmap.shape[1:]
    src = frames.contiguous()
    out = empty_like_frames(src)
    grid, meta = launch_cfg(F, H, W, frames.device)
    _blend_heatmap_kernel[grid](
        src, out, heatmap.to(torch.float32).contiguous(), H, W, h, w,
        f32(h / H), f32(w / W), f32(alpha), **meta)
    return out


@_vp_heatmap_blend_op.register_fake
def _(frames, heatmap, alpha):
    return empty_like_frames(frames)


def vp_heatmap_blend(frames: torch.Tensor, heatmap: Optional[torch.Tensor] = None, *,
                     alpha: float = 0.5, backend: Backend = "auto") -> torch.Tensor:
    """``heatmap`` [F, h, w] (bilinearly upsampled) blended red -> yellow over ``frames`` [F, H, W, 3]."""
    if resolve_backend(backend, frames) == "torch":
        return vp_heatmap_blend_reference(frames, heatmap, alpha=alpha)
    return torch.ops.visioncoach.vp_heatmap_blend(frames, _check(frames, heatmap), float(alpha))
