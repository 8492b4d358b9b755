"""VisionCoach's rules (paper section 3.2, Algorithm 1, appendices B.2 and D.3) as small pure
functions, so the RL stage only orchestrates and each rule is tested on its own.

* ``group_advantages``: GSPO's group-normalised advantage (eq. 1's A_i);
* ``hard_threshold``: the bar k of Algorithm 1 line 6 (absolute, or a running percentile);
* ``select_distill``: the candidates C and the distilled set S (lines 12-14);
* ``gating_choice``: the reward-gated visual prompt of appendix D.3;
* ``loss_row_weights``: the GSPO and self-distillation weight of every loss row (eq. 2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from visioncoach.rewards.components import ACCURACY, SPATIAL, TEMPORAL, TOTAL

__all__ = ["ADV_EPS", "group_advantages", "hard_threshold", "select_distill", "gating_choice",
           "loss_row_weights"]

ADV_EPS = 1e-4


def group_advantages(total: torch.Tensor) -> torch.Tensor:
    """[G] -> (R - mean) / (std + 1e-4), unbiased std (0 for G = 1)."""
    std = total.std() if total.numel() > 1 else total.new_zeros(())
    return (total - total.mean()) / (std + ADV_EPS)


def hard_threshold(mode: str, k: float, history: Sequence[float]) -> float:
    """The bar a prompt's mean reward must reach not to be hard (Algorithm 1 line 6): ``k``
    itself (``absolute``), or the k-th percentile of ``history`` (``percentile``; linear
    interpolation, numpy's default; -inf while the history is empty)."""
    if mode == "absolute":
        return k
    xs = sorted(history)
    if not xs:
        return -math.inf
    pos = (len(xs) - 1) * k / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def select_distill(raw_mean: float, prompted: Mapping[str, torch.Tensor], top_n: int) -> tuple[list[int], list[int]]:
    """C = {g : R'_g > mean R} and S = top-N of C by answer reward (stable: earlier first)."""
    total = prompted[TOTAL].tolist()
    acc = prompted[ACCURACY].tolist()
    cand = [g for g, r in enumerate(total) if r > raw_mean]
    chosen = sorted(cand, key=lambda g: (-acc[g], g))[:top_n]
    return cand, sorted(chosen)


def gating_choice(raw: Mapping[str, float], averages: Mapping[str, float]) -> str:
    """Appendix D.3: frame numbers (``numpro``) when the prompt's mean temporal reward is below
    the running average, darkening when its spatial reward is; when both (or neither) are, the
    larger shortfall decides (ties: ``darken``)."""
    short_t = averages[TEMPORAL] - raw[TEMPORAL]
    short_s = averages[SPATIAL] - raw[SPATIAL]
    return "numpro" if short_t > short_s else "darken"


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
