"""Distributed engines: DeepSpeed ZeRO (its JSON config generated from ours), or plain data
parallelism with an explicit gradient all-reduce, or a single process.

The training step calls the policy's submodules directly (the prompt's prefill shared by G
rollouts, final hidden states into the fused LM-head kernel), never the model's top-level
forward. That works with:

* ZeRO-1/2: gradients are reduced by hooks on the parameters, whatever called them.
* ZeRO-3: parameters are gathered by hooks on every submodule's forward. The one parameter
  used outside its module is the LM head's weight (read by ``linear_logprob``); ``lm_head_weight``
  hands it over inside a ``GatheredParameters`` region for the forward, and the fused kernel
  keeps what its backward needs (the gathered weight) alive in the autograd graph.

RL's frozen reference policy (full fine-tuning, ``reference_policy``) is partitioned under
ZeRO-3 as well: a second, inference-only engine, so each rank holds 1/world of it.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from visioncoach.models.access import hf_model

log = logging.getLogger(__name__)


def engine_kind(dist_cfg, world_size: int) -> str:
    """``deepspeed``, ``ddp`` (explicit all-reduce) or ``none``, from ``dist.engine``."""
    kind = dist_cfg.engine
    if kind == "auto":
        kind = "deepspeed" if world_size > 1 else "none"
    if kind != "none" and world_size == 1 and kind == "ddp":
        kind = "none"
    return kind


def deepspeed_config(cfg, dtype: torch.dtype) -> dict:
    """DeepSpeed's JSON config from ours: ZeRO stage, clipping, precision; the optimizer and
    schedule stay ours (passed to ``deepspeed.initialize`` as objects)."""
    on_cuda = torch.cuda.is_available()
    zero = {"stage": cfg.dist.zero_stage, "contiguous_gradients": True, "overlap_comm": on_cuda,
            "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7}
    if cfg.dist.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True,
                    # No prefetch: the step runs submodules in an order that changes between
                    # rollout, teacher forcing and backward, so a recorded trace does not hold.
                    stage3_prefetch_bucket_size=0, stage3_param_persistence_threshold=0)
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def initialize_deepspeed(model, optimizer, scheduler, cfg):
    """``deepspeed.initialize`` with our optimizer and scheduler objects; returns the engine."""
    import deepspeed

    dtype = next(model.parameters()).dtype
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, dtype), dist_init_required=False)
    log.info("DeepSpeed ZeRO-%d engine (%s)", cfg.dist.zero_stage, dtype)
    return engine


def is_zero3(model) -> bool:
    return any(hasattr(p, "ds_id") and hasattr(p, "ds_status") for p in model.parameters())


@contextlib.contextmanager
def full_parameters(model, params=None, modifier_rank=None):
    """Inside: ``params`` (default all of ``model``'s) hold their full values even under
    ZeRO-3 (gathered, released on exit; ``modifier_rank``: whose in-place edits are kept).
    A no-op without ZeRO-3."""
    if not is_zero3(model):
        yield
        return
    import deepspeed

    params = list(model.parameters()) if params is None else list(params)
    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


class LogprobHead(torch.nn.Module):
    """log pi(token) from final hidden states through the fused LM-head kernel, as a module.

    It has no parameters of its own; being a module is what lets ZeRO-3 gather the LM head's
    weight (registered as its external parameter) around its forward and its backward."""

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from visioncoach.kernels.linear_logprob import linear_logprob

        return linear_logprob(hidden, weight, targets)


def attach_logprob_head(model) -> None:
    """Give the policy a ``logprob_head`` child (before ``deepspeed.initialize`` wraps it)."""
    hf = hf_model(model)
    if not hasattr(hf, "logprob_head"):
        hf.logprob_head = LogprobHead()


def register_head_weight(model) -> None:
    """Under ZeRO-3: the LM head's weight is gathered with ``logprob_head`` (after initialize)."""
    if is_zero3(model):
        import deepspeed

        hf = hf_model(model)
        deepspeed.zero.register_external_parameter(hf.logprob_head, hf.lm_head.weight)


def token_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[..., T] fp32 log-probs of ``targets`` from final hidden states [..., T, D]: through the
    ``logprob_head`` module when attached (DeepSpeed), else the kernel directly."""
    hf = hf_model(model)
    head = getattr(hf, "logprob_head", None)
    if head is not None:
        return head(hidden, hf.lm_head.weight, targets)
    from visioncoach.kernels.linear_logprob import linear_logprob

    return linear_logprob(hidden, hf.lm_head.weight, targets)


def frozen_copy(model):
    """A frozen, plain (never partitioned, no DeepSpeed hooks) copy of ``model``'s current
    weights, in eval mode: the reference policy. Under ZeRO-3 the weights are gathered first
    (collective: every rank calls this)."""
    hf = hf_model(model)
    with torch.no_grad(), full_parameters(hf):
        state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    ref = type(hf)(hf.config).to(dtype=next(iter(state.values())).dtype)
    missing, unexpected = ref.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"reference copy does not match the policy: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    device = next(iter(state.values())).device
    return ref.to(device).requires_grad_(False).eval()


def reference_policy(model, cfg, dist_info):
    """RL's frozen reference for full fine-tuning: under ZeRO-3 partitioned like the policy
    (``partitioned_reference``), else a plain replica (``frozen_copy``)."""
    world = dist_info.world_size if dist_info.backend else 1
    if engine_kind(cfg.dist, world) == "deepspeed" and cfg.dist.zero_stage == 3:
        return partitioned_reference(model, cfg)
    return frozen_copy(model)


def partitioned_reference(model, cfg):
    """The reference policy under ZeRO-3: each rank holds 1/world of its weights (a replica of
    a 7B policy would be 15 GB more per GPU), gathered per module call by an inference-only
    DeepSpeed engine (no optimizer) like the policy's. Built inside ``deepspeed.zero.Init``,
    so no rank ever holds it whole; the values come from the policy one parameter at a time.
    Collective: every rank calls it, with the policy not yet partitioned. Returns the module."""
    import deepspeed
    import torch.distributed as dist
    from transformers.initialization import no_init_weights

    hf = hf_model(model)
    if is_zero3(hf):
        raise RuntimeError("partitioned_reference: build the reference before the policy's engine")
    dtype = next(hf.parameters()).dtype
    ds_cfg = deepspeed_config(cfg, dtype)
    # no_init_weights: transformers' initialisation indexes into the (already empty) partitioned
    # tensors, and every value is overwritten below anyway. The dtype comes from the config's
    # bf16 flag (= the policy's); an explicit ``dtype=`` is overridden on CPU (DeepSpeed 0.19).
    with deepspeed.zero.Init(config_dict_or_path=ds_cfg), no_init_weights():
        ref = type(hf)(hf.config)
    src = dict(hf.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if dist.get_rank() == 0:
                    p.data.copy_(src[name])
        buffers = dict(hf.named_buffers(remove_duplicate=False))
        for prefix, mod in ref.named_modules():   # rotary tables etc.: never partitioned
            for key, b in mod._buffers.items():
                if b is not None:
                    mod._buffers[key] = buffers[f"{prefix}.{key}" if prefix else key].detach().clone()
    attach_logprob_head(ref)
    ref.requires_grad_(False).eval()
    engine, _, _, _ = deepspeed.initialize(model=ref, config=ds_cfg, dist_init_required=False)
    # The engine removes its gather hooks when collected: it lives as long as the module does.
    # (Not as a module attribute: the engine is a Module, and would become a child.)
    object.__setattr__(ref, "_reference_engine", engine)
    register_head_weight(ref)
    log.info("reference policy: ZeRO-3 partitioned (inference engine, no optimizer)")
    return ref


def local_parameter_elements(model) -> int:
    """Parameter elements this rank holds in memory: under ZeRO-3 its partitions (plus any
    parameter gathered at the moment), else every parameter."""
    return sum(p.numel() if not hasattr(p, "ds_tensor") else p.ds_tensor.numel() + p.data.numel()
               for p in model.parameters())


def release_deepspeed(engine, model) -> None:
    """End a stage's engine and give ``model`` back as a plain module: DeepSpeed's hooks
    removed and, under ZeRO-3, every parameter holding its full value again (gathered first,
    collective), so the model runs without an engine and the next stage's engine can take it."""
    zero3 = is_zero3(model)
    full = None
    if zero3:
        with torch.no_grad(), full_parameters(model):
            full = [p.detach().clone() for p in model.parameters()]
    engine.destroy()
    if zero3:
        for p, value in zip(model.parameters(), full):
            p.data = value
            for name in [n for n in vars(p) if n.startswith("ds_")]:
                delattr(p, name)


@contextlib.contextmanager
def gathered_for_generation(ds_engine, model):
    """Under ZeRO-3: all parameters gathered once and DeepSpeed's module hooks off for the
    block (then restored), so generation runs as a plain model. Ranks stop generating at
    different steps and roll out different numbers of prompts; with per-module gathers those
    collectives would not line up across ranks. A no-op otherwise."""
    if ds_engine is None or not is_zero3(model):
        yield
        return
    import deepspeed

    offload = ds_engine.optimizer.parameter_offload
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        offload._remove_module_hooks()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload.setup_zero_stage3_hooks()
