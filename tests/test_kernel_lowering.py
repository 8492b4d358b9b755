"""What the kernels compile to, checked in their PTX without a GPU (issue #15), and the
interpreter's side of the device helpers that make GPU and CPU routes differ (kernels/_device.py).

The PTX checks compile, in one subprocess (``visioncoach.kernels.aot``: Triton's interpreter off,
an empty temporary cache), only the kernels they look at, for sm_80 and sm_90a, at every
specialisation their launchers produce at the 7B shapes (``kernels/aot_cases.py``), ~15 s.
Each names the instruction that shows the property, with what the code compiled to before.
Compile-time facts only: nothing runs on a GPU.
"""

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from visioncoach.kernels import aot
from visioncoach.kernels._device import store_rounded

CHECKED = ["_temporal_point_reward_kernel", "_darken_outside_boxes_kernel", "_logprob_fwd_kernel",
           "_grad_logits_kernel", "_gspo_sd_bwd_kernel"]


@pytest.fixture(scope="module")
def ptx() -> dict[str, list[dict]]:
    res = aot.compile_in_subprocess(kernels=CHECKED, with_ptx=True, timeout=600)
    assert not res["errors"], "\n\n".join(e["error"] for e in res["errors"])
    by: dict[str, list[dict]] = {}
    for r in res["records"]:
        by.setdefault(r["kernel"], []).append(r)
    assert set(by) == set(CHECKED) and all({r["arch"] for r in by[k]} == set(aot.ARCHS) for k in by)
    return by


def where(r: dict) -> str:
    return f"{r['kernel']} {r['target']} {'/'.join(r['dtypes'])} [{r['spec']}]"


def test_temporal_reward_exp_is_libdevice_expf(ptx):
    """Every ex2.approx in the temporal reward is the core of libdevice's expf (2 ulp), after its
    range reduction with log2 e split in two (the low part 0f32A57060), not tl.exp's bare
    ex2.approx.f32 of x * log2 e, whose error grows with |x| (it was: 1 ex2.approx, no expf)."""
    for r in ptx["_temporal_point_reward_kernel"]:
        s = r["ptx_stats"]
        assert s["expf"] >= 1 and s["ex2.approx"] == s["expf"], (where(r), s)


def test_darken_box_bounds_propagate_nan(ptx):
    """The four corner min / max of each box compile to min.NaN / max.NaN (NaN in, NaN out, as
    torch.minimum / maximum in the reference); they were min.f32 / max.f32, which return the
    other operand."""
    for r in ptx["_darken_outside_boxes_kernel"]:
        assert r["ptx_stats"]["min/max.NaN"] == 4, (where(r), r["ptx_stats"])


def _bf16_outputs(r: dict) -> list[str]:
    return [name for name, ty in r["signature"].items()
            if ty == "*bf16" and name in ("u_ptr", "gz_ptr", "grad_ptr")]


def test_bf16_outputs_take_the_hardware_conversion(ptx):
    """Every fp32 -> bf16 store converts with cvt.rn.bf16(x2).f32 alone: round to nearest even,
    NaN kept (PTX ISA, cvt). No integer rounding by hand before it (its and with -65536: 16 per
    _logprob_fwd_kernel / _grad_logits_kernel, 8 per _gspo_sd_bwd_kernel before), which sent a
    GPU's NaN 0x7FFFFFFF to -0.0."""
    for k in CHECKED:
        for r in ptx[k]:
            assert r["ptx_stats"]["and.b32 -65536"] == 0, where(r)
    writers = [r for k in ("_logprob_fwd_kernel", "_grad_logits_kernel", "_gspo_sd_bwd_kernel")
               for r in ptx[k] if _bf16_outputs(r)]
    assert {r["kernel"] for r in writers} == {"_logprob_fwd_kernel", "_grad_logits_kernel",
                                              "_gspo_sd_bwd_kernel"}
    for r in writers:
        assert r["ptx_stats"]["cvt.rn.bf16.f32"] > 0, where(r)


def test_grad_logits_moves_16_byte_vectors(ptx):
    """_grad_logits_kernel loads the logits and stores G as 16-byte vectors (ld/st.global.v4) at
    the 7B shapes: its vocabulary slices are a multiple of 16 columns wide, so every row starts
    16-byte aligned. Scalar loads are only the row's own values (target, lse, coef, coef_y). It
    was 19 scalar loads and 16 scalar stores per thread: slices of 21,829 / 43,659 columns."""
    for r in ptx["_grad_logits_kernel"]:
        ld, st = r["ptx_stats"]["ld.global"], r["ptx_stats"]["st.global"]
        assert ld.get("v4.b32", 0) == 4 and sum(ld.values()) - ld["v4.b32"] <= 4, (where(r), ld)
        assert set(st) == {"v4.b32"}, (where(r), st)


def test_logprob_forward_reads_logits_as_vectors(ptx):
    """The forward's pass over the logits (and its rarely taken second pass) load 16-byte
    vectors and write the u rows as 16-byte vectors; the other stores are the row's scalars."""
    for r in ptx["_logprob_fwd_kernel"]:
        ld, st = r["ptx_stats"]["ld.global"], r["ptx_stats"]["st.global"]
        write_u = r["constexprs"]["WRITE_U"] == "True"
        assert ld.get("v4.b32", 0) == (8 if write_u else 4), (where(r), ld)
        assert st.get("v4.b32", 0) > 0 if write_u else "v4.b32" not in st, (where(r), st)


# --------------------------------------------------------------------- the interpreter's route


@triton.jit
def _store_bf16_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    store_rounded(out_ptr + offs, tl.load(x_ptr + offs, mask=ok), ok)


def test_bf16_store_rounds_to_nearest_even_and_keeps_nan():
    """``store_rounded`` into bf16, on this machine's route (the interpreter's bit rounding on
    CPU, the hardware cvt on a GPU), equals torch's fp32 -> bf16 cast (nearest even) bit for bit
    on every zero, normal number and infinity (ties both ways, rounding up to the next binade and
    to infinity included), which is also what the old hand rounding gave; and every NaN pattern,
    the GPU's 0x7FFFFFFF, 0xFFFFFFFF and the signalling 0x7F800001 among them, comes out NaN
    (the old rounding: -0.0, +0.0, +inf). Subnormals are left out: the
    interpreter's own cast mis-scales them whatever is stored."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    ties = (rng.integers(0x00800000, 0x7F7F0000, 2_000, dtype=np.uint32) & 0xFFFF0000) | 0x8000
    special = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0x7F7F8000, 0x3F80FFFF,
                        0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0xFF800001, 0x7FC00000], dtype=np.uint32)
    bits = np.concatenate([bits, ties, ties ^ 0x10000, special])
    exponent, mantissa = (bits >> 23) & 0xFF, bits & 0x7FFFFF
    bits = bits[~((exponent == 0) & (mantissa != 0))]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.from_numpy(bits.view(np.float32).copy()).to(device)
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=device)
    _store_bf16_kernel[(triton.cdiv(x.numel(), 4096),)](x, out, x.numel(), BLOCK=4096)
    out, x = out.cpu(), x.cpu()
    nan = x.isnan()
    assert nan.sum() > 500 and (~nan).sum() > 100_000
    got, want = out.view(torch.int16), x.to(torch.bfloat16).view(torch.int16)
    assert torch.equal(got[~nan], want[~nan]), int((got[~nan] != want[~nan]).sum())
    b = torch.from_numpy(bits[~nan.numpy()].astype(np.int64))
    old = (((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000) >> 16).to(torch.int16)   # wraps like bf16 bits
    assert torch.equal(got[~nan], old)
    assert out[nan].isnan().all()        # sign and payload are not promised (torch's own: 0x7FC0)
