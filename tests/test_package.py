"""Installation: the package, the native extension, and the `kernels` name left to Hugging Face."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_visioncoach_kernels_is_our_kernels_folder():
    import visioncoach.kernels as k

    assert Path(k.__file__).resolve() == REPO / "kernels" / "__init__.py"
    assert callable(k.resolve_backend)


def test_top_level_kernels_is_not_ours_in_process():
    spec = importlib.util.find_spec("kernels")
    if spec is not None:  # Hugging Face's package may legitimately be installed
        assert spec.origin is None or not Path(spec.origin).resolve().is_relative_to(REPO)


def _run(code: str, cwd: Path, safe_path: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    if safe_path:
        env["PYTHONSAFEPATH"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


PROBE = """
try:
    import kernels
except ModuleNotFoundError:
    print('ABSENT')
else:
    origin = getattr(kernels, '__file__', None)
    print('FILE', origin)
    assert origin is None or 'visioncoach' not in open(origin).read(), origin
    assert not hasattr(kernels, 'resolve_backend')
from transformers.utils.import_utils import is_kernels_available
print('HF_KERNELS', is_kernels_available())
"""


@pytest.mark.parametrize("safe_path", [True, False])
def test_import_kernels_from_checkout_root_is_never_ours(safe_path):
    # Without PYTHONSAFEPATH, `python -c` puts the checkout root (holding kernels/) on sys.path.
    res = _run(PROBE, REPO, safe_path)
    assert res.returncode == 0, res.stderr
    if importlib.util.find_spec("kernels") is None:
        assert "HF_KERNELS False" in res.stdout


def test_transformers_model_loading_works_from_checkout_root():
    code = ("import transformers.integrations.hub_kernels\n"
            "from visioncoach.models.tiny import tiny_qwen25_vl_config\n"
            "from transformers import Qwen2_5_VLForConditionalGeneration\n"
            "m = Qwen2_5_VLForConditionalGeneration(tiny_qwen25_vl_config(hidden_size=32, num_heads=2,"
            " num_kv_heads=1)); print('OK', type(m).__name__)")
    res = _run(code, REPO, safe_path=False)
    assert res.returncode == 0, res.stderr
    assert "OK Qwen2_5_VLForConditionalGeneration" in res.stdout


def test_native_extension_built():
    from visioncoach import ops

    info = ops.native_info()
    assert info["cpu"] is True
    assert hasattr(torch.ops.visioncoach, "patchify_normalize")
    # Where torch is a CUDA build and nvcc is here, the CUDA part must have built too.
    from torch.utils.cpp_extension import CUDA_HOME
    if torch.version.cuda and CUDA_HOME and os.environ.get("VISIONCOACH_BUILD_CUDA", "auto") != "0":
        assert info["cuda_built"], info["cuda_error"]
    # Without the nvcc-built part a GPU is served by the NVRTC fallback (ops_nvrtc) when CuPy is in.
    assert info["cuda_usable"] == (info["cuda_backend"] is not None)
    if info["cuda_built"]:
        assert info["cuda_usable"] == torch.cuda.is_available()


def test_every_subpackage_is_listed_in_pyproject():
    # Packages are listed explicitly (kernels/ is mapped under visioncoach); a package missing
    # from the list works in the editable checkout but is absent from a wheel.
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"visioncoach.kernels"} | {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "visioncoach").rglob("__init__.py")}
    assert found == listed
