"""Native ops from csrc/ (``torch.ops.visioncoach.*``) with their PyTorch references.

The C++ part (``visioncoach._C``) is always built; the CUDA part (``visioncoach._C_cuda``)
only where CUDA and nvcc were present at install time. Without it, the op's CUDA kernel is the
same source compiled at run time by NVRTC through CuPy (``visioncoach.ops_nvrtc``; its launch
is GPU-unverified). ``native_info()`` says which loaded and which will serve CUDA tensors.

The grounding ops (csrc/grounding.cpp) have their Python references elsewhere:
``parse_grounding`` is wrapped by ``visioncoach.grounding.parse_texts`` (reference:
``grounding.parse``), ``identity_match`` below (reference: ``rewards.reference.identity_match``).
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


def cuda_backend() -> str | None:
    """What serves the CUDA kernels in this process: ``"nvcc"`` (``visioncoach._C_cuda``),
    ``"nvrtc"`` (``ops_nvrtc``: compiled at run time by CuPy), or None (no GPU visible, or
    neither is available)."""
    if not torch.cuda.is_available():
        return None
    if _C_cuda is not None:
        return "nvcc"
    from visioncoach import ops_nvrtc

    return "nvrtc" if ops_nvrtc.unavailable_reason() is None else None


def native_info() -> dict:
    """Which parts of the native extension loaded: ``cuda_built`` (the nvcc-built CUDA kernels
    are in this install), ``cuda_backend`` (see ``cuda_backend()``) and ``cuda_usable`` (a
    backend serves CUDA tensors: what a run will use)."""
    backend = cuda_backend()
    error = _CUDA_ERROR
    if _C_cuda is None:
        from visioncoach import ops_nvrtc

        reason = ops_nvrtc.unavailable_reason()
        error = f"{_CUDA_ERROR}; run-time compile: {reason or 'available'}"
    return {"cpu": True, "cuda_built": _C_cuda is not None, "cuda_backend": backend,
            "cuda_usable": backend is not None, "cuda_error": error}


@torch.library.register_fake("visioncoach::patchify_normalize")
def _patchify_fake(frames, mean, std, patch_size, temporal_patch_size, merge_size, dtype):
    f, h, w, _ = frames.shape
    rows = (f // temporal_patch_size) * (h // patch_size) * (w // patch_size)
    return frames.new_empty((rows, 3 * temporal_patch_size * patch_size * patch_size), dtype=dtype)


def _patchify_normalize_nvrtc(frames, mean, std, patch_size, temporal_patch_size, merge_size, dtype):
    from visioncoach import ops_nvrtc

    reason = ops_nvrtc.unavailable_reason()
    if reason is not None:
        raise RuntimeError(
            f"patchify_normalize on {frames.device}: visioncoach._C_cuda is not built "
            f"({_CUDA_ERROR}) and its run-time compiled replacement is unavailable: {reason}")
    # Looked up at call time (not bound at registration) so tests can stop before the launch.
    return ops_nvrtc.patchify_normalize_cuda(frames, mean, std, patch_size, temporal_patch_size,
                                             merge_size, dtype)


if _C_cuda is None:
    # Registered with or without a GPU: only CUDA tensors reach a CUDA kernel.
    _NVRTC_LIBRARY = torch.library.Library("visioncoach", "IMPL")
    _NVRTC_LIBRARY.impl("patchify_normalize", _patchify_normalize_nvrtc, "CUDA")


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


# ---------------------------------------------------------------------------------------
# Grounding (csrc/grounding.cpp)
# ---------------------------------------------------------------------------------------

# The op's integer codes of the identity modes of eq. 7 (reference.IDENTITY_MODES).
IDENTITY_MODE_CODES = {"exact": 0, "soft": 1, "none": 2}


@torch.library.register_fake("visioncoach::parse_grounding")
def _parse_grounding_fake(texts):
    # Every size but N depends on the text: unbacked sizes under torch.compile / fake mode.
    ctx = torch.library.get_ctx()
    n_claims, n_times, n_names = ctx.new_dynamic_size(), ctx.new_dynamic_size(), ctx.new_dynamic_size()
    b_max = ctx.new_dynamic_size(min=1)
    n = len(texts)
    i64, f32 = {"dtype": torch.int64}, {"dtype": torch.float32}
    return (torch.empty(n_claims, **i64), torch.empty(n_claims, **f32),
            torch.empty(n_claims, b_max, 4, **f32), torch.empty(n_claims, **i64),
            torch.empty(n_claims, **i64), torch.empty(n_names, 3, **i64),
            torch.empty(n_times, **i64), torch.empty(n_times, **f32),
            torch.empty(n, 4, **i64), torch.empty(n, **i64))


@torch.library.register_fake("visioncoach::identity_match")
def _identity_match_fake(pred_names, gt_names, mode):
    return torch.empty(len(pred_names), len(gt_names), dtype=torch.bool)


def identity_match(pred_names: list[str], gt_names: list[str], mode: str) -> torch.Tensor:
    """I(o_m, o) of eq. 7 for every pair: bool [len(pred_names), len(gt_names)].

    Names must already be normalized (``grounding.normalize_name``). ``soft``: equal or one
    contains the other; ``exact``: equal; ``none``: always true. Under ``soft``/``exact`` an
    empty name matches nothing.
    """
    if mode not in IDENTITY_MODE_CODES:
        raise ValueError(f"identity mode must be one of {tuple(IDENTITY_MODE_CODES)}, got {mode!r}")
    return torch.ops.visioncoach.identity_match(list(pred_names), list(gt_names), IDENTITY_MODE_CODES[mode])
