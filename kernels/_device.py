"""Device helpers the kernels share where the compiled GPU code and Triton's CPU interpreter (the
tests) must take different routes to compute the same thing.

``INTERPRETED`` is a global constexpr: the JIT folds the branch at compile time (a kernel compiled
for a GPU holds only the GPU route, ``tests/test_kernel_lowering.py`` checks its PTX), while the
interpreter runs the helper as Python and takes the other route.
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice

from visioncoach.kernels._backend import interpreting

__all__ = ["INTERPRETED", "accurate_exp", "to_bf16", "store_rounded"]

INTERPRETED = tl.constexpr(interpreting())


@triton.jit
def accurate_exp(x):
    """e^x (fp32) within 2 ulp over the whole range: libdevice's ``__nv_expf`` (its accuracy is
    the CUDA C++ Programming Guide's expf row: 2 ulp, full range). ``tl.exp`` compiles to
    ``ex2.approx.f32`` of ``x * log2(e)`` instead, CUDA's ``__expf``, whose documented error grows
    with the argument (2 + floor(|1.173 x|) ulp: the rounded product shifts the exponent), 16 ulp
    (up to 1.9e-6 relative) at |x| = 12. The interpreter has no libdevice; there this is numpy's
    float32 exp (2.52 ulp at most, NumPy 1.17 release notes)."""
    if INTERPRETED:
        return tl.exp(x)
    else:
        return libdevice.exp(x)


@triton.jit
def to_bf16(x):
    """fp32 -> bf16 rounded to nearest even, NaN kept NaN, infinities kept.

    On a GPU this is the hardware conversion, ``cvt.rn.bf16.f32``: round to nearest even, NaN in
    gives NaN out (PTX ISA, cvt). The interpreter's cast truncates (its "rtne" mode drops the
    mantissa carry), so there the rounding is done on the bits: add 0x7FFF plus the lowest kept
    bit, clear the low half. NaNs must skip that add: it carries 0x7FFFFFFF (a GPU's NaN) into the
    sign bit (-0.0) and 0x7F800001 into +inf, and the trainer's NaN guard would never see them;
    they get the quiet bit instead, so that truncation keeps a NaN (no caller may rely on a
    NaN's sign or payload: the two routes need not agree on them)."""
    if INTERPRETED:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        bits = tl.where(x != x, bits | 0x400000, rounded)
        x = bits.to(tl.float32, bitcast=True)
    return x.to(tl.bfloat16)


@triton.jit
def store_rounded(ptrs, x, mask):
    """Store fp32 ``x`` in the pointers' dtype: bf16 through ``to_bf16`` (nearest even, NaN
    kept), any other dtype by the plain cast."""
    if ptrs.dtype.element_ty == tl.bfloat16:
        tl.store(ptrs, to_bf16(x), mask=mask)
    else:
        tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)
