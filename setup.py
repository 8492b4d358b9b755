"""Builds visioncoach's native extension from csrc/.

- `visioncoach._C`: the C++ (CPU) ops, always built; a failure here fails the install.
- `visioncoach._C_cuda`: CUDA kernels for the same op schemas, built only where torch is a
  CUDA build and nvcc is found (VISIONCOACH_BUILD_CUDA=0 skips it, =1 makes it mandatory).
  By default a failure to build it prints a warning and the install goes on without it.

Metadata and dependencies live in pyproject.toml.
"""

import glob
import os
import sys

from setuptools import setup


def _find_cuda_home() -> None:
    # torch infers CUDA_HOME from `which nvcc`; a wrapper script in /usr/local/bin then yields
    # /usr/local, which has no CUDA libraries to link. Prefer a real toolkit folder.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for cand in sorted(glob.glob("/usr/local/cuda*"), reverse=True):
        if os.path.isfile(os.path.join(cand, "bin", "nvcc")) and os.path.isdir(os.path.join(cand, "lib64")):
            os.environ["CUDA_HOME"] = cand
            return


_find_cuda_home()

from torch.utils import cpp_extension  # noqa: E402  (reads CUDA_HOME at import)
from torch.utils.cpp_extension import BuildExtension, CppExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
CXX_FLAGS = ["-O3"]  # torch adds the C++ standard it needs (C++20 for 2.14)
OPTIONAL = "visioncoach._C_cuda"


def _cuda_mode() -> str:
    mode = os.environ.get("VISIONCOACH_BUILD_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"VISIONCOACH_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


def _pip_cuda_includes() -> list[str]:
    # torch's CUDA wheels ship the library headers (cusparse.h, cublas_v2.h, ...) that ATen's
    # CUDA headers include; a bare nvcc toolkit may lack them.
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for base in getattr(nvidia, "__path__", []):
        found += sorted(glob.glob(os.path.join(base, "cu*", "include")))
    return found


def _cuda_extension():
    import torch

    mode = _cuda_mode()
    if mode == "0":
        return None
    missing = []
    if torch.version.cuda is None:
        missing.append("torch is not a CUDA build")
    if cpp_extension.CUDA_HOME is None:
        missing.append("nvcc/CUDA_HOME not found")
    if missing:
        if mode == "1":
            sys.exit("VISIONCOACH_BUILD_CUDA=1 but " + "; ".join(missing))
        print("visioncoach: skipping the CUDA part (" + "; ".join(missing) + ")")
        return None
    if not torch.cuda.is_available():
        # Without a device torch would compile for every architecture it knows (slow);
        # Ampere and Hopper (+PTX for newer) cover the machines this trainer targets.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    return cpp_extension.CUDAExtension(
        name=OPTIONAL,
        sources=sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp")),
        include_dirs=[os.path.join(ROOT, "csrc")] + _pip_cuda_includes(),
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": ["-O3"]},
    )


class BuildWithOptionalCuda(BuildExtension):
    """torch's BuildExtension, except that the optional CUDA part may fail."""

    failed: set = set()

    def build_extension(self, ext):
        if ext.name != OPTIONAL:
            return super().build_extension(ext)
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: install without it
            if _cuda_mode() == "1":
                raise
            self.failed.add(ext.name)
            print(f"visioncoach: WARNING: the optional CUDA part did not build ({exc}); "
                  "the CPU ops and Triton kernels are still installed.", file=sys.stderr)

    # A part that did not build has no file for the install steps to copy.
    def get_outputs(self):
        return [self.get_ext_fullpath(e.name) for e in self.extensions if e.name not in self.failed]

    def get_output_mapping(self):
        mapping = super().get_output_mapping()
        skip = {self.get_ext_fullpath(name) for name in self.failed}
        return {k: v for k, v in mapping.items() if k not in skip}

    def copy_extensions_to_source(self):
        kept = self.extensions
        self.extensions = [e for e in kept if e.name not in self.failed]
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = kept


extensions = [
    CppExtension(
        name="visioncoach._C",
        sources=sorted(glob.glob("csrc/*.cpp")),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": CXX_FLAGS},
    )
]
cuda_ext = _cuda_extension()
if cuda_ext is not None:
    extensions.append(cuda_ext)

setup(
    ext_modules=extensions,
    cmdclass={"build_ext": BuildWithOptionalCuda.with_options(use_ninja=True)},
)
