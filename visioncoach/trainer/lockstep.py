"""Keeping ranks in lock-step when their batches differ (samples that fail to decode or to fit
the prompt budget are dropped per rank, so ranks can hold different numbers, or none).

One small all-reduce per step (``most_usable``: the largest number of usable samples on any
rank) decides, identically on every rank:

* 0: no rank has a usable sample. The step is skipped everywhere (``StageRunner.skip_step``):
  no forward, no optimizer or schedule step, loss null with the reason ``NO_USABLE_SAMPLE``.
  Stepping AdamW on a zero gradient would still move the weights (momentum, weight decay) and
  the schedule, for a batch that taught nothing.
* Under ZeRO-3, a rank with fewer samples than another. ZeRO-3 gathers each module's
  parameters with a collective around its forward and its backward, so every rank must call
  the same modules the same number of times: such a rank runs stand-ins, a known-good sample
  (``StandIn``) with weight 0, where the other engines (gradients reduced once, after the
  backward) let a rank without samples take ``StageRunner.zero_loss``, which calls no module.
  SFT pads every rank to the most samples; RL gives a rank without prompts one stand-in
  group (``stand_in_rollout``), and ``pad_to_common_count`` then evens out the loss groups.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from visioncoach.data.loader import SampleFailure

log = logging.getLogger(__name__)

__all__ = ["NO_USABLE_SAMPLE", "empty_steps", "most_usable", "StandIn", "stand_in_rollout", "pad_to_common_count"]

NO_USABLE_SAMPLE = "no usable sample"


def empty_steps(rows: list[dict]) -> int:
    """How many of a stage's metric rows are steps skipped for want of any usable sample."""
    return sum(m.get("skipped") == NO_USABLE_SAMPLE for m in rows)


def most_usable(n: int, dist_info) -> int:
    """The largest ``n`` over ranks (collective: every rank calls it once per step)."""
    if dist_info.backend is None or dist_info.world_size == 1:
        return n
    t = torch.tensor([n], dtype=torch.int64, device=dist_info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    # Read at the step's start, where the device is idle (the previous step's metrics were
    # read already): this waits for the all-reduce alone.
    return int(t)


class StandIn:
    """A known-good sample of this rank to run with weight 0: the last usable one it saw, else
    (a rank none of whose samples ever loaded) the first record of the dataset that decodes
    and fits the prompt budget, looked for once. ``prepare``: the budget fit (raises ValueError)."""

    def __init__(self, clips, prepare):
        self.clips, self.prepare = clips, prepare
        self.sample = None
        self.warned = False

    def see(self, samples: list) -> None:
        if samples:
            self.sample = samples[-1]

    def get(self):
        if self.sample is None:
            for i in range(len(self.clips)):
                s = self.clips[i]
                if isinstance(s, SampleFailure):
                    continue
                try:
                    self.sample = self.prepare(s)
                    break
                except ValueError:
                    continue
            else:
                raise RuntimeError("ZeRO-3: this rank has no usable sample and no record of the "
                                   "dataset loads to stand in for one")
        if not self.warned:   # once: with a broken shard it would be every step
            log.warning("ZeRO-3: fewer usable samples on this rank than on another; running "
                        "stand-in %r with weight 0 so every rank calls the same modules",
                        self.sample.record["id"])
            self.warned = True
        return self.sample


def stand_in_rollout(runner, sample):
    """(model inputs, rollout) of a stand-in prompt for RL: G greedy one-token rows, enough for
    the loss passes to call what a real group calls (the rows' weight is 0, their content does
    not matter). Run inside the rollouts' gathered-parameters block, as the real rollouts."""
    from visioncoach.processor import resize_frames, sample_inputs
    from visioncoach.rollout.generate import generate_group

    cfg, dev = runner.cfg, runner.dist.device
    frames = resize_frames(sample.frames.to(dev), cfg.data.min_pixels, cfg.data.max_pixels)
    inputs = sample_inputs(sample, frames, sample.record["question"], runner.tokenizer, cfg.data)
    ro = generate_group(runner.model, inputs, cfg.rollout.num_generations, max_new_tokens=1,
                        greedy=True, eos_token_ids=runner.eos, pad_token_id=runner.pad)
    return inputs, ro


def pad_to_common_count(groups: list, adv, gw, sw, dist_info):
    """ZeRO-3: every rank runs the same number of policy (and reference) passes, so ranks with
    fewer loss groups (fewer prompts or distilled groups) repeat their first with weight 0."""
    if dist_info.backend is None:
        return groups, adv, gw, sw
    n = torch.tensor([len(groups)], device=dist_info.device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    for _ in range(int(n) - len(groups)):
        groups.append(groups[0])
        zeros = torch.zeros(groups[0].tokens.shape[0])
        adv, gw, sw = torch.cat([adv, zeros]), torch.cat([gw, zeros]), torch.cat([sw, zeros])
    return groups, adv, gw, sw
