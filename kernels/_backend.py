"""Which implementation a public kernel function runs: Triton or the PyTorch path."""

import os
from typing import Literal

import torch

Backend = Literal["auto", "triton", "torch"]


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: Backend, *tensors: torch.Tensor) -> Literal["triton", "torch"]:
    """``auto`` runs Triton on CUDA tensors and the PyTorch path elsewhere.

    ``triton`` on CPU tensors needs the interpreter; asking for it without one is an error
    rather than a silent fallback, so a test that means to exercise a kernel always does.
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    if backend == "auto":
        return "triton" if on_cuda else "torch"
    if backend == "triton" and not on_cuda and not interpreting():
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 "
                           "(set before triton is imported)")
    return backend
