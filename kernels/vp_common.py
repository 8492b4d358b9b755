"""What the visual-prompt kernels (``vp_darken``, ``vp_circle``, ``vp_frame_number``,
``vp_heatmap``) share: frame checks, pixel geometry, rounding and the launch grid.

Every VP op renders on a batch of key frames ``[F, H, W, 3]`` uint8 (the F frames may come from
many samples) and returns a new contiguous uint8 tensor on the frames' device; each is one
kernel launch over a grid of (frame, pixel tile), with a plain PyTorch reference beside it.
``visioncoach.vp`` picks the op of a visual-prompt type from its table (``visioncoach.vp.spec``).

Geometry. Pixel (x, y) has its centre at (px, py) = (x + 0.5, y + 0.5) in the box coordinate
frame (pixels, origin at the top-left corner of the frame). Boxes may lie partly or wholly
outside the frame (rasterisation clips them), may be 1x1, may overlap; swapped corners are
reordered. A box with any NaN coordinate covers nothing: the corner ordering (min / max)
propagates NaN in kernel and reference alike (``tl.PropagateNan.ALL``; Triton's default drops
it, as the GPU's min.f32 does), and every comparison with a NaN bound is false.

Rounding. All arithmetic is fp32; every output value v is written as clamp(floor(v + 0.5), 0, 255).

Exactness. ``render_vp_reference`` is plain PyTorch performing the same fp32 operations in the
same order; kernel and reference agree bit for bit on uint8. The kernels are compiled with
``enable_fp_fusion=False`` so that no multiply-add is contracted to an FMA on GPU (which would
round differently from torch's separate ops); scalars (factor, pad, alpha, scales) are rounded
to fp32 on the host once and passed identically to both paths.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl

__all__ = ["check_frames", "check_boxes", "f32", "round_half_up", "round_u8", "pixel_centres", "tile",
           "launch_cfg", "empty_like_frames", "copy_frames"]


def check_frames(frames: torch.Tensor) -> None:
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")


def f32(v: float) -> float:
    """A Python float rounded to fp32, as a Triton fp32 scalar argument sees it."""
    return float(np.float32(v))


def round_half_up(v: float) -> int:
    return int(math.floor(v + 0.5))


def round_u8(v: torch.Tensor) -> torch.Tensor:
    return torch.floor(v + 0.5).clamp(0.0, 255.0).to(torch.uint8)


def check_boxes(frames: torch.Tensor, boxes, box_count, vp_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated boxes [F, Bmax, 4] fp32 and counts [F] int64 on the frames' device (counts
    default to Bmax); ``vp_type`` names the visual prompt in errors."""
    check_frames(frames)
    F = frames.shape[0]
    if boxes is None:
        raise ValueError(f"visual prompt {vp_type!r} needs boxes [F, Bmax, 4]")
    if boxes.dim() != 3 or boxes.shape[0] != F or boxes.shape[2] != 4:
        raise ValueError(f"boxes must be [F={F}, Bmax, 4], got {tuple(boxes.shape)}")
    boxes = boxes.to(device=frames.device, dtype=torch.float32).contiguous()
    if box_count is None:
        box_count = torch.full((F,), boxes.shape[1], dtype=torch.int64, device=frames.device)
    if box_count.shape != (F,):
        raise ValueError(f"box_count must be [F={F}], got {tuple(box_count.shape)}")
    return boxes, box_count.to(device=frames.device, dtype=torch.int64).contiguous()


def pixel_centres(H: int, W: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """px [1, 1, W], py [1, H, 1] fp32 pixel centres."""
    px = torch.arange(W, device=device, dtype=torch.float32) + 0.5
    py = torch.arange(H, device=device, dtype=torch.float32) + 0.5
    return px.view(1, 1, W), py.view(1, H, 1)


@triton.jit
def tile(H, W, BLOCK: tl.constexpr):
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


def launch_cfg(F: int, H: int, W: int, device: torch.device):
    """(grid, meta) for a frames x pixel-tiles launch."""
    hw = H * W
    if device.type == "cuda":
        block, meta = 512, dict(num_warps=4, enable_fp_fusion=False)
    else:   # the interpreter: one big tile per frame is far cheaper than many small ones
        block, meta = max(16, min(4096, triton.next_power_of_2(hw))), {}
    return (F, triton.cdiv(hw, block)), dict(BLOCK=block, **meta)


def empty_like_frames(frames):
    return torch.empty_like(frames, memory_format=torch.contiguous_format)


def copy_frames(frames: torch.Tensor) -> torch.Tensor:
    return frames.clone(memory_format=torch.contiguous_format)
