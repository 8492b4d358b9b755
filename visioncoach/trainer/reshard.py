"""Resuming a checkpoint under another engine, ZeRO stage or process count.

A checkpoint records how it was written (``layout`` in ``trainer_state.json``: engine,
ZeRO stage, process count). The plain engines (``none``, ``ddp``) keep the whole AdamW state
on every rank, so their checkpoints resume at any process count as they are; DeepSpeed's
partition files resume natively only under the same ZeRO stage and process count. Any other
combination goes through here, losing nothing the optimizer needs:

* ``read_full_state``: every trainable parameter's fp32 master weight and AdamW moments
  (``exp_avg``, ``exp_avg_sq``), the AdamW step and the schedule, consolidated from DeepSpeed's
  ZeRO-1/2/3 partitions (the layout DeepSpeed's own ``zero_to_fp32.py`` reads) or taken from a
  plain ``trainer.pt``, all through ``checkpoint.safe_load``.
* ``apply_full_state``: loads them into the running trainer: the weights of ``model/`` (every
  parameter, frozen ones included), then the fp32 masters, moments, step and schedule, into
  the plain AdamW, or into DeepSpeed's partitions through its ``safe_set_full_*`` API.

Every process reads the whole state into CPU memory (about 12 bytes per trainable parameter);
the data position is the step, so after a change of process count the rest of the epoch sees
the samples in another order.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import NamedTuple

import torch

from visioncoach.models.resolve import STATE
from visioncoach.trainer.checkpoint import CheckpointError, load_checkpoint, load_weights, safe_load

log = logging.getLogger(__name__)

__all__ = ["layout_of", "checkpoint_layout", "describe", "needs_reshard", "read_full_state",
           "apply_full_state", "FullState"]

MOMENTS = ("exp_avg", "exp_avg_sq")


def layout_of(engine, zero_stage: int, world_size: int) -> dict:
    """How a run with this engine keeps its optimizer state."""
    if engine is None:
        return {"engine": "plain", "zero_stage": None, "world_size": world_size}
    return {"engine": "deepspeed", "zero_stage": int(zero_stage), "world_size": world_size}


def describe(layout: dict) -> str:
    engine = "DeepSpeed ZeRO-%d" % layout["zero_stage"] if layout["engine"] == "deepspeed" else "plain AdamW"
    n = layout.get("world_size")
    return f"{engine} on {n if n is not None else '?'} process{'es' if n != 1 else ''}"


def _ds_files(ckpt: Path) -> tuple[Path | None, list[Path]]:
    """(model states file, optimizer partition files in rank order) of a DeepSpeed checkpoint."""
    folder = ckpt / "deepspeed" / "state"
    if not folder.is_dir():
        return None, []
    models = sorted(folder.glob("*model_states.pt"))
    ranked = [(int(m[1]), p) for p in folder.glob("*zero_pp_rank_*_optim_states.pt")
              if (m := re.search(r"zero_pp_rank_(\d+)_", p.name))]
    return (models[0] if models else None), [p for _, p in sorted(ranked)]


def checkpoint_layout(ckpt: str | Path) -> dict:
    """The layout ``ckpt`` was written with: recorded, or (older checkpoints) read off its files."""
    import json

    ckpt = Path(ckpt)
    state = json.loads((ckpt / STATE).read_text())
    if "layout" in state:
        return state["layout"]
    model_file, parts = _ds_files(ckpt)
    if model_file is None:
        return {"engine": "plain", "zero_stage": None, "world_size": None}
    cfg = safe_load(model_file, mmap=True, deepspeed=True).get("ds_config", {})
    return {"engine": "deepspeed", "zero_stage": int(cfg.get("zero_optimization", {}).get("stage", 0)),
            "world_size": len(parts) or None}


def needs_reshard(saved: dict, current: dict) -> bool:
    if saved["engine"] == current["engine"] == "plain":
        return False        # the full state on every rank: any process count
    return (saved["engine"], saved["zero_stage"], saved["world_size"]) != \
        (current["engine"], current["zero_stage"], current["world_size"])


class FullState(NamedTuple):
    masters: dict            # name -> fp32 weight of a trainable parameter ({}: model/ holds them)
    moments: dict            # name -> {"exp_avg": tensor, "exp_avg_sq": tensor}
    step: float | None       # AdamW's step count
    scheduler: dict | None   # the LambdaLR state


def read_full_state(ckpt: str | Path, names: list[str]) -> FullState:
    """The consolidated optimizer state of ``ckpt``; ``names``: the trainable parameters in the
    optimizer's order (for a plain checkpoint that predates recording its own)."""
    ckpt = Path(ckpt)
    model_file, parts = _ds_files(ckpt)
    if model_file is None:
        blob = safe_load(ckpt / "trainer.pt")
        opt = blob["optimizer"]
        saved = (blob.get("extra") or {}).get("param_names") or names
        ids = [i for g in opt["param_groups"] for i in g["params"]]
        if len(ids) != len(saved):
            raise CheckpointError(f"{ckpt}: its optimizer has {len(ids)} parameters, its names {len(saved)}")
        moments, step = {}, None
        for i, name in zip(ids, saved):
            s = opt["state"].get(i, {})
            if all(k in s for k in MOMENTS):
                moments[name] = {k: s[k] for k in MOMENTS}
                step = float(s["step"])
        return FullState({}, moments, step, blob["scheduler"])
    states = safe_load(model_file, deepspeed=True)
    if not parts:
        raise CheckpointError(f"{ckpt}: DeepSpeed checkpoint without ZeRO partition files (ZeRO-0 or "
                              "bf16 without ZeRO): resume it with the engine, ZeRO stage and process "
                              "count it was written with")
    osds = [safe_load(p, deepspeed=True)["optimizer_state_dict"] for p in parts]
    stage = int(osds[0].get("zero_stage", 0))
    shapes = states["param_shapes"]
    try:
        if stage in (1, 2):
            masters, moments, step = _zero12(osds, shapes)
        elif stage == 3:
            masters, moments, step = _zero3(osds, shapes)
        else:
            raise KeyError(f"zero_stage {stage}")
    except (KeyError, IndexError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{ckpt}: cannot consolidate its DeepSpeed ZeRO partitions ({exc}); resume "
                              "it with the engine, ZeRO stage and process count it was written with") from None
    return FullState(masters, moments, step, states.get("lr_scheduler"))


def _step_of(state: dict) -> float | None:
    s = state.get("step")
    return float(s) if s is not None else None


def _zero12(osds: list[dict], shapes: list[dict]):
    """ZeRO-1/2: each param group is one flat vector split evenly over the ranks (rank order),
    its parameters packed in ``param_shapes`` order with ``param_alignment_paddings`` between."""
    masters, moments, step = {}, {}, None
    for g, group in enumerate(shapes):
        flat = [o["single_partition_of_fp32_groups"][g] for o in osds]
        base = [o["base_optimizer_state"] for o in osds]
        base = [b[g] if isinstance(b, list) else b["state"].get(g, {}) for b in base]
        full = {"w": torch.cat(flat)}
        if all(all(k in b for k in MOMENTS) for b in base):
            # Trimmed to the fp32 partitions, which are saved without the last rank's padding.
            full.update({k: torch.cat([b[k][:f.numel()] for b, f in zip(base, flat)]) for k in MOMENTS})
            step = _step_of(base[0])
        pads = (osds[0].get("param_alignment_paddings") or [[0] * len(group)] * len(shapes))[g]
        offset = 0
        for (name, shape), pad in zip(group.items(), pads):
            n = math.prod(shape)
            if offset + n > full["w"].numel():
                raise ValueError(f"group {g} holds {full['w'].numel()} values, {name} needs up to {offset + n}")
            masters[name] = full["w"].narrow(0, offset, n).view(shape).clone()
            if len(full) > 1:
                moments[name] = {k: full[k].narrow(0, offset, n).view(shape).clone() for k in MOMENTS}
            offset += n + pad
    return masters, moments, step


def _zero3(osds: list[dict], shapes: list[dict]):
    """ZeRO-3: every parameter is split on its own, ceil(numel / ranks) per rank (the last one
    padded); each rank's sub-groups, concatenated, hold its pieces in ``param_shapes`` order."""
    world = len(osds)
    flat = [torch.cat(o["fp32_flat_groups"]) for o in osds]
    bases = [o["optimizer_state_dict"]["state"] for o in osds]
    have_moments = bool(bases[0]) and all(all(k in s for k in MOMENTS) for b in bases for s in b.values())
    mom = [{k: torch.cat([b[i][k] for i in sorted(b)]) for k in MOMENTS} for b in bases] if have_moments else None
    step = _step_of(bases[0][min(bases[0])]) if have_moments else None
    masters, moments, offset = {}, {}, 0
    for name, shape in ((n, s) for group in shapes for n, s in group.items()):
        n = math.prod(shape)
        part = math.ceil(n / world)
        if offset + part > flat[0].numel():
            raise ValueError(f"rank partitions hold {flat[0].numel()} values, {name} needs up to {offset + part}")
        gather = lambda vs: torch.cat([v.narrow(0, offset, part) for v in vs])[:n].view(shape).clone()  # noqa: E731
        masters[name] = gather(flat)
        if mom is not None:
            moments[name] = {k: gather([m[k] for m in mom]) for k in MOMENTS}
        offset += part
    return masters, moments, step


def apply_full_state(runner, ckpt: Path, full: FullState) -> dict:
    """Load ``full`` (and ``ckpt``'s weights, RNG and trainer state) into ``runner`` (a
    ``StageRunner``, plain or DeepSpeed); returns the trainer state."""
    from visioncoach.trainer.distributed import full_parameters

    model = runner.model
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    unknown = [n for n, _ in named if n not in full.moments and n not in full.masters]
    if full.moments and len(unknown) == len(named):
        raise CheckpointError(f"{ckpt}: none of the model's trainable parameters is in its optimizer "
                              f"state (first: {named[0][0] if named else '-'}): another model?")
    if unknown:
        log.warning("%s: %d trainable parameter(s) without saved optimizer state start from zero "
                    "moments: %s", ckpt, len(unknown), unknown[:5])
    with torch.no_grad(), full_parameters(model, modifier_rank=0):
        load_weights(ckpt, model)                       # every parameter, as consolidated
        for n, p in named:
            if n in full.masters:
                p.data.copy_(full.masters[n].view_as(p.data))
        if runner.ds is not None:
            from deepspeed.utils import safe_set_full_fp32_param

            for n, p in named:
                safe_set_full_fp32_param(p, full.masters.get(n, p.data).float().to(p.device))
    _load_moments(runner, named, full)
    if full.scheduler is not None:
        runner.scheduler.load_state_dict(full.scheduler)
        for group, lr in zip(runner.optimizer.param_groups, runner.scheduler.get_last_lr()):
            group["lr"] = lr
    return load_checkpoint(ckpt, None, None, None)     # RNG and trainer state


def _load_moments(runner, named: list, full: FullState) -> None:
    step = full.step or 0.0
    opt = runner.optimizer
    if runner.ds is None:
        sd = opt.state_dict()
        ids = [i for g in sd["param_groups"] for i in g["params"]]
        sd["state"] = {i: {"step": torch.tensor(step, dtype=torch.float32),
                           **{k: full.moments[n][k].view_as(p) for k in MOMENTS}}
                       for i, (n, p) in zip(ids, named) if n in full.moments}
        opt.load_state_dict(sd)
        return
    from deepspeed.utils import safe_set_full_optimizer_state

    # DeepSpeed's AdamW state (over its flat fp32 partitions: ZeRO-3 keeps them out of the
    # param groups between steps) exists only after a first step: create it, zero, then let
    # DeepSpeed map each parameter's slice of it.
    zero = runner.ds.optimizer
    flats = getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups
    on_device = bool(opt.param_groups[0].get("fused") or opt.param_groups[0].get("capturable"))
    for flat in flats:
        if not all(k in opt.state[flat] for k in MOMENTS):
            opt.state[flat] = {"step": torch.tensor(step, dtype=torch.float32,
                                                    device=flat.device if on_device else "cpu"),
                               **{k: torch.zeros_like(flat) for k in MOMENTS}}
        else:
            opt.state[flat]["step"].fill_(step)
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._lazy_init_hp_params_optimizer_state()
    for n, p in named:
        if n in full.moments:
            for k in MOMENTS:
                safe_set_full_optimizer_state(p, full.moments[n][k].to(p.device), k)
