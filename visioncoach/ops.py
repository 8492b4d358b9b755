"""Native ops from csrc/ (``torch.ops.visioncoach.*``) with their PyTorch references.

The C++ part (``visioncoach._C``) is always built; the CUDA part (``visioncoach._C_cuda``)
only where CUDA and nvcc were present at install time. ``native_info()`` says which loaded.
"""

from __future__ import annotations

import importlib

import torch

from visioncoach import _C  # noqa: F401  (registers the CPU kernels and the op schemas)

try:
    _C_cuda = importlib.import_module("visioncoach._C_cuda")  # registers the CUDA kernels
    _CUDA_ERROR = None
except ImportError as exc:  # not built here, or built against another CUDA runtime
    _C_cuda = None
    _CUDA_ERROR = str(exc)

# transformers' Qwen2-VL processors: OPENAI_CLIP_MEAN / OPENAI_CLIP_STD, patch 14, tp 2, merge 2.
QWEN_MEAN = (0.48145466, 0.4578275, 0.40821073)
QWEN_STD = (0.26862954, 0.26130258, 0.27577711)


def native_info() -> dict:
    return {"cpu": True, "cuda": _C_cuda is not None, "cuda_error": _CUDA_ERROR}


@torch.library.register_fake("visioncoach::patchify_normalize")
def _patchify_fake(frames, mean, std, patch_size, temporal_patch_size, merge_size, dtype):
    f, h, w, _ = frames.shape
    rows = (f // temporal_patch_size) * (h // patch_size) * (w // patch_size)
    return frames.new_empty((rows, 3 * temporal_patch_size * patch_size * patch_size), dtype=dtype)


def patchify_normalize(frames: torch.Tensor, mean=QWEN_MEAN, std=QWEN_STD, patch_size: int = 14,
                       temporal_patch_size: int = 2, merge_size: int = 2,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 frames [F, H, W, 3] -> Qwen2.5-VL ``pixel_values`` [F/tp * H/ps * W/ps, 3*tp*ps*ps].

    One pass of ``(x / 255 - mean) / std`` plus the processor's patch permutation, on the
    device the frames are on. H and W must be multiples of ps * merge (28) and F of tp.
    """
    return torch.ops.visioncoach.patchify_normalize(
        frames, list(map(float, mean)), list(map(float, std)), patch_size, temporal_patch_size,
        merge_size, dtype)


def patchify_normalize_reference(frames: torch.Tensor, mean=QWEN_MEAN, std=QWEN_STD,
                                 patch_size: int = 14, temporal_patch_size: int = 2,
                                 merge_size: int = 2,
                                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Plain PyTorch version: rescale, normalise, then transformers' reshape/permute."""
    f, h, w, c = frames.shape
    x = frames.permute(0, 3, 1, 2).to(torch.float32) / 255.0  # [F, C, H, W]
    m = torch.tensor(mean, dtype=torch.float32, device=frames.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=frames.device).view(1, 3, 1, 1)
    x = (x - m) / s
    gt, gh, gw = f // temporal_patch_size, h // patch_size, w // patch_size
    x = x.reshape(gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size,
                  gw // merge_size, merge_size, patch_size)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size).to(dtype)
