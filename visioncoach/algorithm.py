"""VisionCoach's rules (paper section 3.2, Algorithm 1, appendices B.2 and D.3) as small pure
functions, so the RL stage only orchestrates and each rule is tested on its own.

* ``group_advantages``: GSPO's group-normalised advantage (eq. 1's A_i);
* ``hard_threshold``: the bar k of Algorithm 1 line 6 (absolute, a running percentile, or a
  fraction of what the sample's task can score, ``attainable_reward``); ``hard_flags``
  applies it to the prompts that may be prompted;
* ``candidate_score`` / ``select_distill``: the candidates C and the distilled set S (lines
  12-14; appendix B.2's candidate reward);
* ``gating_choice``: the reward-gated visual prompt of appendix D.3;
* ``distill_input``: which input the distillation NLL conditions on (eq. 1);
* ``loss_row_weights``: the GSPO and self-distillation weight of every loss row (eq. 2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from visioncoach.rewards.components import ACCURACY, COMPONENTS, FORMAT, SPATIAL, TEMPORAL, TOTAL

__all__ = ["ADV_EPS", "GATING_TYPES", "group_advantages", "attainable_reward", "hard_threshold",
           "hard_flags", "candidate_score", "select_distill", "gating_choice", "distill_input",
           "loss_row_weights"]

ADV_EPS = 1e-4
# The two visual prompts ``gating_choice`` picks between (appendix D.3).
GATING_TYPES = ("numpro", "darken")


def group_advantages(total: torch.Tensor) -> torch.Tensor:
    """[G] -> (R - mean) / (std + 1e-4), unbiased std (0 for G = 1)."""
    std = total.std() if total.numel() > 1 else total.new_zeros(())
    return (total - total.mean()) / (std + ADV_EPS)


def attainable_reward(record, components: Sequence[str] = COMPONENTS) -> float:
    """The most a rollout on ``record`` (a ``rewards.records.Record``) can score on the enabled
    ``components``, each worth at most 1: accuracy and format always, temporal when the record
    has ground-truth times, spatial when it has annotated key-frame boxes (the rewards are 0
    without them, eqs. 5-8). MCQ and free-form records top out at 2, spatio-temporal ones at 4."""
    can = {ACCURACY: True, FORMAT: True, TEMPORAL: bool(record.gt_times), SPATIAL: bool(record.frames)}
    return float(sum(1 for c in components if can[c]))


def hard_threshold(mode: str, k: float, history: Sequence[float], attainable: float = 0.0) -> float:
    """The bar a prompt's mean reward must reach not to be hard (Algorithm 1 line 6): ``k``
    itself (``absolute``), the k-th percentile of ``history`` (``percentile``; linear
    interpolation, numpy's default; -inf while the history is empty), or ``k`` times the
    prompt's ``attainable`` reward (``relative``, k a fraction)."""
    if mode == "absolute":
        return k
    if mode == "relative":
        return k * attainable
    xs = sorted(history)
    if not xs:
        return -math.inf
    pos = (len(xs) - 1) * k / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def hard_flags(mode: str, k: float, means: Sequence[float], history: Sequence[float],
               eligible: Sequence[bool], attainable: Sequence[float]) -> list[bool]:
    """hard_i = eligible_i and mean_i < bar_i (``hard_threshold``; ``attainable[i]`` is prompt
    i's ``attainable_reward``, read in relative mode). An ineligible prompt (no visual prompt
    the chooser may pick renders on it) is never hard: nothing could be re-rolled for it."""
    return [bool(e) and m < hard_threshold(mode, k, history, a)
            for m, e, a in zip(means, eligible, attainable)]


def candidate_score(rewards: Mapping[str, torch.Tensor], rule: str = "total") -> torch.Tensor:
    """[G] what the candidates are compared on: the total reward R (``total``, Algorithm 1 line
    13) or the mean of r_spa, r_tmp and r_acc (``spa_tmp_acc``, appendix B.2)."""
    if rule == "total":
        return rewards[TOTAL].float()
    if rule == "spa_tmp_acc":
        return (rewards[SPATIAL].float() + rewards[TEMPORAL].float() + rewards[ACCURACY].float()) / 3.0
    raise ValueError(f"unknown candidate rule {rule!r} (vp.candidate_reward: total or spa_tmp_acc)")


def select_distill(raw_mean: float, prompted: Mapping[str, torch.Tensor], top_n: int,
                   rule: str = "total") -> tuple[list[int], list[int]]:
    """C = {g : score'_g > raw_mean} and S = top-N of C by answer reward (stable: earlier
    first). score = ``candidate_score(prompted, rule)``; ``raw_mean`` is the raw rollouts' mean
    of the same score (for ``total``: mean R)."""
    score = candidate_score(prompted, rule).tolist()
    acc = prompted[ACCURACY].tolist()
    cand = [g for g, r in enumerate(score) if r > raw_mean]
    chosen = sorted(cand, key=lambda g: (-acc[g], g))[:top_n]
    return cand, sorted(chosen)


def gating_choice(raw: Mapping[str, float], averages: Mapping[str, float]) -> str:
    """Appendix D.3: frame numbers (``numpro``) when the prompt's mean temporal reward is below
    the running average, darkening when its spatial reward is; when both (or neither) are, the
    larger shortfall decides (ties: ``darken``)."""
    short_t = averages[TEMPORAL] - raw[TEMPORAL]
    short_s = averages[SPATIAL] - raw[SPATIAL]
    return GATING_TYPES[0] if short_t > short_s else GATING_TYPES[1]


def distill_input(condition: str, raw, prompted):
    """The input the distilled rollouts' NLL conditions on: the prompted one (x', q'; eq. 1,
    Algorithm 1 line 16) for ``prompted``, the raw one (x, q) for ``raw`` (the prompted
    rollouts' tokens, distilled as if the policy had written them unprompted)."""
    if condition not in ("prompted", "raw"):
        raise ValueError(f"unknown SD condition {condition!r} (loss.sd_condition: prompted or raw)")
    return prompted if condition == "prompted" else raw


def loss_row_weights(num_prompts: int, group_size: int, distill_counts: Sequence[int],
                     alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(GSPO weights, SD weights), each [B G + sum |S_x|], of the rows [the G raw rollouts of
    every prompt; the |S_x| distilled rollouts of every prompt with S_x non-empty]:

        L = (1/B) sum_x [ (1/G) sum_g GSPO_g + alpha 1[S_x != {}] (1/|S_x|) sum_j NLL_j ]

    i.e. 1/(B G) on raw rows and alpha/(B |S_x|) on distilled ones (eq. 2 averaged over the
    batch of B prompts)."""
    B, G = num_prompts, group_size
    gw = [torch.full((G,), 1.0 / (B * G)) for _ in range(B)]
    sw = [torch.zeros(G) for _ in range(B)]
    for k in distill_counts:
        if k:
            gw.append(torch.zeros(k))
            sw.append(torch.full((k,), alpha / (B * k)))
    return torch.cat(gw), torch.cat(sw)
