"""Ahead-of-time compilation of the Triton kernels for NVIDIA targets, with no GPU and no driver.

Triton's JIT specialises every launch on the argument types, on which pointers and integers are
multiples of 16 (``tt.divisibility``: what lets accesses vectorise) and on integers equal to 1
(made constants), and compiles with the launcher's options (``num_warps``, ``enable_fp_fusion``).
This module reproduces exactly that without a GPU:

1. ``capture(case)`` runs a launcher's real code path (public function, custom op, backward) on
   fake CUDA tensors (``FakeTensorMode``: shapes, dtypes, strides, storage offsets; no memory,
   no device), every ``kernel[grid](...)`` recorded instead of launched. The custom ops' fake
   implementations are swapped for their real ones meanwhile, so the launcher code itself runs
   and takes its CUDA branch (block sizes, warps).
2. ``specialise(launch, arch)`` feeds the recorded arguments to the JIT's own binder
   (``create_function_from_signature`` and ``JITFunction._pack_args``, what ``JITFunction.run``
   calls in triton 3.8's runtime/jit.py) with the NVIDIA backend object of a ``GPUTarget``. A
   fake tensor has no address, so it gets one: a 512-byte aligned base (every CUDA caching
   allocator block is) plus its storage offset, all the 16-byte test can see of a real one.
3. ``compile_spec(spec)`` compiles it as ``JITFunction._do_compile`` does (``ASTSource``,
   ``triton.compile``, the bundled ptxas) and reads registers, spill stores/loads and static
   shared memory from ``ptxas -v`` (Triton's own invocation, its log captured), registers and
   local memory from the bundled ``cuobjdump --dump-resource-usage``, and the dynamic shared
   memory Triton launches with from the kernel's metadata.

Compile-time facts only: nothing here runs a kernel. The process must not run Triton's
interpreter (its kernels are no ``JITFunction``s): ``compile_in_subprocess`` starts
``python -m visioncoach.kernels.aot`` without ``TRITON_INTERPRET`` and with an empty temporary
Triton cache. ``kernel_ptx`` returns a kernel's PTX at its launchers' specialisations;
``ptx_summary`` counts the instructions worth checking. torch and triton are imported lazily.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["ARCHS", "GPUS", "Launch", "Spec", "capture", "specialise", "compile_spec", "compile_cases",
           "compile_in_subprocess", "kernel_ptx", "ptx_summary", "parse_ptxas_log", "parse_resource_usage", "occupancy"]

ARCHS = (80, 90)
# A CUDA caching-allocator block starts 512-byte aligned; a view adds its storage offset.
_ALIGNED_BASE = 1 << 40


# ------------------------------------------------------------------------------ occupancy

@dataclass(frozen=True)
class GPU:
    """Per-SM limits (CUDA Programming Guide) and allocation rules (cuda_occupancy.h)."""
    name: str
    arch: int
    smem_per_sm: int                 # bytes, the largest shared-memory carveout
    smem_per_block: int              # bytes, opt-in maximum for one block
    regs_per_sm: int = 65536
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32
    reg_unit: int = 256              # registers are allocated per warp in units of 256
    sub_partitions: int = 4          # each SM sub-partition holds 1/4 of the register file
    smem_unit: int = 128             # shared memory is allocated per block in units of 128 B
    smem_reserved: int = 1024        # the system reserves 1 KB of shared memory per block


GPUS = {80: GPU("A100", 80, 164 * 1024, 163 * 1024), 90: GPU("H100", 90, 228 * 1024, 227 * 1024)}


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def occupancy(regs: int, smem_bytes: int, threads: int, gpu: GPU) -> dict:
    """Theoretical resident blocks and warps per SM of a kernel, and what limits them.
    Registers: a warp holds regs x 32 rounded up to 256; warps live in 4 sub-partitions of
    16,384 registers, so warps/SM = 4 floor(16384 / regs_per_warp), blocks = that // warps per
    block. Shared memory: static + dynamic + 1 KB system reserve, rounded up to 128 B per block,
    against the largest carveout. Threads: 2048 / block size. At most 32 blocks."""
    warps = -(-threads // 32)
    regs_warp = _round_up(max(regs, 1) * 32, gpu.reg_unit)
    per_part = (gpu.regs_per_sm // gpu.sub_partitions) // regs_warp
    fits = regs_warp * _round_up(warps, gpu.sub_partitions) <= gpu.regs_per_sm
    limits = {
        "registers": per_part * gpu.sub_partitions // warps if fits else 0,
        "shared memory": (gpu.smem_per_sm // _round_up(smem_bytes + gpu.smem_reserved, gpu.smem_unit)
                          if smem_bytes <= gpu.smem_per_block else 0),
        "threads": gpu.threads_per_sm // (warps * 32),
        "blocks": gpu.blocks_per_sm,
    }
    blocks = min(limits.values())
    limiter = "/".join(k for k, v in limits.items() if v == blocks)
    return dict(blocks=blocks, warps=blocks * warps, limiter=limiter,
                occupancy=blocks * warps * 32 / gpu.threads_per_sm)


# ------------------------------------------------------------------------------ capture

@dataclass
class _Ptr:
    """A tensor argument as the JIT's specialisation sees it: a dtype and an address."""
    dtype: Any
    address: int

    def data_ptr(self) -> int:
        return self.address


@dataclass
class Launch:
    kernel: Any                      # the JITFunction
    args: tuple                      # tensors as _Ptr, scalars as passed
    kwargs: dict                     # constexprs and launch options
    grid: tuple


def _kernel_modules():
    """Every module of ``visioncoach.kernels`` but this tool's own."""
    import importlib
    import pkgutil

    import visioncoach.kernels as pkg
    return [importlib.import_module(f"{pkg.__name__}.{m.name}")
            for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("aot")]


def _freeze(arg):
    import torch

    if isinstance(arg, torch.Tensor):
        return _Ptr(arg.dtype, _ALIGNED_BASE + arg.storage_offset() * arg.element_size())
    return arg


@contextlib.contextmanager
def _intercepted(launches: list):
    """Every JITFunction of the kernel modules records its launches; every custom op runs its
    real implementation where fake mode would run its fake one."""
    from torch._library.custom_ops import CustomOpDef
    from triton.runtime.jit import JITFunction

    kernels, ops = [], []
    for mod in _kernel_modules():
        for obj in vars(mod).values():
            if isinstance(obj, JITFunction) and obj not in kernels:
                kernels.append(obj)
            elif isinstance(obj, CustomOpDef) and obj not in [o for o, _ in ops]:
                ops.append((obj, obj._abstract_fn))
    if not kernels:
        raise RuntimeError("no JITFunction found: the kernels were imported under Triton's "
                           "interpreter (TRITON_INTERPRET=1); use compile_in_subprocess()")

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            launches.append(Launch(kernel, tuple(map(_freeze, args)), {k: _freeze(v) for k, v in kwargs.items()},
                                   () if callable(grid) else tuple(grid)))
        return run

    try:
        for k in kernels:
            k.run = recorder(k)          # what kernel[grid](...) calls
        for op, _ in ops:
            op._abstract_fn = op._init_fn
        yield
    finally:
        for k in kernels:
            vars(k).pop("run", None)
        for op, fake in ops:
            op._abstract_fn = fake


def capture(case: Callable[[], Any]) -> list[Launch]:
    """The kernel launches ``case()`` makes when it builds CUDA tensors and calls launchers,
    run on fake CUDA tensors (no GPU needed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    launches: list[Launch] = []
    with _intercepted(launches), FakeTensorMode():
        case()
    return launches


# ------------------------------------------------------------------------------ specialise

@dataclass
class Spec:
    kernel: Any
    arch: int
    signature: dict
    constexprs: dict                 # param name -> value (incl. integers equal to 1)
    attrs: dict                      # param name -> Triton attributes (tt.divisibility)
    options: Any                     # CUDAOptions
    key: str                         # the JIT's cache key: equal keys compile identically
    grid: tuple = ()
    raw: tuple = ()                  # (constexprs, attrs) keyed as ASTSource takes them

    @property
    def label(self) -> str:
        """What tells this specialisation from its kernel's others: the constexprs, the pointer
        arguments that are not 16-byte aligned, the integer arguments that are multiples of 16."""
        names = [p.name for p in self.kernel.params]
        const = [f"{k}={v}" for k, v in self.constexprs.items()]
        unaligned = [n for n in names if self.signature[n].startswith("*") and not self.attrs.get(n)]
        div16 = [n for n in names if self.signature[n][0] in "iu" and self.attrs.get(n)]
        return "; ".join([" ".join(const)] + [f"unaligned: {','.join(unaligned)}"] * bool(unaligned)
                         + [f"ints%16: {','.join(div16)}"] * bool(div16))


def specialise(launch: Launch, arch: int) -> Spec:
    """The signature, constexprs, attributes and options ``JITFunction.run`` would compile
    ``launch`` with on a device of compute capability ``arch`` (its binder, on the NVIDIA
    backend object of that target)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    k = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = dict(launch.kwargs)
    # as JITFunction.run sets them before binding
    kwargs["debug"] = kwargs.get("debug", k.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(k.signature, k.params, backend)
    bound, specialization, opts = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = k._pack_args(backend, kwargs, bound, specialization, opts)
    names = [p.name for p in k.params]
    key = f"{k.fn.__qualname__}:{specialization}:{sorted(opts.items())}:{arch}"
    return Spec(k, arch, signature, {names[p[0]]: v for p, v in constexprs.items()},
                {names[p[0]]: v for p, v in attrs.items() if v}, options, key, launch.grid,
                (constexprs, attrs))


# ------------------------------------------------------------------------------ compile

_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict:
    """Registers, stack frame, spill stores/loads, static smem (bytes) from ``ptxas -v``."""
    used, frame = _PTXAS_USED.search(log), _PTXAS_FRAME.search(log)
    if not used or not frame:
        raise ValueError(f"no resource lines in the ptxas log:\n{log}")
    smem = _PTXAS_SMEM.search(log)
    return dict(ptxas_registers=int(used[1]), stack=int(frame[1]), spill_stores=int(frame[2]),
                spill_loads=int(frame[3]), shared_static=int(smem[1]) if smem else 0)


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """``cuobjdump --dump-resource-usage`` -> {function: {"REG": .., "SHARED": .., ...}}."""
    out, fn = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            fn = out.setdefault(m[1], {})
        elif fn is not None and "REG:" in line:
            fn.update({k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)})
    return out


def _cuobjdump(cubin: bytes) -> dict[str, dict[str, int]]:
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True)
    return parse_resource_usage(out.stdout)


def compile_spec(spec: Spec) -> dict:
    """Compile ``spec`` as the JIT would (fresh, never from Triton's cache): a record of its PTX,
    cubin (bytes, the one field JSON cannot hold), resources and PTX instruction counts."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    k = spec.kernel
    src = ASTSource(k, spec.signature, *spec.raw)
    log = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True     # Triton prints its own `ptxas -v` log
        knobs.compilation.always_compile = True
        compiled = triton.compile(src, target=GPUTarget("cuda", spec.arch, 32),
                                  options=spec.options.__dict__)
    ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
    usage = _cuobjdump(cubin)
    fn = usage.get(compiled.metadata.name, {})
    o = spec.options
    return dict(
        kernel=k.fn.__name__, module=k.fn.__module__.rsplit(".", 1)[-1], arch=spec.arch,
        target=f"sm_{spec.arch}" + ("a" if spec.arch >= 90 else ""), spec=spec.label, key=spec.key,
        signature=spec.signature, constexprs={k_: repr(v) for k_, v in spec.constexprs.items()},
        aligned=sorted(spec.attrs), grid=list(spec.grid),
        options=dict(num_warps=o.num_warps, num_stages=o.num_stages, enable_fp_fusion=o.enable_fp_fusion),
        threads=o.num_warps * 32, entries=re.findall(r"^\.visible \.entry (\w+)\(", ptx, re.M),
        ptx_target=(re.findall(r"^\.target (\w+)", ptx, re.M) or [None])[0],
        cubin_functions=sorted(usage), cubin_bytes=len(cubin), ptx=ptx, cubin=cubin,
        registers=fn.get("REG"), local=fn.get("LOCAL"),
        # SHARED in the cubin also counts, on sm_90a, the 1 KB per block the system reserves
        # once a kernel uses shared memory; the kernel's own static shared memory is ptxas's.
        shared_cubin=fn.get("SHARED"), shared_dynamic=compiled.metadata.shared,
        global_scratch=getattr(compiled.metadata, "global_scratch_size", 0),
        **parse_ptxas_log(log.getvalue()), ptx_stats=ptx_summary(ptx))


def ptx_summary(ptx: str) -> dict:
    """Static instruction counts worth checking: global loads/stores by width (``v4.b32``: a
    16-byte vector access, ``b32``/``b16``/``b8``: scalar), ``ex2.approx`` (``tl.exp``, and the
    core of libdevice's expf), libdevice ``expf`` (``_device.accurate_exp``: the low part of
    log2 e, 0f32A57060, that its range reduction adds and ``tl.exp``'s bare ``x * log2 e`` lacks),
    libdevice ``logf`` (``tl.log``), fp32 -> bf16 ``cvt``, ``min``/``max`` that propagate NaN
    (``.NaN``), and the ``and`` with -65536 of a hand-written fp32 -> bf16 rounding."""
    def forms(op):
        found = re.findall(rf"\b{op}\.global[\w.:]*?\.((?:v\d\.)?[bfsu]\d+)\s", ptx)
        return dict(sorted(Counter(found).items()))
    code = "\n".join(line for line in ptx.splitlines() if not line.lstrip().startswith("//"))
    return {"ld.global": forms("ld"), "st.global": forms("st"),
            "ex2.approx": len(re.findall(r"\bex2\.approx", code)),
            "lg2.approx": len(re.findall(r"\blg2\.approx", code)),
            "expf": len(re.findall(r"\b0f32A57060\b", code)),
            "min/max.NaN": len(re.findall(r"\b(?:min|max)\.NaN\.", code)),
            "logf": len(re.findall(r"__nv_logf\.exit", ptx)),
            "cvt.rn.bf16.f32": len(re.findall(r"\bcvt\.rn(?:\.\w+)?\.bf16(?:x2)?\.f32", code)),
            "and.b32 -65536": len(re.findall(r"\band\.b32\s[^;]*,\s*-65536;", code))}


# ------------------------------------------------------------------------------ all cases

def compile_cases(cases=None, archs=ARCHS, kernels=None, with_ptx=False) -> dict:
    """Capture the cases (default ``aot_cases.CASES``), specialise every launch for every arch
    and compile each distinct specialisation once: ``{"records": [compile_spec's, plus cases,
    dtypes, launches], "errors": [the case or kernel, its traceback]}``; one failure hides none."""
    import traceback

    from visioncoach.kernels.aot_cases import CASES

    specs: dict[str, list] = {}
    errors = []
    for case in CASES if cases is None else cases:
        try:
            launches = capture(case.run)
        except Exception:
            errors.append(dict(case=case.name, stage="capture", error=traceback.format_exc()))
            continue
        for launch in launches:
            if kernels and launch.kernel.fn.__name__ not in kernels:
                continue
            for arch in archs:
                s = specialise(launch, arch)
                entry = specs.setdefault(s.key, [s, [], [], 0])
                entry[1] += [case.name] if case.name not in entry[1] else []
                entry[2] += [case.dtype] if case.dtype not in entry[2] else []
                entry[3] += 1
    records = []
    for s, names, dtypes, n in specs.values():
        try:
            rec = compile_spec(s)
        except Exception:
            errors.append(dict(case="; ".join(names), kernel=s.kernel.fn.__name__, arch=s.arch,
                               spec=s.label, stage="compile", error=traceback.format_exc()))
            continue
        rec.pop("cubin")
        if not with_ptx:
            rec.pop("ptx")
        records.append(dict(rec, cases=names, dtypes=sorted(dtypes), launches=n))
    return dict(records=records, errors=errors)


class AOTError(RuntimeError):
    """The AOT subprocess failed, or a kernel did not compile."""


def compile_in_subprocess(archs=ARCHS, kernels=None, case_filter=None, with_ptx=False,
                          timeout=None) -> dict:
    """``compile_cases`` in a fresh ``python -m visioncoach.kernels.aot``: Triton's interpreter
    off whatever this process runs under, an empty temporary Triton cache, nothing kept."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONSAFEPATH"] = "1"       # the installed package, never a checkout's bare `kernels`
    with tempfile.TemporaryDirectory(prefix="vc-aot-") as tmp:
        env["TRITON_CACHE_DIR"] = os.path.join(tmp, "triton-cache")
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "visioncoach.kernels.aot", "--json", out]
        cmd += [a for arch in archs for a in ("--arch", str(arch))] + [a for k in kernels or () for a in ("--kernel", k)]
        cmd += ["--case", case_filter] if case_filter else []
        cmd += ["--with-ptx"] if with_ptx else []
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0 or not os.path.exists(out):
            raise AOTError(f"{' '.join(cmd)} exited with {p.returncode}\n"
                           f"--- stderr (end) ---\n{p.stderr[-8000:]}\n--- stdout (end) ---\n{p.stdout[-2000:]}")
        with open(out) as f:
            return json.load(f)


def kernel_ptx(kernel: str, arch: int = 90, case_filter: str | None = None) -> dict[str, str]:
    """{"<dtypes> <specialisation>": PTX} of ``kernel`` (its function name, e.g.
    ``"_grad_logits_kernel"``) at every specialisation its launchers produce in the cases
    (optionally only cases whose name contains ``case_filter``), compiled for ``sm_<arch>``."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        res = compile_in_subprocess((arch,), [kernel], case_filter, with_ptx=True)
    else:
        from visioncoach.kernels.aot_cases import CASES

        cases = [c for c in CASES if not case_filter or case_filter in c.name]
        res = compile_cases(cases, (arch,), [kernel], with_ptx=True)
    if res["errors"]:
        raise AOTError("\n".join(e["error"] for e in res["errors"]))
    out: dict[str, str] = {}
    for r in res["records"]:
        label = f"{'/'.join(r['dtypes'])} {r['spec']}"
        out[label if label not in out else f"{label} #{len(out)}"] = r["ptx"]
    return out


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m visioncoach.kernels.aot", description=compile_cases.__doc__)
    ap.add_argument("--arch", type=int, action="append", help="compute capability (repeatable; default 80 and 90)")
    ap.add_argument("--kernel", action="append", help="only this kernel function (repeatable)")
    ap.add_argument("--case", help="only cases whose name contains this")
    ap.add_argument("--json", default="-", help="write the records here (default '-': stdout)")
    ap.add_argument("--with-ptx", action="store_true", help="keep each record's PTX text")
    ap.add_argument("--ptx-dir", help="write each specialisation's PTX to DIR/<kernel>.<target>.<n>.ptx")
    args = ap.parse_args(argv)
    from visioncoach.kernels.aot_cases import CASES

    cases = [c for c in CASES if not args.case or args.case in c.name]
    res = compile_cases(cases, tuple(args.arch or ARCHS), args.kernel, args.with_ptx or bool(args.ptx_dir))
    for n, r in enumerate(res["records"]) if args.ptx_dir else ():
        os.makedirs(args.ptx_dir, exist_ok=True)
        with open(os.path.join(args.ptx_dir, f"{r['kernel']}.{r['target']}.{n}.ptx"), "w") as f:
            f.write(f"// {'/'.join(r['dtypes'])} {r['spec']}\n" + (r["ptx"] if args.with_ptx else r.pop("ptx")))
    with open(args.json, "w") if args.json != "-" else contextlib.nullcontext(sys.stdout) as f:
        json.dump(res, f)
    for e in res["errors"]:
        print(f"error in {e.get('kernel') or e['case']} ({e['stage']}):\n{e['error']}", file=sys.stderr)
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
