"""GPU check step 3: rollouts + RL steps of a random-weight Qwen2.5-VL with the real 7B layer
shapes, truncated to ``TEXT_LAYERS`` of 28 language layers and ``VISION_BLOCKS`` of 32 vision
blocks (bf16; the full 152,064-row embedding and LM head; the 7B numbers are the released
config.json kept in ``visioncoach.tools.arch``), through the normal entry point:

    torchrun --standalone --nproc_per_node=1 -m visioncoach.train \\
        --config visioncoach/configs/qwen2_5_vl_7b.yaml --model.path=<temp model folder> ...

once with ``rollout.compile_decode=false`` and once with ``true`` (CUDA-graph decode), each
``RL_STEPS`` steps (the first pays for Triton JIT / torch.compile; the last is the steady
state). The model folder (weights, processor, tokenizer) is written by this step first.
Overrides beyond the 7B config: ``overrides()`` (one process: no DeepSpeed, whose ZeRO-3 op
build alone would take the budget; PyAV decode, as step 4 checks DALI; the gating selector, as
no trained VP-Selector ships; ``MAX_NEW_TOKENS`` new tokens; a small synthetic set).

Numbers per run, per RL step, from the run's ``metrics.jsonl``: every ``time_<phase>_s``,
``step_time_s`` (their sum), ``train_tokens_per_s`` (the trainer's ``tokens_per_s``: loss
tokens over the policy log-prob + backward/optimizer time), ``rollout_tokens_per_s_upper``
((prompts + VP re-rollouts) x G x max_new_tokens / time_rollout_s: an upper bound, exact
when no rollout samples EOS, which a random-weight model does with ~1/152k chance per token),
``peak_mem_gib`` (torch.cuda.max_memory_allocated), loss.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG_7B = ROOT / "visioncoach" / "configs" / "qwen2_5_vl_7b.yaml"
TEXT_LAYERS, VISION_BLOCKS = 2, 2
RL_STEPS = 2
NUM_GENERATIONS = 4       # G, the 7B config's
MAX_NEW_TOKENS = 256
SYNTHETIC_SAMPLES = 8
MIN_RUN_S = 20   # less left than this: the run is not started


def qwen25_vl_7b() -> dict:
    """Qwen2.5-VL-7B-Instruct's config.json, the one copy the project keeps (the memory plan's,
    ``visioncoach.tools.arch``)."""
    from visioncoach.tools.arch import QWEN25_VL_7B

    return copy.deepcopy(QWEN25_VL_7B)


def truncated_7b_config(text_layers: int = TEXT_LAYERS, vision_blocks: int = VISION_BLOCKS,
                        attn_implementation: str = "sdpa"):
    """``Qwen2_5_VLConfig`` of the 7B model with fewer layers; every width is the real one.
    The vision tower keeps both block kinds: windowed blocks, then a full-attention one last
    (the released model has one full-attention block after every 7 windowed ones)."""
    from visioncoach.tools.arch import hf_config

    data = qwen25_vl_7b()
    data["num_hidden_layers"] = text_layers
    data["vision_config"].update(depth=vision_blocks, fullatt_block_indexes=[vision_blocks - 1])
    cfg = hf_config(data)
    cfg._attn_implementation = attn_implementation
    return cfg


def build_model(cfg, device: str = "meta", dtype=None):
    """The model of ``cfg`` on ``device`` (``meta``: shapes only, no memory), random weights."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    if dtype is not None:
        model = model.to(dtype)
    model.generation_config.pad_token_id = 151643
    model.generation_config.eos_token_id = 151645
    return model


def shape_summary(model) -> dict:
    """The shapes that make it "7B-sized": one language layer, one vision block, the ends."""
    m = model.model
    lm, vis = m.language_model, m.visual
    layer, block = lm.layers[0], vis.blocks[0]
    shapes = {
        "embed_tokens": lm.embed_tokens.weight.shape, "lm_head": model.lm_head.weight.shape,
        "q_proj": layer.self_attn.q_proj.weight.shape, "k_proj": layer.self_attn.k_proj.weight.shape,
        "v_proj": layer.self_attn.v_proj.weight.shape, "o_proj": layer.self_attn.o_proj.weight.shape,
        "gate_proj": layer.mlp.gate_proj.weight.shape, "down_proj": layer.mlp.down_proj.weight.shape,
        "vision_qkv": block.attn.qkv.weight.shape, "vision_gate_proj": block.mlp.gate_proj.weight.shape,
        "merger_out": vis.merger.mlp[2].weight.shape,
    }
    return {"text_layers": len(lm.layers), "vision_blocks": len(vis.blocks),
            "params": sum(p.numel() for p in model.parameters()),
            "shapes": {k: list(v) for k, v in shapes.items()}}


def expected_shapes() -> dict:
    """The same shapes from the 7B config numbers (what ``shape_summary`` must give)."""
    t = qwen25_vl_7b()
    v = t["vision_config"]
    H, V, head = t["hidden_size"], t["vocab_size"], t["hidden_size"] // t["num_attention_heads"]
    kv = t["num_key_value_heads"] * head
    merged = v["hidden_size"] * v["spatial_merge_size"] ** 2
    return {"embed_tokens": [V, H], "lm_head": [V, H], "q_proj": [H, H], "k_proj": [kv, H],
            "v_proj": [kv, H], "o_proj": [H, H], "gate_proj": [t["intermediate_size"], H],
            "down_proj": [H, t["intermediate_size"]], "vision_qkv": [3 * v["hidden_size"], v["hidden_size"]],
            "vision_gate_proj": [v["intermediate_size"], v["hidden_size"]],
            "merger_out": [v["out_hidden_size"], merged]}


def attn_choice() -> str:
    """flash_attention_2 when flash-attn imports, else sdpa."""
    if importlib.util.find_spec("flash_attn") is None:
        return "sdpa"
    try:
        import flash_attn  # noqa: F401
    except Exception:   # noqa: BLE001 - an installed but broken build: use sdpa, recorded
        return "sdpa"
    return "flash_attention_2"


def overrides(model_dir, out_dir, compile_decode: bool, attn: str) -> list[str]:
    return [f"--model.path={model_dir}", f"--output_dir={out_dir}", f"--optim.rl_steps={RL_STEPS}",
            f"--rollout.num_generations={NUM_GENERATIONS}", f"--rollout.max_new_tokens={MAX_NEW_TOKENS}",
            f"--rollout.compile_decode={'true' if compile_decode else 'false'}",
            f"--model.attn_implementation={attn}", "--model.dtype=bfloat16", "--vp.selector=gating",
            "--dist.engine=ddp", "--data.decoder=pyav", "--data.num_workers=1",
            f"--data.synthetic_samples={SYNTHETIC_SAMPLES}", "--log.tensorboard=false",
            "--log.progress=false"]


def torchrun_argv(args: list[str]) -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    launcher = [str(exe)] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    return launcher + ["--standalone", "--nproc_per_node=1", "-m", "visioncoach.train",
                       "--config", str(CONFIG_7B), *args]


def dry_run(ctx) -> tuple[str, str | None]:
    """Without a GPU: the truncated config and its model on the meta device (shapes checked
    against the 7B numbers), the overrides accepted by the config loader, torchrun found."""
    from visioncoach import config as config_lib

    summary = shape_summary(build_model(truncated_7b_config()))
    want = expected_shapes()
    problems = [f"{k}: {summary['shapes'][k]} != {want[k]}" for k in want if summary["shapes"][k] != want[k]]
    if (summary["text_layers"], summary["vision_blocks"]) != (TEXT_LAYERS, VISION_BLOCKS):
        problems.append(f"layers {summary['text_layers']}+{summary['vision_blocks']}")
    try:
        config_lib.load_config(["--config", str(CONFIG_7B),
                                *overrides("/model", "/run", True, attn_choice())])
        cfg_ok = "ok"
    except (config_lib.ConfigError, ValueError) as exc:
        cfg_ok = str(exc)
        problems.append(f"config overrides: {exc}")
    launcher = torchrun_argv([])[0]
    ctx.numbers = {"model": summary, "attn_implementation_here": attn_choice(), "config_overrides": cfg_ok,
                   "command": " ".join(torchrun_argv(overrides("<model>", "<run>", False, "<attn>"))),
                   "launcher": launcher}
    return ("failed", "; ".join(problems)) if problems else ("passed", None)


def step_numbers(row: dict) -> dict:
    """One metrics.jsonl row -> the report's numbers for that step."""
    times = {k: v for k, v in row.items() if k.startswith("time_") and k.endswith("_s")}
    groups = (row.get("prompts") or 0) + (row.get("vp_rollouts") or 0)
    rollout_s = row.get("time_rollout_s") or 0.0
    return {"step": row.get("step"), "loss": row.get("loss"), **times,
            "step_time_s": sum(times.values()), "train_tokens_per_s": row.get("tokens_per_s"),
            "rollout_tokens_per_s_upper": groups * NUM_GENERATIONS * MAX_NEW_TOKENS / rollout_s if rollout_s else None,
            "peak_mem_gib": row.get("peak_mem_gb"), "prompts": row.get("prompts"),
            "vp_rollouts": row.get("vp_rollouts"), "hard_frac": row.get("hard_frac")}


def _deadline() -> float:
    return float(os.environ.get("GPU_CHECK_DEADLINE", time.time() + 3600))


def run_one(ctx, model_dir: Path, work: Path, compile_decode: bool, attn: str) -> dict:
    tag = f"compile_decode={'true' if compile_decode else 'false'}"
    run_dir = work / f"run-{int(compile_decode)}"
    log_path = ctx.out_dir / "logs" / f"train.{tag}.log"
    rec = {"compile_decode": compile_decode, "status": None, "reason": None, "wall_s": None,
           "log": str(log_path.relative_to(ctx.out_dir))}
    left = _deadline() - time.time() - 3
    if left < MIN_RUN_S:
        rec.update(status="skipped", reason=f"the step's time limit was spent ({left:.0f} s left)")
        return rec
    t0 = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen(torchrun_argv(overrides(model_dir, run_dir, compile_decode, attn)),
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            rc = proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            proc.terminate()
            rc = proc.wait()
            rec["status"] = "timed_out"
    rec["wall_s"] = round(time.monotonic() - t0, 1)
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()] if metrics.is_file() else []
    rec["steps"] = [step_numbers(r) for r in rows if r.get("stage") == "rl"]
    shutil.rmtree(run_dir, ignore_errors=True)   # its checkpoint: ~10 GB of weights + AdamW state
    if rec["status"] == "timed_out":
        rec["reason"] = f"killed after {left:.0f} s (the step's limit)"
    elif rc != 0 or len(rec["steps"]) != RL_STEPS:
        tail = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        rec.update(status="failed", reason=f"exit {rc}, {len(rec['steps'])} of {RL_STEPS} RL steps: "
                                           f"{tail[-1][:300] if tail else '(no output)'}")
    else:
        rec["status"] = "passed"
    return rec


def run(ctx) -> tuple[str, str | None]:
    import torch

    from visioncoach.models.tiny import build_processor

    # The kit stops a step with SIGTERM: leave through ``finally`` so the temp folder goes.
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    attn = attn_choice()
    work = ctx.out_dir / "train_work"
    shutil.rmtree(work, ignore_errors=True)   # a killed earlier kit's leftovers
    try:
        t0 = time.monotonic()
        torch.manual_seed(0)
        model = build_model(truncated_7b_config(attn_implementation=attn), "cuda", torch.bfloat16)
        summary = shape_summary(model)
        model_dir = work / "model"
        model.save_pretrained(model_dir)
        build_processor(min_pixels=3136, max_pixels=100352).save_pretrained(model_dir)
        del model
        torch.cuda.empty_cache()
        ctx.numbers = {"entry": "torchrun --standalone --nproc_per_node=1 -m visioncoach.train",
                       "config": str(CONFIG_7B.relative_to(ROOT)), "attn_implementation": attn,
                       "model": summary, "overrides": [o if "compile_decode" not in o else "--rollout.compile_decode=false|true"
                                                        for o in overrides("<model>", "<run>", False, attn)],
                       "model_build_s": round(time.monotonic() - t0, 1), "runs": []}
        ctx.save()
        for compile_decode in (False, True):
            ctx.numbers["runs"].append(run_one(ctx, model_dir, work, compile_decode, attn))
            ctx.save()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    bad = [f"compile_decode={r['compile_decode']}: {r['status']} ({r['reason']})"
           for r in ctx.numbers["runs"] if r["status"] != "passed"]
    return ("failed", "; ".join(bad)) if bad else ("passed", None)
