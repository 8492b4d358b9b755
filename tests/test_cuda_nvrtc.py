"""The run-time compiled (NVRTC via CuPy) CUDA kernel of patchify_normalize (visioncoach.ops_nvrtc).

Without a device: NVRTC compiles the nvcc source unchanged, the PTX parameters match the packed
arguments, the launch sizes and affine factors equal the C++ host helpers' (run through a C++
compiler), the argument checks equal the C++ op's, and the op dispatches to this path when
visioncoach._C_cuda is missing. The launch itself is checked only by the gpu-marked test.
"""

import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from visioncoach import ops, ops_nvrtc

cupy = pytest.importorskip("cupy", reason="CuPy (the gpu extra) is not installed")


def _nvrtc_version():
    from cupy.cuda import nvrtc

    try:
        return nvrtc.getVersion()
    except Exception as exc:  # noqa: BLE001 - CuPy raises several types when libnvrtc is absent
        pytest.skip(f"the NVRTC library is not loadable ({exc}); pip install nvidia-cuda-nvrtc")


# compute_80 / compute_90: what setup.py builds for without a device (TORCH_CUDA_ARCH_LIST).
# The extra options are those CuPy's RawModule adds at run time.
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("extra", [(), ("-ftz=true", "--device-as-default-execution-space")],
                         ids=["plain", "as-cupy"])
def test_nvrtc_compiles_the_nvcc_source_unchanged(arch, extra):
    _nvrtc_version()
    ptx, lowered = ops_nvrtc.compile_ptx(arch, extra)
    entries = set(re.findall(r"\.entry\s+(\w+)\(", ptx))
    assert set(lowered) == {f"visioncoach::patchify_cuda_kernel<{t}>"
                            for t in ("float", "double", "__half", "__nv_bfloat16")}
    assert set(lowered.values()) <= entries, (lowered, entries)
    assert f".target sm_{arch}" in ptx


def test_nvcc_build_uses_the_shared_kernel_source():
    # One source of truth: patchify.cu holds only host glue and includes the header NVRTC reads.
    cu = (ops_nvrtc.CSRC / "cuda" / "patchify.cu").read_text()
    assert '#include "patchify_kernel.cuh"' in cu
    assert "__global__" not in cu
    assert "patchify_blocks(" in cu and "patchify_affine(" in cu and "kPatchifyThreads" in cu


def _ptx_params(ptx: str) -> dict[str, list[tuple[int, int]]]:
    """(size, alignment) in bytes of each .entry's parameters."""
    out = {}
    for name, params in re.findall(r"\.entry\s+(\w+)\(\s*(.*?)\)", ptx, flags=re.DOTALL):
        sizes = []
        for align, kind, count in re.findall(
                r"\.param\s+(?:\.align\s+(\d+)\s+)?\.(\w+)\s+\w+(?:\[(\d+)\])?", params):
            width = int(kind[1:]) // 8  # .u64 -> 8, .b8 -> 1
            size = width * (int(count) if count else 1)
            sizes.append((size, int(align) if align else width))
        out[name] = sizes
    return out


def test_ptx_parameters_match_the_packed_arguments():
    _nvrtc_version()
    ptx, lowered = ops_nvrtc.compile_ptx(80)
    params = _ptx_params(ptx)
    plan = ops_nvrtc.plan_launch((2, 28, 56, 3), ops.QWEN_MEAN, ops.QWEN_STD, 14, 2, 2)
    packed = []
    for arg in plan.args(0x1000, 0x2000):
        if isinstance(arg, np.ndarray):  # CuPy passes size-1 arrays by value, as raw bytes
            assert arg.size == 1
            packed.append((arg.dtype.itemsize, arg.dtype.alignment))
        else:  # Python int (a pointer) and np.int64 both go as 8 bytes
            assert isinstance(arg, (int, np.int64))
            packed.append((8, 8))
    for name in lowered.values():
        assert params[name] == packed, (name, params[name], packed)


# --- launch sizes and affine factors against the C++ host helpers, compiled here ---------------

HARNESS = r"""
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include "patchify_kernel.cuh"
using namespace visioncoach;

static unsigned bits(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }

int main() {
  std::printf("threads %d maxblocks %lld\n", kPatchifyThreads, (long long)kPatchifyMaxBlocks);
  std::printf("layout %zu %zu %zu %zu %zu\n", sizeof(PatchGeometry), alignof(PatchGeometry),
              sizeof(Affine3), alignof(Affine3), offsetof(Affine3, shift));
  char kind[16];
  while (std::scanf("%15s", kind) == 1) {
    if (!std::strcmp(kind, "blocks")) {
      long long total; std::scanf("%lld", &total);
      std::printf("blocks %lld %lld\n", total, (long long)patchify_blocks(total));
    } else {
      double mean[3], std[3];
      for (double& v : mean) std::scanf("%lf", &v);
      for (double& v : std) std::scanf("%lf", &v);
      const Affine3 a = patchify_affine(mean, std);
      std::printf("affine");
      for (int c = 0; c < 3; ++c) std::printf(" %08x", bits(a.scale[c]));
      for (int c = 0; c < 3; ++c) std::printf(" %08x", bits(a.shift[c]));
      std::printf("\n");
    }
  }
}
"""

CAP = 256 * 65535 * 8  # elements at which the grid reaches kPatchifyMaxBlocks
TOTALS = [0, 1, 255, 256, 257, 56448, CAP - 1, CAP, CAP + 1, 2**40 + 3]
AFFINES = [
    (ops.QWEN_MEAN, ops.QWEN_STD),
    ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    ((1e-30, -0.5, 300.0), (1e-3, 7.77, 1e30)),
    ((1e-40, 0.25, 1.0), (1.0, 3.0, 1e-45)),  # float-subnormal shift; scale overflows to inf
    ((0.5, 0.5, 0.5), (1 / 3, 2 / 3, 0.1)),
]


@pytest.fixture(scope="module")
def cpp_host_helpers(tmp_path_factory):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the host helpers with")
    folder = tmp_path_factory.mktemp("harness")
    (folder / "harness.cpp").write_text(HARNESS)
    exe = folder / "harness"
    subprocess.run([cxx, "-std=c++17", "-O1", f"-I{ops_nvrtc.CSRC / 'cuda'}",
                    str(folder / "harness.cpp"), "-o", str(exe)], check=True)
    lines = [f"blocks {t}" for t in TOTALS]
    lines += ["affine " + " ".join(repr(float(v)) for v in (*m, *s)) for m, s in AFFINES]
    res = subprocess.run([str(exe)], input="\n".join(lines) + "\n", capture_output=True,
                         text=True, check=True)
    return res.stdout.splitlines()


def test_launch_constants_and_struct_layout_match_cpp(cpp_host_helpers):
    threads, maxblocks = map(int, cpp_host_helpers[0].split()[1::2])
    assert ops_nvrtc.launch_constants() == {"kPatchifyThreads": threads,
                                            "kPatchifyMaxBlocks": maxblocks}
    g_size, g_align, a_size, a_align, shift_at = map(int, cpp_host_helpers[1].split()[1:])
    assert (ops_nvrtc.GEOMETRY_DTYPE.itemsize, ops_nvrtc.GEOMETRY_DTYPE.alignment) == (g_size, g_align)
    assert (ops_nvrtc.AFFINE_DTYPE.itemsize, ops_nvrtc.AFFINE_DTYPE.alignment) == (a_size, a_align)
    assert ops_nvrtc.AFFINE_DTYPE.fields["shift"][1] == shift_at


def test_launch_blocks_match_cpp(cpp_host_helpers):
    got = [line.split() for line in cpp_host_helpers if line.startswith("blocks")]
    assert [int(t) for _, t, _ in got] == TOTALS
    assert [ops_nvrtc.launch_blocks(t) for t in TOTALS] == [int(b) for _, _, b in got]


def test_affine_factors_match_cpp_bit_for_bit(cpp_host_helpers):
    got = [line.split()[1:] for line in cpp_host_helpers if line.startswith("affine")]
    assert len(got) == len(AFFINES)
    for (mean, std), cpp_bits in zip(AFFINES, got):
        a = ops_nvrtc.affine(mean, std)[0]
        ours = [f"{int(v):08x}" for v in np.concatenate([a["scale"], a["shift"]]).view(np.uint32)]
        assert ours == cpp_bits, (mean, std)


# --- argument checks and plan against the C++ (CPU) op -------------------------------------------

BAD = [
    ((2, 28, 28, 4), torch.uint8, {}),
    ((2, 28, 28), torch.uint8, {}),
    ((2, 28, 28, 3), torch.float32, {}),
    ((2, 28, 28, 3), torch.uint8, {"mean": [0.5, 0.5]}),
    ((2, 28, 28, 3), torch.uint8, {"std": [0.5, 0.0, 0.5]}),
    ((2, 28, 28, 3), torch.uint8, {"std": [0.5, float("nan"), 0.5]}),
    ((2, 28, 28, 3), torch.uint8, {"patch": 0}),
    ((2, 28, 28, 3), torch.uint8, {"temporal": -1}),
    ((3, 28, 28, 3), torch.uint8, {}),
    ((2, 30, 28, 3), torch.uint8, {}),
    ((2, 28, 42, 3), torch.uint8, {}),
    ((2, 28, 28, 3), torch.uint8, {"merge": 3}),
]


def _call_args(kw):
    return (kw.get("mean", list(ops.QWEN_MEAN)), kw.get("std", list(ops.QWEN_STD)),
            kw.get("patch", 14), kw.get("temporal", 2), kw.get("merge", 2))


@pytest.mark.parametrize("shape, dtype, kw", BAD)
def test_argument_checks_match_the_cpp_op(shape, dtype, kw):
    frames = torch.zeros(shape, dtype=dtype)
    with pytest.raises(RuntimeError) as cpp:
        torch.ops.visioncoach.patchify_normalize(frames, *_call_args(kw), torch.float32)
    with pytest.raises(RuntimeError) as ours:
        ops_nvrtc.check_args(shape, dtype, *_call_args(kw))
    cpp_msg, our_msg = str(cpp.value).splitlines()[0], str(ours.value)
    if dtype != torch.uint8:  # c10 and torch spell dtypes differently ("Float", "torch.float32")
        cpp_msg, our_msg = cpp_msg.split(", got")[0], our_msg.split(", got")[0]
    assert our_msg == cpp_msg


@pytest.mark.parametrize("shape", [(0, 28, 28), (2, 28, 28), (6, 84, 56), (4, 56, 84), (2, 0, 56)])
@pytest.mark.parametrize("sizes", [(14, 2, 2), (7, 1, 4), (16, 4, 1)])
def test_plan_matches_the_cpu_op(shape, sizes):
    patch, temporal, merge = sizes
    f, h, w = shape
    f, h, w = f * temporal, h // 28 * patch * merge, w // 28 * patch * merge
    frames = torch.zeros((f, h, w, 3), dtype=torch.uint8)
    ops_nvrtc.check_args(frames.shape, frames.dtype, ops.QWEN_MEAN, ops.QWEN_STD, *sizes)
    plan = ops_nvrtc.plan_launch(frames.shape, ops.QWEN_MEAN, ops.QWEN_STD, *sizes)
    ref = ops.patchify_normalize(frames, patch_size=patch, temporal_patch_size=temporal,
                                 merge_size=merge)
    assert (plan.rows, plan.cols) == tuple(ref.shape)
    assert plan.geometry[0].tolist() == (f, h, w, patch, temporal, merge)
    assert plan.blocks == ops_nvrtc.launch_blocks(ref.numel())


def test_unsupported_output_dtype_is_named():
    with pytest.raises(RuntimeError, match=r"not implemented for torch\.int32"):
        ops_nvrtc.kernel_name(torch.int32)


def test_cpu_frames_are_refused():
    frames = torch.zeros(2, 28, 28, 3, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="must be on a CUDA device"):
        ops_nvrtc.patchify_normalize_cuda(frames, list(ops.QWEN_MEAN), list(ops.QWEN_STD), 14, 2,
                                          2, torch.float32)


def test_included_headers_key_the_compile_cache(monkeypatch, tmp_path):
    # CuPy caches by program text + options; an edited include must change the options.
    before = ops_nvrtc.nvrtc_options()
    edited = tmp_path / "patchify_layout.h"
    edited.write_text(ops_nvrtc.INCLUDED_SOURCES[0].read_text() + "\n// edited\n")
    monkeypatch.setattr(ops_nvrtc, "INCLUDED_SOURCES", (edited,))
    assert ops_nvrtc.nvrtc_options() != before


# --- dispatch ----------------------------------------------------------------------------------

def test_cuda_backend_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ops.cuda_backend() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ops, "_C_cuda", object())
    assert ops.cuda_backend() == "nvcc"
    monkeypatch.setattr(ops, "_C_cuda", None)
    assert ops.cuda_backend() == "nvrtc"


DISPATCH = textwrap.dedent("""
    import sys
    sys.modules["visioncoach._C_cuda"] = None  # an install without nvcc: the import fails
    if {no_cupy}:
        sys.modules["cupy"] = None
    import torch
    torch.cuda.is_available = lambda: True  # a device is reported (there is none here)
    from visioncoach import ops, ops_nvrtc

    info = ops.native_info()
    print("INFO", info["cuda_built"], info["cuda_backend"], info["cuda_usable"])
    print("ERROR", info["cuda_error"])
    calls = []

    def stop_before_launch(*args):
        calls.append(args)
        return torch.zeros(0)

    ops_nvrtc.patchify_normalize_cuda = stop_before_launch
    frames = torch.zeros(2, 28, 28, 3, dtype=torch.uint8)
    cuda_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    try:
        torch.ops.visioncoach.patchify_normalize.default.redispatch(
            cuda_only, frames, [0.5] * 3, [0.25] * 3, 14, 2, 2, torch.bfloat16)
    except RuntimeError as exc:
        print("RAISED", str(exc).splitlines()[0])
    for args in calls:
        print("CALLED", args[0] is frames, args[1:])
""")


def _run_dispatch(no_cupy: bool, tmp_path) -> str:
    env = dict(os.environ, PYTHONSAFEPATH="1", HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", DISPATCH.format(no_cupy=no_cupy)], check=False,
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_op_dispatches_to_nvrtc_without_C_cuda(tmp_path):
    out = _run_dispatch(no_cupy=False, tmp_path=tmp_path)
    assert "INFO False nvrtc True" in out
    assert "CALLED True ([0.5, 0.5, 0.5], [0.25, 0.25, 0.25], 14, 2, 2, torch.bfloat16)" in out
    assert "RAISED" not in out


def test_without_cupy_the_cuda_op_says_why(tmp_path):
    out = _run_dispatch(no_cupy=True, tmp_path=tmp_path)
    assert "INFO False None False" in out
    assert "CuPy is not importable" in out.split("ERROR", 1)[1].splitlines()[0]
    raised = [line for line in out.splitlines() if line.startswith("RAISED")]
    assert len(raised) == 1 and "_C_cuda is not built" in raised[0] and "CuPy" in raised[0]
    assert "CALLED" not in out


# --- on a device ---------------------------------------------------------------------------------

def _frames(f, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (f, h, w, 3), dtype=torch.uint8, generator=g)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0, 28, 28), (2, 28, 28), (6, 84, 56), (16, 336, 448)])
def test_nvrtc_matches_cpu(dtype, shape):
    # Called directly (not through the op) so it runs where _C_cuda is built too. The CPU op
    # computes the same float multiply-add and rounding: equal bit for bit, as the nvcc kernel is.
    frames = _frames(*shape)
    args = (list(ops.QWEN_MEAN), list(ops.QWEN_STD), 14, 2, 2, dtype)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # torch's current stream, not the default one
        got = ops_nvrtc.patchify_normalize_cuda(frames.cuda(), *args)
    torch.cuda.synchronize()
    ref = torch.ops.visioncoach.patchify_normalize(frames, *args)
    assert got.dtype == dtype and got.device.type == "cuda"
    assert torch.equal(got.cpu(), ref)
    if shape[0]:  # a transposed (non-contiguous) view of the same pixels
        view = frames.cuda().transpose(1, 2).contiguous().transpose(1, 2)
        assert torch.equal(ops_nvrtc.patchify_normalize_cuda(view, *args).cpu(), ref)
