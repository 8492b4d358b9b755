"""Per-GPU memory plan of the RL stage under DeepSpeed ZeRO-3, computed (not measured).

    python -m visioncoach.tools.memory_plan [--config FILE] [--gpus 8] [--json FILE]
        [--arch qwen2.5-vl-7b|tiny] [--reserve-gib 4] [--gpu-gib 80] [--section.key=value ...]

The model is instantiated on the meta device (``tools/arch.py``): Qwen2.5-VL-7B from its public
config, or ``--model.path``'s config.json, or (``--arch tiny``) the trainer's tiny model. Its
parameters are counted per component; the memory terms (``tools/memory_terms.py``) follow
this trainer's code for one RL step; the sweep finds the largest ``rollout.prompts_per_step``
and G whose peak fits the GPU. Prints a table; ``--json`` also writes everything as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from visioncoach.config import CONFIG_DIR, ConfigError
from visioncoach.tools import memory_terms as mt
from visioncoach.tools.arch import (QWEN25_VL_7B, arch_of, config_json_of, count_params, hf_config,
                                    meta_model, tiny_config)

DEFAULT_CONFIG = str(CONFIG_DIR / "qwen2_5_vl_7b.yaml")
REF_MODES = ("partitioned", "replica")

ASSUMPTIONS = [
    "Computed from formulas over the model's shapes, not measured on a GPU; GiB = 2^30 bytes.",
    "Full fine-tuning of the language model and LM head under DeepSpeed ZeRO-3 on N GPUs as "
    "trainer/distributed.py configures it: bf16 parameter partitions of ceil(n/N) elements, no "
    "prefetch, persistence threshold 0; gradient partitions in bf16 (grad_accum_dtype = the "
    "model's), an IPG bucket of reduce_bucket_size; our torch AdamW (fused) runs on DeepSpeed's "
    "fp32 partitions (master + exp_avg + exp_avg_sq), the fp32 gradient of a sub-group exists only "
    "during the step. The vision tower is frozen (partitioned, no gradient or optimizer state).",
    "ZeRO-3 gathers one module's own parameters at a time (largest: the embedding / LM head, V x D); "
    "when DeepSpeed's module trace is complete, parameters reused within stage3_max_reuse_distance "
    "(default 1e9 elements, not set by our config) stay gathered: counted in full as a worst case.",
    "Rollouts run inside gathered_for_generation: a full bf16 copy of every parameter per GPU; "
    "vision tower and prompt prefill once per prompt (batch 1), the prefill's K/V broadcast into a "
    "StaticCache of G rows and ceil((L + T) / bucket) x bucket slots (rollout/generate.py), plus one "
    "layer's K/V copy that FlashAttention-2's unpadding makes per decode step.",
    "Worst case per step: every prompt is L = data.max_prompt_tokens long and every rollout reaches "
    "T = rollout.max_new_tokens; every prompt is hard and distils min(vp.top_n, G) rows on a "
    "prompted input of the same length (none with vp.selector=none); all groups' graphs live until "
    "the one backward; under ZeRO-3 the G rows of a group are one plain forward of L + T - 1 tokens "
    "each (RLRunner.share_prompt is False).",
    "bf16 activations, FlashAttention-2 (no S x S matrix; saves q, k, v, output and an fp32 "
    "log-sum-exp per head). Gradient checkpointing per decoder layer: each layer's input kept, one "
    "layer recomputed at a time; what a layer saves is enumerated from transformers 5.23's "
    "Qwen2.5-VL code (RMSNorm keeps its fp32 input; the MLP keeps gate, silu(gate), up and their "
    "product); the backward's extra transients (4I + 6D bytes per token) and the no-grad layer "
    "peaks are estimates.",
    "LM-head log-probs through kernels/linear_logprob.py's Triton path: default_chunk_size(V) rows "
    "of fp32 logits (+ a bf16 copy) per forward chunk; backward in vocabulary slices of the same "
    "element budget (_vocab_slice) and a full bf16 weight gradient; D [NT, H] fp32 kept.",
    "Vision tower: data.nframes frames of data.max_pixels each (annotated key frames not counted), "
    "no grad, one block's working set; its features and the prompt embeddings are kept per group "
    "until the loss.",
    "The reference policy is either a full frozen replica per GPU (frozen_copy) or partitioned like "
    "the policy (a second, inference-only ZeRO-3 engine); both are shown. LoRA is not planned.",
    "The reserve covers what no formula here sees: the CUDA context and cuBLAS workspaces, NCCL "
    "buffers, the part of the nominal capacity the driver keeps, and caching-allocator "
    "fragmentation (shapes change every step: prompt, completion and group counts).",
]


def _parse(argv: list[str]):
    ap = argparse.ArgumentParser(prog="python -m visioncoach.tools.memory_plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs the ZeRO-3 partitions are spread over")
    ap.add_argument("--json", help="also write the plan as JSON to this file")
    ap.add_argument("--arch", choices=("qwen2.5-vl-7b", "tiny"), default="qwen2.5-vl-7b",
                    help="architecture when model.path is empty (tiny: the trainer's model.tiny)")
    ap.add_argument("--reserve-gib", type=float, default=4.0, help="CUDA/NCCL/fragmentation reserve")
    ap.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU")
    ap.add_argument("--max-prompts", type=int, default=16, help="sweep rollout.prompts_per_step up to this")
    ap.add_argument("--max-g", type=int, default=32, help="sweep G up to this")
    args, rest = ap.parse_known_args(argv)
    if args.gpus < 1 or args.max_prompts < 1 or args.max_g < 2:
        ap.error("--gpus and --max-prompts must be >= 1, --max-g >= 2")
    return args, rest


def load_plan_config(config_file: str, overrides: list[str]):
    """The trainer's config from the file and ``--section.key=value`` overrides, type-checked
    but without the trainer's start-up checks (a plan needs no dataset or selector paths)."""
    from visioncoach.config import Config, apply_yaml
    from visioncoach.utils import typed_config

    _, pairs, _ = typed_config.parse_args(overrides)
    cfg = Config()
    apply_yaml(cfg, config_file)
    for key, value, source in pairs:
        typed_config.set_value(cfg, key, value, source, from_cli=True)
    return cfg


def model_of(cfg, arch_flag: str):
    """(Arch, ParamCounts, source) of the model the config trains."""
    if cfg.model.path:
        path = config_json_of(cfg.model.path)
        hf, name, source = hf_config(path), cfg.model.path, str(path)
    elif arch_flag == "tiny":
        hf, name, source = tiny_config(cfg.model.tiny), "tiny", "model.tiny (the trainer's tiny model)"
    else:
        hf, name, source = (hf_config(QWEN25_VL_7B), "Qwen2.5-VL-7B",
                            "Qwen/Qwen2.5-VL-7B-Instruct config.json (built in, tools/arch.py)")
    return arch_of(hf, name), count_params(meta_model(hf)), source


def workload_of(cfg, gpus: int, reserve_gib: float, gpu_gib: float) -> mt.Workload:
    import torch
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from visioncoach.trainer.distributed import deepspeed_config

    zero = DeepSpeedZeroConfig(**deepspeed_config(cfg, torch.bfloat16)["zero_optimization"])
    return mt.Workload(
        gpus=gpus, prompt_tokens=cfg.data.max_prompt_tokens, completion_tokens=cfg.rollout.max_new_tokens,
        G=cfg.rollout.num_generations, prompts=cfg.rollout.prompts_per_step,
        top_n=0 if cfg.vp.selector == "none" else cfg.vp.top_n,
        frames=cfg.data.nframes, pixels=cfg.data.max_pixels, layout=cfg.data.layout,
        checkpointing=cfg.model.gradient_checkpointing, reference=cfg.loss.beta > 0,
        reduce_bucket=int(zero.reduce_bucket_size), reuse_distance=int(zero.max_reuse_distance),
        sub_group_size=int(zero.sub_group_size), reserve_gib=reserve_gib, capacity_gib=gpu_gib)


def evaluate(arch, counts, w: mt.Workload) -> dict:
    """Terms, phase peaks per reference mode, the peak and whether it fits."""
    t = mt.terms(arch, counts, w)
    ph = {m: mt.phases(t, m) for m in REF_MODES}
    peak = {m: max(p.values()) for m, p in ph.items()}
    return {"terms": t, "phases": ph, "peak": peak,
            "fits": {m: peak[m] <= w.capacity_gib * mt.GIB for m in REF_MODES}}


def _limit(arch, counts, w: mt.Workload, mode: str) -> str:
    """Which phase peaks at ``w`` and its largest per-step term."""
    r = evaluate(arch, counts, w)
    phase = max(r["phases"][mode], key=r["phases"][mode].get)
    per_step = {"rollout": ("rollout_params", "kv_static", "kv_prefix", "prefill_ws"),
                "reference": ("ref_ws", "kept_rollouts"),
                "policy": ("act_checkpoints", "act_layer", "act_head", "act_kernel"),
                "optimizer": ("opt_step",)}[phase]
    top = sorted(per_step, key=lambda k: -r["terms"][k])[:2]
    return f"{phase} phase: " + " + ".join(f"{k} {r['terms'][k] / mt.GIB:.1f} GiB" for k in top)


def sweep(arch, counts, w: mt.Workload, max_prompts: int, max_g: int) -> dict:
    """Largest prompts_per_step at the config's G, and largest G at its prompts_per_step, per
    reference mode, with what stops the next one; and a small grid of peaks."""
    def at(B, G):
        return dataclasses.replace(w, prompts=B, G=G)

    out = {}
    for mode in REF_MODES:
        fits = {(B, G): evaluate(arch, counts, at(B, G))["fits"][mode]
                for B in range(1, max_prompts + 1) for G in (w.G,)}
        fits.update({(w.prompts, G): evaluate(arch, counts, at(w.prompts, G))["fits"][mode]
                     for G in range(2, max_g + 1)})
        best_b = max((B for B in range(1, max_prompts + 1) if fits[(B, w.G)]), default=0)
        best_g = max((G for G in range(2, max_g + 1) if fits[(w.prompts, G)]), default=0)
        out[mode] = {
            "max_prompts_per_step": best_b, "at_G": w.G,
            "prompts_limited_by": _limit(arch, counts, at(best_b + 1, w.G), mode) if best_b < max_prompts else None,
            "max_G": best_g, "at_prompts_per_step": w.prompts,
            "G_limited_by": _limit(arch, counts, at(w.prompts, best_g + 1), mode) if best_g < max_g else None,
        }
    grid_b = [b for b in (1, 2, 3, 4) if b <= max_prompts]
    grid_g = [g for g in (2, 4, 6, 8, 16) if g <= max_g]
    out["grid"] = {"prompts_per_step": grid_b, "G": grid_g,
                   "peak_gib": {mode: [[round(evaluate(arch, counts, at(b, g))["peak"][mode] / mt.GIB, 2)
                                        for g in grid_g] for b in grid_b] for mode in REF_MODES}}
    return out


def table(header: list[str], rows: list[list]) -> str:
    """Plain text columns; numbers right-aligned with two decimals."""
    cells = [header] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    num = [all(isinstance(r[i], (int, float)) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(wd) if n else c.ljust(wd) for c, wd, n in zip(r, widths, num)) for r in cells]
    rule = "-" * max(len(x) for x in lines)
    return "\n".join([lines[0], rule, *lines[1:]])


def report(plan: dict) -> str:
    g = mt.GIB
    w, c, r = plan["workload"], plan["params"], plan["result"]
    lines = [f"Memory plan (computed, not measured): {plan['model']['name']} RL step on {w['gpus']} GPUs "
             f"under ZeRO-3, GiB per GPU", f"model: {plan['model']['source']}",
             f"parameters: vision {c['vision']:,} (frozen), embeddings {c['embeddings']:,}, decoder "
             f"{c['decoder']:,}, LM head {c['lm_head']:,} ({'tied' if c['tied'] else 'untied'}, "
             f"{plan['model']['arch']['vocab']:,} rows), total {c['total']:,}, trained in RL {c['trained']:,}",
             f"workload: L={w['prompt_tokens']} prompt + T={w['completion_tokens']} completion tokens, "
             f"G={w['G']}, prompts_per_step={w['prompts']}, distilled rows/prompt={w['sd_rows']}, "
             f"{w['frames']} frames x {w['pixels']} px, checkpointing={w['checkpointing']}", ""]
    rows = [[what, round(r["terms"][k] / g, 2), formula] for k, (what, formula) in mt.TERMS.items()]
    lines += [table(["term", "GiB", "formula"], rows), ""]
    rows = [[p, round(r["phases"]["partitioned"][p] / g, 2), round(r["phases"]["replica"][p] / g, 2)]
            for p in r["phases"]["partitioned"]]
    rows.append(["peak", round(r["peak"]["partitioned"] / g, 2), round(r["peak"]["replica"] / g, 2)])
    lines += [table(["phase peak (incl. reserve)", "ref partitioned", "ref replica"], rows),
              f"fits {w['capacity_gib']:g} GiB: reference partitioned {'yes' if r['fits']['partitioned'] else 'NO'}, "
              f"replica {'yes' if r['fits']['replica'] else 'NO'}", ""]
    s = plan["sweep"]

    def why(limit):
        return f"one more peaks in the {limit}" if limit else "the sweep's end (--max-prompts / --max-g) fits too"

    for mode in REF_MODES:
        m = s[mode]
        lines.append(f"sweep, reference {mode}: largest prompts_per_step at G={m['at_G']}: "
                     f"{m['max_prompts_per_step']} ({why(m['prompts_limited_by'])}); largest G at "
                     f"prompts_per_step={m['at_prompts_per_step']}: {m['max_G']} ({why(m['G_limited_by'])})")
    grid = s["grid"]
    for mode in REF_MODES:
        rows = [[f"prompts_per_step={b}", *vals] for b, vals in zip(grid["prompts_per_step"], grid["peak_gib"][mode])]
        lines += ["", table([f"peak GiB, ref {mode}", *[f"G={x}" for x in grid["G"]]], rows)]
    lines += ["", "assumptions:"] + [f"- {a}" for a in plan["assumptions"]]
    return "\n".join(lines)


def build_plan(argv: list[str]) -> dict:
    args, rest = _parse(argv)
    cfg = load_plan_config(args.config, rest)
    if cfg.dist.zero_stage != 3 or cfg.model.lora.enabled or cfg.stage == "sft":
        raise ConfigError("the plan covers the RL stage of a full fine-tune under ZeRO-3 "
                         f"(this config: stage={cfg.stage}, dist.zero_stage={cfg.dist.zero_stage}, "
                         f"model.lora.enabled={cfg.model.lora.enabled})")
    arch, counts, source = model_of(cfg, args.arch)
    w = workload_of(cfg, args.gpus, args.reserve_gib, args.gpu_gib)
    c = {k: getattr(counts, k) for k in ("vision", "embeddings", "decoder", "lm_head", "tied", "per_layer",
                                         "total", "trained")}
    return {"computed_not_measured": True, "config": args.config,
            "model": {"name": arch.name, "source": source, "arch": dataclasses.asdict(arch)},
            "params": {**c, "largest_module": list(counts.largest_module)},
            "workload": {**dataclasses.asdict(w), "sd_rows": w.sd_rows, "seq": w.seq}, "result": evaluate(arch, counts, w),
            "sweep": sweep(arch, counts, w, args.max_prompts, args.max_g),
            "term_descriptions": {k: {"what": a, "formula": f} for k, (a, f) in mt.TERMS.items()},
            "assumptions": ASSUMPTIONS, "json": args.json}


def main(argv: list[str] | None = None) -> int:
    try:
        plan = build_plan(list(sys.argv[1:] if argv is None else argv))
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report(plan))
    if plan["json"]:
        from visioncoach.eval.common import write_json

        write_json(plan["json"], plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
