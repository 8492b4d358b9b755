"""The Triton kernels compile for real GPUs, checked without one (``visioncoach.kernels.aot``).

Every kernel that kernels/*.py launches is compiled for sm_80 (A100) and sm_90a (H100) at each
specialisation its launchers really produce at the trainer's shapes (``kernels/aot_cases.py``):
it compiles, spills no register, and its shared memory fits the target's per-block limit. All
compiles run in one subprocess (Triton's interpreter off, an empty temporary cache), so every
run compiles afresh with the Triton installed. Compile-time facts only; nothing runs a kernel.
"""

import ast
from pathlib import Path

import pytest
import torch
import triton.language as tl

from visioncoach.kernels import aot

ROOT = Path(__file__).resolve().parents[1]
# The kernels the trainer launches today; the AST scan below must find at least these.
KNOWN = {"_darken_outside_boxes_kernel", "_draw_ellipses_kernel", "_draw_frame_number_kernel",
         "_blend_heatmap_kernel", "_claim_iou_kernel", "_temporal_point_reward_kernel",
         "_gspo_sd_fwd_kernel", "_gspo_sd_bwd_kernel", "_logprob_fwd_kernel", "_grad_logits_kernel"}


def launched_kernels() -> set[str]:
    """The ``@triton.jit`` functions of kernels/*.py that some code launches as
    ``name[grid](...)``; device helpers (``tile``, ``to_bf16``, ...) are only called by kernels."""
    jit, launched = set(), set()
    for path in (ROOT / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and "triton.jit" in map(ast.unparse, node.decorator_list):
                jit.add(node.name)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) \
                    and isinstance(node.func.value, ast.Name):
                launched.add(node.func.value.id)
    return jit & launched


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    res = aot.compile_in_subprocess(timeout=900)
    errors = "\n\n".join(f"[{e['stage']}] {e.get('kernel', '')} {e.get('arch', '')} {e.get('spec', '')} "
                         f"(case: {e['case']})\n{e['error']}" for e in res["errors"])
    assert not res["errors"], f"{len(res['errors'])} capture/compile failures:\n{errors}"
    return res["records"]


def where(r: dict) -> str:
    return f"{r['kernel']} {r['target']} {'/'.join(r['dtypes'])} [{r['spec']}]"


# --------------------------------------------------------------------- the compiled kernels

def test_the_scan_finds_the_launched_kernels_and_no_device_helper():
    found = launched_kernels()
    assert KNOWN <= found, f"not found: {KNOWN - found}"
    assert not {"tile", "to_bf16", "store_rounded", "accurate_exp"} & found


def test_every_launched_kernel_compiles_for_sm80_and_sm90(compiled):
    have = {(r["kernel"], r["arch"]) for r in compiled}
    missing = sorted((k, a) for k in launched_kernels() for a in aot.ARCHS if (k, a) not in have)
    assert not missing, f"never compiled (no case in kernels/aot_cases.py launches them?): {missing}"


def test_each_record_is_the_kernel_it_names(compiled):
    for r in compiled:
        assert r["entries"] == [r["kernel"]], f"{where(r)}: PTX entries {r['entries']}"
        assert r["cubin_functions"] == [r["kernel"]], f"{where(r)}: cubin holds {r['cubin_functions']}"
        assert r["ptx_target"] == r["target"], where(r)
        assert r["registers"] == r["ptxas_registers"] > 0, where(r)   # cuobjdump and ptxas agree


def test_no_kernel_spills_registers(compiled):
    spills = [f"{where(r)}: {r['spill_stores']} B stored, {r['spill_loads']} B loaded"
              for r in compiled if r["spill_stores"] or r["spill_loads"]]
    assert not spills, "register spills:\n" + "\n".join(spills)


def test_shared_memory_fits_the_targets_block_limit(compiled):
    over = [f"{where(r)}: {r['shared_static'] + r['shared_dynamic']} B > {aot.GPUS[r['arch']].smem_per_block} B"
            for r in compiled if r["shared_static"] + r["shared_dynamic"] > aot.GPUS[r["arch"]].smem_per_block]
    assert not over, "\n".join(over)


def test_specialisations_are_the_launchers_cuda_ones(compiled):
    """The capture ran the launchers' CUDA branches (not the interpreter's block sizes) and saw
    the argument properties the JIT specialises on."""
    by = {}
    for r in compiled:
        by.setdefault(r["kernel"], []).append(r)
    for k in ("_darken_outside_boxes_kernel", "_draw_ellipses_kernel", "_blend_heatmap_kernel"):
        for r in by[k]:
            assert r["constexprs"]["BLOCK"] == "512" and r["grid"] == [16, 392], where(r)
            assert r["options"] == dict(num_warps=4, num_stages=3, enable_fp_fusion=False), where(r)
    for r in by["_logprob_fwd_kernel"] + by["_grad_logits_kernel"]:
        assert r["constexprs"]["BLOCK_V"] == "4096" and r["threads"] == 256, where(r)
    # row chunks of 441 start lse[r0:] at byte offsets 4 * r0, not all multiples of 16
    assert any("lse_ptr" not in r["aligned"] for r in by["_logprob_fwd_kernel"])
    assert any("lse_ptr" in r["aligned"] for r in by["_logprob_fwd_kernel"])
    # one segment per record: the JIT turns an integer argument equal to 1 into a constant
    assert all(r["constexprs"].get("Smax") == "1" for r in by["_temporal_point_reward_kernel"])
    assert {tuple(r["dtypes"]) for r in by["_gspo_sd_bwd_kernel"]} == {("fp32",), ("bf16",)}


# --------------------------------------------------------------------- the pieces, in process

def _probe(x_ptr, y_ptr, n, m, one, s, B: tl.constexpr):
    pass


def test_specialise_reproduces_the_jit_attributes():
    from triton.runtime.jit import JITFunction

    kernel = JITFunction(_probe)   # a real JITFunction, even under the interpreter
    x = torch.empty(10, dtype=torch.bfloat16)
    launch = aot.Launch(kernel, (aot._freeze(x), aot._freeze(x[3:]), 32, 33, 1, 0.5), {"B": 16}, (1,))
    spec = aot.specialise(launch, 90)
    assert spec.signature == {"x_ptr": "*bf16", "y_ptr": "*bf16", "n": "i32", "m": "i32",
                              "one": "constexpr", "s": "fp32", "B": "constexpr"}
    assert spec.constexprs == {"one": 1, "B": 16}
    assert set(spec.attrs) == {"x_ptr", "n"}            # y starts 6 bytes in; 33 % 16 != 0
    assert "unaligned: y_ptr" in spec.label and "ints%16: n" in spec.label


def test_capture_refuses_the_interpreter():
    from visioncoach.kernels import interpreting

    if not interpreting():
        pytest.skip("Triton's interpreter is off in this process (a CUDA machine)")
    with pytest.raises(RuntimeError, match="interpreter"):
        aot.capture(lambda: None)


def test_occupancy_rule():
    a100, h100 = aot.GPUS[80], aot.GPUS[90]
    assert aot.occupancy(32, 0, 128, a100) == dict(blocks=16, warps=64, limiter="registers/threads",
                                                   occupancy=1.0)
    # 56 regs: 1792 per warp, 9 warps per sub-partition, 36 warps = 9 blocks of 4
    assert aot.occupancy(56, 0, 128, a100)["warps"] == 36
    # 33 regs round up to 40 per thread: 12 warps per sub-partition, 6 blocks of 8 warps
    assert aot.occupancy(33, 0, 256, a100) == aot.occupancy(40, 0, 256, a100)
    assert aot.occupancy(33, 0, 256, a100)["blocks"] == 6
    # 100 KB + 1 KB reserved: one block on A100 (164 KB), two on H100 (228 KB)
    assert aot.occupancy(32, 100 * 1024, 128, a100)["blocks"] == 1
    assert aot.occupancy(32, 100 * 1024, 128, h100)["limiter"] == "shared memory"
    assert aot.occupancy(32, 100 * 1024, 128, h100)["blocks"] == 2
    assert aot.occupancy(255, 0, 1024, a100)["blocks"] == 0           # does not fit at all
    assert aot.occupancy(16, 0, 32, a100)["limiter"] == "blocks"      # 32 blocks of one warp


def test_parsers():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 2048 bytes smem, 400 bytes cmem[0]\n")
    assert aot.parse_ptxas_log(log) == dict(ptxas_registers=255, stack=8, spill_stores=4,
                                            spill_loads=12, shared_static=2048)
    with pytest.raises(ValueError):
        aot.parse_ptxas_log("ptxas fatal: nothing")
    usage = (" Common:\n  GLOBAL:0\n Function k:\n  REG:40 STACK:0 SHARED:1024 LOCAL:8 "
             "CONSTANT[0]:616 TEXTURE:0 SURFACE:0 SAMPLER:0\n")
    assert aot.parse_resource_usage(usage)["k"]["REG"] == 40
    assert aot.parse_resource_usage(usage)["k"]["LOCAL"] == 8
    ptx = ("\tld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];\n"
           "\t@%p1 ld.global.L1::evict_last.b32 { %r5 }, [ %rd2 + 0 ];\n"
           "\t@%p2 st.global.b16 [ %rd3 + 0 ], { %rs1 };\n"
           "\tex2.approx.f32 \t%r6, %r7;\n\tand.b32 \t%r8, %r9, -65536;\n"
           "\tcvt.rn.bf16.f32 \t%rs1, %r8;\n\t// ex2.approx in a comment\n")
    s = aot.ptx_summary(ptx)
    assert s["ld.global"] == {"b32": 1, "v4.b32": 1} and s["st.global"] == {"b16": 1}
    assert (s["ex2.approx"], s["and.b32 -65536"], s["cvt.rn.bf16.f32"]) == (1, 1, 1)
