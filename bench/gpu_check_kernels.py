"""GPU check step 2: the Triton kernels timed with ``triton.testing.do_bench`` (L2 flushed
between calls; mean of its repeats), against the PyTorch reference and, for the LM-head
log-probs + loss, Liger-Kernel's ``LigerFusedLinearGRPOLoss``.

Cases (inputs from the bench scripts' own builders where they have one):
  gspo_sd_loss    bench_gspo_sd_loss.inputs, N x T = 64 x 2048 and 256 x 4096, bf16 and fp32,
                  fwd and fwd+bwd; reference vs triton
  vp_*            16 frames 448 x 448 uint8, 2 boxes each; every VP type with a kernel;
                  render_vp_reference vs render_vp(backend="triton") on the GPU (bit-equal)
  claim_iou, temporal_point_reward
                  bench_rewards.make_batch (2048 rollouts), parsed and packed as ``score`` does
  linear_logprob  bench_linear_logprob.build_step at Qwen2.5-VL-7B's head: 4 x 1024 tokens,
                  H 3584, V 151,936, bf16, fwd+bwd with the GSPO loss, frozen and trainable
                  head; naive (materialised logits) vs ours vs Liger (run last: torch.compile)

Per row: ``time_ms`` (mean), ``bytes`` = compulsory traffic (each input read once, each
output written once; for linear_logprob the hidden states, the head and their gradients,
which dominate), ``gbs`` = bytes / time, ``peak_frac`` = gbs / the device's peak memory
bandwidth (``peak_bandwidth``), ``tflops`` (linear_logprob: 2·N·T·H·V per matmul, two or
three matmuls; it is compute-bound, so read TFLOP/s there, not GB/s), ``vs_reference`` =
reference time / this time (naive for linear_logprob), ``vs_liger`` = Liger's time / this
time, ``extra_peak_gib`` (linear_logprob: peak allocation during one call minus what was held
before it) and a correctness figure against the reference.
"""

from __future__ import annotations

import re

# Peak memory bandwidth, GB/s (10^9 bytes/s), from NVIDIA's data sheets. Matched in order
# against the lower-cased device name, so the more specific patterns come first.
PEAK_BANDWIDTH_GBS = (
    (r"gh200.*(144|hbm3e)", 4900.0, "GH200 144 GB HBM3e"),
    (r"gh200", 4000.0, "GH200 96 GB HBM3"),
    (r"h200", 4800.0, "H200 (SXM / NVL) HBM3e"),
    (r"h100.*nvl", 3900.0, "H100 NVL"),
    (r"h100.*pcie", 2000.0, "H100 PCIe"),
    (r"h100", 3350.0, "H100 SXM5 80 GB HBM3"),
    (r"h800.*pcie", 2000.0, "H800 PCIe"),
    (r"h800", 3350.0, "H800 SXM5"),
    (r"a100.*(80gb.*pcie|pcie.*80gb)", 1935.0, "A100 80 GB PCIe"),
    (r"a100.*80gb", 2039.0, "A100 80 GB SXM4"),
    (r"a100", 1555.0, "A100 40 GB"),
    (r"l40s", 864.0, "L40S"),
    (r"\bl40\b", 864.0, "L40"),
    (r"\bl4\b", 300.0, "L4"),
    (r"a10g", 600.0, "A10G"),
    (r"\ba10\b", 600.0, "A10"),
    (r"\ba40\b", 696.0, "A40"),
    (r"rtx 6000 ada", 960.0, "RTX 6000 Ada"),
    (r"rtx a6000", 768.0, "RTX A6000"),
    (r"rtx 5090", 1792.0, "GeForce RTX 5090"),
    (r"rtx 4090", 1008.0, "GeForce RTX 4090"),
    (r"rtx 3090 ti", 1008.0, "GeForce RTX 3090 Ti"),
    (r"rtx 3090", 936.0, "GeForce RTX 3090"),
    (r"v100", 900.0, "V100"),
    (r"\bt4\b", 320.0, "T4"),
)

VP_FRAMES, VP_SIZE = 16, 448
GSPO_SHAPES = ((64, 2048), (256, 4096))
LLP_SHAPE = dict(n=4, t=1024, h=3584, v=151936)   # Qwen2.5-VL-7B's LM head, 4096 tokens
REWARD_ROLLOUTS = 2048
# Where the cases run. Always CUDA in the kit; tests/test_gpu_check.py runs the same code on
# CPU tensors through Triton's interpreter, tiny shapes and a fake timer (checks the step's
# logic, measures nothing).
DEVICE = "cuda"


def derived_bandwidth(props) -> float | None:
    """2 (double data rate) x memory clock x bus width, from ``torch.cuda.get_device_properties``
    (``memory_clock_rate`` kHz, ``memory_bus_width`` bits), GB/s; None when not reported."""
    clock = getattr(props, "memory_clock_rate", 0) or 0
    width = getattr(props, "memory_bus_width", 0) or 0
    return 2 * clock * 1e3 * width / 8 / 1e9 if clock and width else None


def peak_bandwidth(name: str, props=None) -> dict:
    """{"gbs", "source", "derived_gbs"}: the data-sheet figure when ``name`` is in the table,
    else the one derived from ``props``, else ``gbs`` None and source "unknown"."""
    derived = derived_bandwidth(props) if props is not None else None
    low = (name or "").lower()
    for pattern, gbs, label in PEAK_BANDWIDTH_GBS:
        if re.search(pattern, low):
            return {"gbs": gbs, "source": f"table: {label} (data sheet)", "derived_gbs": derived}
    if derived:
        return {"gbs": round(derived, 1), "derived_gbs": derived,
                "source": "derived: 2 x memory_clock_rate x memory_bus_width (get_device_properties)"}
    return {"gbs": None, "source": "unknown", "derived_gbs": None}


def case_plan() -> list[dict]:
    """What ``run`` measures (the dry run lists it without allocating anything)."""
    from visioncoach.vp.spec import vp_spec, vp_types

    plan = [{"kernel": "gspo_sd_loss", "case": f"N={n};T={t}", "impls": "reference,triton",
             "modes": "fwd,fwd+bwd", "dtypes": "bfloat16,float32"} for n, t in GSPO_SHAPES]
    plan += [{"kernel": f"vp_{v}", "case": f"F={VP_FRAMES};H=W={VP_SIZE}", "impls": "reference,triton",
              "modes": "fwd", "dtypes": "uint8"} for v in vp_types() if vp_spec(v).kernel is not None]
    plan += [{"kernel": k, "case": f"rollouts={REWARD_ROLLOUTS}", "impls": "reference,triton",
              "modes": "fwd", "dtypes": "float32"} for k in ("claim_iou", "temporal_point_reward")]
    plan += [{"kernel": "linear_logprob", "case": ";".join(f"{k.upper()}={v}" for k, v in LLP_SHAPE.items())
              + f";head={head}", "impls": "naive,ours,liger", "modes": "fwd+bwd", "dtypes": "bfloat16"}
             for head in ("frozen", "trainable")]
    return plan


def dry_run(ctx) -> tuple[str, str | None]:
    """Without a GPU: every import and entry the GPU run needs, and its case plan."""
    import importlib

    checks = {}
    for mod, attr in (("triton.testing", "do_bench"), ("liger_kernel.chunked_loss", "LigerFusedLinearGRPOLoss"),
                      ("visioncoach.kernels.gspo_sd_loss", "gspo_sd_loss"),
                      ("visioncoach.kernels.linear_logprob", "linear_logprob"),
                      ("visioncoach.kernels.claim_iou", "claim_iou"),
                      ("visioncoach.kernels.temporal_reward", "temporal_point_reward"),
                      ("visioncoach.vp.render", "render_vp"), ("bench_gspo_sd_loss", "inputs"),
                      ("bench_linear_logprob", "build_step"), ("bench_rewards", "make_batch"),
                      ("_common", "do_bench")):
        try:
            getattr(importlib.import_module(mod), attr)
            checks[f"{mod}.{attr}"] = "ok"
        except Exception as exc:   # noqa: BLE001 - each failure is reported, the others still run
            checks[f"{mod}.{attr}"] = f"{type(exc).__name__}: {exc}"
    ctx.numbers = {"imports": checks, "cases": case_plan()}
    bad = [k for k, v in checks.items() if v != "ok"]
    return ("failed", f"cannot import {', '.join(bad)}") if bad else ("passed", None)


# ------------------------------------------------------------------------------ GPU run

def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class Rows:
    """The step's table, saved after every row so a timeout keeps what was measured."""

    def __init__(self, ctx, peak: dict, timer=None):
        from _common import do_bench

        self.ctx, self.peak, self.timer = ctx, peak, timer or do_bench
        ctx.numbers.setdefault("cases", [])

    def add(self, kernel, case, impl, mode, dtype, fn, nbytes, flops=None, **extra) -> dict:
        t = self.timer(fn)
        gbs = nbytes / t.mean / 1e9
        row = dict(kernel=kernel, case=case, impl=impl, mode=mode, dtype=dtype,
                   time_ms=t.mean * 1e3, time_ms_median=t.median * 1e3, bytes=int(nbytes), gbs=gbs,
                   peak_frac=gbs / self.peak["gbs"] if self.peak.get("gbs") else None,
                   tflops=flops / t.mean / 1e12 if flops else None, **extra)
        self.ctx.numbers["cases"].append(row)
        _speedups(self.ctx.numbers["cases"])
        self.ctx.save()
        print(f"  {kernel:24s} {case:36s} {impl:9s} {mode:7s} {dtype:8s} {row['time_ms']:9.4f} ms "
              f"{gbs:8.1f} GB/s", flush=True)
        return row


def _speedups(rows: list[dict]) -> None:
    """vs_reference / vs_liger within each (kernel, case, mode, dtype)."""
    groups: dict[tuple, dict[str, float]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["case"], r["mode"], r["dtype"]), {})[r["impl"]] = r["time_ms"]
    for r in rows:
        g = groups[(r["kernel"], r["case"], r["mode"], r["dtype"])]
        base = g.get("reference", g.get("naive"))
        r["vs_reference"] = base / r["time_ms"] if base else None
        r["vs_liger"] = g["liger"] / r["time_ms"] if "liger" in g else None


def bench_gspo(rows: Rows) -> None:
    import torch

    from bench_gspo_sd_loss import KW, inputs
    from visioncoach.kernels.gspo_sd_loss import gspo_sd_loss, gspo_sd_loss_reference

    impls = {"reference": lambda *a: gspo_sd_loss_reference(*a, **KW),
             "triton": lambda *a: gspo_sd_loss(*a, **KW, backend="triton")}
    for n, t in GSPO_SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            logp, *rest = inputs(n, t, dtype, DEVICE)
            x = logp.clone().requires_grad_()
            with torch.no_grad():
                want = impls["reference"](x, *rest)[0].double()
                got = impls["triton"](x, *rest)[0].double()
            diff = float((want - got).abs())
            fwd_bytes = _nbytes(logp, *rest)
            for impl, f in impls.items():
                def fwd(f=f):
                    with torch.no_grad():
                        f(x, *rest)

                def fwd_bwd(f=f):
                    x.grad = None
                    f(x, *rest)[0].backward()

                extra = {"loss_abs_diff": diff} if impl == "triton" else {}
                name = str(dtype).removeprefix("torch.")
                rows.add("gspo_sd_loss", f"N={n};T={t}", impl, "fwd", name, fwd, fwd_bytes, **extra)
                rows.add("gspo_sd_loss", f"N={n};T={t}", impl, "fwd+bwd", name, fwd_bwd,
                         fwd_bytes + _nbytes(logp), **extra)


def bench_vp(rows: Rows) -> None:
    import torch

    from visioncoach.vp.render import render_vp, render_vp_reference
    from visioncoach.vp.spec import vp_spec, vp_types

    g = torch.Generator(device=DEVICE).manual_seed(0)
    F, S = VP_FRAMES, VP_SIZE
    frames = torch.randint(0, 256, (F, S, S, 3), dtype=torch.uint8, device=DEVICE, generator=g)
    boxes = torch.tensor([[40.0, 60.0, 200.0, 300.0], [220.0, 100.0, 420.0, 380.0]],
                         device=DEVICE).expand(F, 2, 4).contiguous()
    box_count = torch.full((F,), 2, dtype=torch.int64, device=DEVICE)
    frame_index = torch.arange(1, F + 1, dtype=torch.int64, device=DEVICE)
    heatmap = torch.rand(F, 32, 32, device=DEVICE, generator=g)
    args = (boxes, box_count, frame_index, heatmap)
    for v in vp_types():
        spec = vp_spec(v)
        if spec.kernel is None:
            continue
        equal = torch.equal(render_vp(frames, v, *args, backend="triton"), render_vp_reference(frames, v, *args))
        nbytes = 2 * _nbytes(frames) + (_nbytes(heatmap) if spec.needs == "heatmap" else 0)
        case = f"F={F};H=W={S}"
        rows.add(f"vp_{v}", case, "reference", "fwd", "uint8", lambda v=v: render_vp_reference(frames, v, *args),
                 nbytes)
        rows.add(f"vp_{v}", case, "triton", "fwd", "uint8",
                 lambda v=v: render_vp(frames, v, *args, backend="triton"), nbytes, equal_reference=equal)


def bench_rewards(rows: Rows) -> None:
    import torch

    from bench_rewards import FREE_FORM_TASKS, MAIN_TASKS, make_batch
    from visioncoach.grounding import parse_texts
    from visioncoach.kernels.claim_iou import claim_iou, claim_iou_reference
    from visioncoach.kernels.temporal_reward import temporal_point_reward, temporal_point_reward_reference
    from visioncoach.rewards import batched

    texts, samples = make_batch(REWARD_ROLLOUTS, 4, MAIN_TASKS + FREE_FORM_TASKS)
    records, index = batched.convert_records(samples)
    cb = parse_texts(texts).claims.to(DEVICE)
    gt = batched.ground_truth(records, DEVICE)
    rr = torch.tensor(index, dtype=torch.int64, device=DEVICE)
    case = f"rollouts={REWARD_ROLLOUTS};claims={cb.claim_t.numel()};times={cb.times.numel()}"

    ci = (cb.claim_t, rr.index_select(0, cb.claim_rollout), cb.boxes, cb.box_count, gt.frame_of,
          gt.frame_time, gt.frame_boxes, gt.box_obj, gt.obj_count, gt.obj_name.shape[1])
    a, b = claim_iou(*ci, backend="triton"), claim_iou_reference(*ci)
    diff = max(float((x.double() - y.double()).abs().max()) if x.numel() else 0.0
               for x, y in ((a.score_max, b.score_max), (a.score_avg, b.score_avg), (a.best_obj, b.best_obj)))
    nbytes = _nbytes(*ci[:-1]) + _nbytes(*a)
    rows.add("claim_iou", case, "reference", "fwd", "float32", lambda: claim_iou_reference(*ci), nbytes)
    rows.add("claim_iou", case, "triton", "fwd", "float32", lambda: claim_iou(*ci, backend="triton"),
             nbytes, max_abs_diff=diff, same_frames=bool(torch.equal(a.frame, b.frame)))

    tr = (cb.times, rr.index_select(0, cb.time_rollout), gt.times, gt.time_mask, gt.segments, gt.seg_mask, 1.0)
    a, b = temporal_point_reward(*tr, backend="triton"), temporal_point_reward_reference(*tr)
    nbytes = _nbytes(*tr[:-1]) + _nbytes(a)
    rows.add("temporal_point_reward", case, "reference", "fwd", "float32",
             lambda: temporal_point_reward_reference(*tr), nbytes)
    rows.add("temporal_point_reward", case, "triton", "fwd", "float32",
             lambda: temporal_point_reward(*tr, backend="triton"), nbytes,
             max_abs_diff=float((a - b).abs().max()) if a.numel() else 0.0)


def _empty_cache() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def bench_linear_logprob(rows: Rows, impls: tuple[str, ...]) -> None:
    for head in ("frozen", "trainable"):
        for impl in impls:
            _linear_logprob_case(rows, impl, head == "trainable")
            _empty_cache()   # the case's tensors are gone with its frame


def _linear_logprob_case(rows: Rows, impl: str, trainable: bool) -> None:
    import torch

    from bench_linear_logprob import build_step

    s = LLP_SHAPE
    step, hidden, weight = build_step(impl, s["n"], s["t"], s["h"], s["v"], trainable, "bfloat16", DEVICE)

    def fn():
        hidden.grad = weight.grad = None   # no accumulation into the last call's gradients
        step()

    # The first call (torch.compile for Liger) stays out of the timing; it also measures the
    # extra peak memory of one call.
    cuda = DEVICE == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    fn()
    extra = None
    if cuda:
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - before) / 2**30
    nbytes = 2 * _nbytes(hidden) + _nbytes(weight) * (2 if trainable else 1)
    flops = 2 * s["n"] * s["t"] * s["h"] * s["v"] * (3 if trainable else 2)
    case = ";".join(f"{k.upper()}={v}" for k, v in s.items()) + f";head={'trainable' if trainable else 'frozen'}"
    rows.add("linear_logprob", case, impl, "fwd+bwd", "bfloat16", fn, nbytes, flops=flops,
             extra_peak_gib=extra)


def run(ctx) -> tuple[str, str | None]:
    import torch

    props = torch.cuda.get_device_properties(0)
    peak = peak_bandwidth(props.name, props)
    ctx.numbers.update(device=props.name, peak_bandwidth_gbs=peak["gbs"],
                       peak_bandwidth_source=peak["source"], derived_bandwidth_gbs=peak["derived_gbs"])
    problems = run_cases(ctx, peak)
    return ("failed", "; ".join(problems)) if problems else ("passed", None)


def run_cases(ctx, peak: dict, timer=None) -> list[str]:
    """Every case into ``ctx.numbers["cases"]``; returns the problems found (a part that
    raised, an output unequal to its reference)."""
    rows = Rows(ctx, peak, timer)
    problems = []
    # Cheapest first; Liger (a torch.compile per head) last, so a timeout costs only its rows.
    parts = (("gspo_sd_loss", bench_gspo), ("vp", bench_vp), ("rewards", bench_rewards),
             ("linear_logprob", lambda r: bench_linear_logprob(r, ("naive", "ours"))),
             ("linear_logprob liger", lambda r: bench_linear_logprob(r, ("liger",))))
    for name, part in parts:
        try:
            part(rows)
        except Exception as exc:   # noqa: BLE001 - one part failing must not hide the others
            import traceback

            traceback.print_exc()
            problems.append(f"{name}: {type(exc).__name__}: {exc}"[:300])
            _empty_cache()
    cases = ctx.numbers["cases"]
    unequal = [f"{r['kernel']}" for r in cases if r.get("equal_reference") is False]
    wrong = [f"{r['kernel']} {r['case']}" for r in cases
             if (r.get("max_abs_diff") or 0) > 1e-5 or r.get("same_frames") is False]
    if unequal:
        problems.append(f"not bit-equal to the reference: {', '.join(unequal)}")
    if wrong:
        problems.append(f"differs from the reference: {', '.join(wrong)}")
    return problems
