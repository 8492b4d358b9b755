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
