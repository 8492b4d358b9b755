"""The CUDA kernel of ``visioncoach::patchify_normalize`` compiled at run time by NVRTC (via CuPy),
for installs where ``visioncoach._C_cuda`` was not built (no nvcc at install time).

``visioncoach.ops`` registers ``patchify_normalize_cuda`` below as the op's CUDA kernel when
``_C_cuda`` is absent, so callers keep calling the one op. The kernel is the very source nvcc
builds, ``csrc/cuda/patchify_kernel.cuh``, read unchanged; ``cupy.RawModule`` compiles it for
the current device's architecture on first use and caches the binary on disk
(``~/.cupy/kernel_cache``). The launch runs on torch's current stream, with the launch sizes and
argument layout of nvcc's host code (``csrc/cuda/patchify.cu``), on torch tensors' raw pointers.

Verified without a GPU (tests/test_cuda_nvrtc.py): NVRTC accepts the source unchanged and emits
the four kernel entries, whose parameter layout equals the arguments packed here; the launch
sizes and the folded multiply-add factors equal the C++ host helpers'; the op dispatches here
when ``_C_cuda`` is missing. GPU-UNVERIFIED: loading the module and launching the kernel
(``test_nvrtc_matches_cpu``, marked gpu, has not yet run on a device).

One known difference from the nvcc build: CuPy always compiles with ``-ftz=true`` (denormals
flushed to zero), nvcc here without; it changes only results below 1.2e-38 in magnitude, which
needs mean/std far outside any image normalisation.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"
KERNEL_SOURCE = CSRC / "cuda" / "patchify_kernel.cuh"
# What KERNEL_SOURCE includes. CuPy's disk cache is keyed on the program text and the options,
# not on included files, so their digest goes into the options (see nvrtc_options).
INCLUDED_SOURCES = (CSRC / "patchify_layout.h",)
KERNEL = "visioncoach::patchify_cuda_kernel"
# torch dtype -> the kernel's out_t under NVRTC; nvcc instantiates the same four through
# AT_DISPATCH_FLOATING_TYPES_AND2(Half, BFloat16) with at::Half / at::BFloat16.
OUT_TYPES = {torch.float32: "float", torch.float64: "double", torch.float16: "__half",
             torch.bfloat16: "__nv_bfloat16"}

# Byte layouts of the by-value struct arguments (csrc/patchify_layout.h, patchify_kernel.cuh).
GEOMETRY_DTYPE = np.dtype([(f, np.int64) for f in ("frames", "height", "width", "patch",
                                                     "temporal", "merge")], align=True)
AFFINE_DTYPE = np.dtype([("scale", np.float32, (3,)), ("shift", np.float32, (3,))], align=True)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise RuntimeError(
            f"patchify_normalize (NVRTC): kernel source {path} is missing; the run-time compile "
            "needs the csrc/ folder next to the visioncoach package (an editable install or a "
            "checkout)") from None


def kernel_source() -> str:
    """The program NVRTC compiles: csrc/cuda/patchify_kernel.cuh as it is on disk."""
    return _read(KERNEL_SOURCE)


@functools.cache
def launch_constants() -> dict[str, int]:
    """``kPatchifyThreads`` and ``kPatchifyMaxBlocks`` as patchify_kernel.cuh defines them."""
    found = dict(re.findall(r"constexpr\s+\w+\s+(kPatchify\w+)\s*=\s*([^;]+);", kernel_source()))
    constants = {}
    for name in ("kPatchifyThreads", "kPatchifyMaxBlocks"):
        if name not in found:
            raise RuntimeError(f"{KERNEL_SOURCE} no longer defines {name}")
        # Integer literals (LL suffix allowed) joined by '*': anything else is not parsed here.
        factors = [re.fullmatch(r"(\d+)(?:[uU]?[lL]{0,2})", f.strip()) for f in found[name].split("*")]
        if not all(factors):
            raise RuntimeError(f"{KERNEL_SOURCE}: cannot evaluate {name} = {found[name]!r}")
        constants[name] = math.prod(int(m.group(1)) for m in factors)
    return constants


def launch_blocks(total: int) -> int:
    """Grid size for ``total`` output elements: ``patchify_blocks`` of patchify_kernel.cuh."""
    c = launch_constants()
    return min((total + c["kPatchifyThreads"] - 1) // c["kPatchifyThreads"], c["kPatchifyMaxBlocks"])


def affine(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """The kernel's ``Affine3`` (``patchify_affine``): each factor computed in double, rounded
    to float once. A size-1 structured array, which CuPy passes by value."""
    scale = np.array([1.0 / (255.0 * float(s)) for s in std], dtype=np.float64)
    shift = np.array([-float(m) / float(s) for m, s in zip(mean, std)], dtype=np.float64)
    a = np.zeros(1, dtype=AFFINE_DTYPE)
    with np.errstate(over="ignore"):  # a tiny std overflows to inf, silently as in C++
        a["scale"][0], a["shift"][0] = scale.astype(np.float32), shift.astype(np.float32)
    return a


def check_args(shape: Sequence[int], frames_dtype: torch.dtype, mean: Sequence[float],
               std: Sequence[float], patch: int, temporal: int, merge: int) -> None:
    """``check_patchify_args`` of csrc/patchify.h: the same checks, in order, same messages."""
    def fail(msg: str):
        raise RuntimeError(f"patchify_normalize: {msg}")

    if len(shape) != 4 or shape[3] != 3:
        fail(f"frames must be [F, H, W, 3] RGB, got {list(shape)}")
    if frames_dtype != torch.uint8:
        fail(f"frames must be uint8, got {frames_dtype}")
    if len(mean) != 3 or len(std) != 3:
        fail("mean and std need 3 values")
    if not all(s > 0 for s in std):  # `not >` so that a NaN std fails too, as in C++
        fail("std must be positive")
    if not (patch > 0 and temporal > 0 and merge > 0):
        fail("sizes must be positive")
    f, h, w = shape[:3]
    if f % temporal:
        fail(f"frame count {f} is not a multiple of temporal_patch_size {temporal} "
             "(repeat the last frame, as the Qwen2.5-VL processor does)")
    if h % (patch * merge) or w % (patch * merge):
        fail(f"frame size {h}x{w} is not a multiple of {patch * merge} "
             "(resize to multiples of patch_size * merge_size first)")


def kernel_name(dtype: torch.dtype) -> str:
    """The name expression of the kernel instantiation writing ``dtype``."""
    if dtype not in OUT_TYPES:
        raise RuntimeError(f'"patchify_normalize_cuda" not implemented for {dtype} '
                           f"(output dtypes: {', '.join(map(str, OUT_TYPES))})")
    return f"{KERNEL}<{OUT_TYPES[dtype]}>"


@dataclass(frozen=True)
class LaunchPlan:
    """Everything a launch needs besides the two pointers (all host-side, no device work)."""

    rows: int
    cols: int
    blocks: int
    threads: int
    geometry: np.ndarray  # size-1 GEOMETRY_DTYPE: PatchGeometry by value
    affine: np.ndarray  # size-1 AFFINE_DTYPE: Affine3 by value

    @property
    def total(self) -> int:
        return self.rows * self.cols

    def args(self, src_ptr: int, dst_ptr: int) -> tuple:
        """Kernel arguments in the order of patchify_cuda_kernel's parameters."""
        return (src_ptr, dst_ptr, self.geometry, self.affine, np.int64(self.total))


def plan_launch(shape: Sequence[int], mean: Sequence[float], std: Sequence[float], patch: int,
                temporal: int, merge: int) -> LaunchPlan:
    """Output shape, grid, block and by-value arguments for frames of ``shape`` [F, H, W, 3]
    (arguments already checked), as patchify.cu's host code computes them."""
    f, h, w = (int(v) for v in shape[:3])
    rows = (f // temporal) * (h // patch) * (w // patch)
    cols = 3 * temporal * patch * patch
    geometry = np.array([(f, h, w, patch, temporal, merge)], dtype=GEOMETRY_DTYPE)
    return LaunchPlan(rows=rows, cols=cols, blocks=launch_blocks(rows * cols),
                      threads=launch_constants()["kPatchifyThreads"], geometry=geometry,
                      affine=affine(mean, std))


@functools.cache
def cuda_include_dir() -> str:
    """The CUDA headers CuPy found (cuda_fp16.h / cuda_bf16.h come from there)."""
    import cupy

    root = cupy.cuda.get_cuda_path()
    include = os.path.join(root, "include") if root else None
    if include is None or not os.path.isfile(os.path.join(include, "cuda_bf16.h")):
        raise RuntimeError(
            f"patchify_normalize (NVRTC): no CUDA headers (cuda_fp16.h, cuda_bf16.h) under CuPy's "
            f"CUDA path {root!r}; install the CUDA runtime wheel with headers "
            "(nvidia-cuda-runtime) or a CUDA toolkit")
    return include


def nvrtc_options() -> tuple[str, ...]:
    """Options of the run-time compile, minus the -arch CuPy picks for the device."""
    digest = hashlib.sha256("\0".join(_read(p) for p in INCLUDED_SOURCES).encode()).hexdigest()[:16]
    return ("-std=c++17", f"-I{CSRC / 'cuda'}", f"-I{cuda_include_dir()}",
            f"-DVISIONCOACH_INCLUDED_SOURCES_SHA={digest}")


@functools.cache
def unavailable_reason() -> str | None:
    """Why the run-time compile cannot be used here, or None when it can."""
    try:
        import cupy  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a broken CuPy install fails in many ways
        return f"CuPy is not importable ({exc}); install the gpu extra: pip install 'visioncoach[gpu]'"
    if not KERNEL_SOURCE.is_file():
        return f"kernel source {KERNEL_SOURCE} is not in this install"
    return None


def compile_ptx(arch: int, extra_options: Sequence[str] = ()) -> tuple[str, dict[str, str]]:
    """NVRTC-compile the kernel source for ``compute_<arch>`` without a device (CuPy's own
    compile asks the device for its architecture): PTX and each name expression's mangled name.
    What RawModule compiles at run time, less the options CuPy adds."""
    from cupy.cuda import nvrtc

    prog = nvrtc.createProgram(kernel_source(), KERNEL_SOURCE.name, (), ())
    try:
        names = [kernel_name(dt) for dt in OUT_TYPES]
        for name in names:
            nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, (*nvrtc_options(), f"-arch=compute_{arch}", *extra_options))
        except nvrtc.NVRTCError:
            raise RuntimeError(f"NVRTC rejected {KERNEL_SOURCE}:\n{nvrtc.getProgramLog(prog)}") from None
        ptx = nvrtc.getPTX(prog)
        lowered = {name: nvrtc.getLoweredName(prog, name) for name in names}
    finally:
        nvrtc.destroyProgram(prog)
    return (ptx.decode() if isinstance(ptx, bytes) else ptx), lowered


@functools.cache
def _module():
    import cupy

    return cupy.RawModule(code=kernel_source(), options=nvrtc_options(),
                          name_expressions=[kernel_name(dt) for dt in OUT_TYPES])


@functools.cache
def _kernel(name: str):
    return _module().get_function(name)


def patchify_normalize_cuda(frames: torch.Tensor, mean: list[float], std: list[float],
                            patch_size: int, temporal_patch_size: int, merge_size: int,
                            dtype: torch.dtype) -> torch.Tensor:
    """The op's CUDA kernel (same schema as patchify_normalize_cuda in csrc/cuda/patchify.cu).
    GPU-unverified: see the module docstring."""
    if not frames.is_cuda:
        raise RuntimeError("patchify_normalize_cuda: frames must be on a CUDA device")
    check_args(frames.shape, frames.dtype, mean, std, patch_size, temporal_patch_size, merge_size)
    name = kernel_name(dtype)
    plan = plan_launch(frames.shape, mean, std, patch_size, temporal_patch_size, merge_size)
    src = frames.contiguous()  # [F, H, W, 3] uint8
    out = torch.empty((plan.rows, plan.cols), dtype=dtype, device=frames.device)  # [rows, cols]
    if plan.total == 0:  # CuPy would round an empty grid up to one block
        return out
    import cupy

    with cupy.cuda.Device(frames.device.index):
        kernel = _kernel(name)
        # torch's stream, so the launch is ordered with the surrounding torch work and the
        # caching allocator's stream-ordered reuse of `src` stays safe.
        with cupy.cuda.Stream.from_external(torch.cuda.current_stream(frames.device)):
            kernel((plan.blocks,), (plan.threads,), plan.args(src.data_ptr(), out.data_ptr()))
    return out
