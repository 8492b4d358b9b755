"""RL's running statistics over every rank's prompts of every step so far (``RunningStats``):
the per-prompt mean rewards (the percentile hard bar, Algorithm 1 line 6) and the temporal /
spatial sums (the gating rule's averages, appendix D.3). Saved with the checkpoint. Its own
module so that ``trainer/rl.py`` stays orchestration."""

from __future__ import annotations

import torch.distributed as dist

from visioncoach.rewards.components import SPATIAL, TEMPORAL

__all__ = ["RunningStats"]


class RunningStats:
    """Statistics over every rank's prompts of every step so far: the per-prompt mean rewards
    (the percentile bar) and the temporal / spatial sums (the gating rule's averages).
    Saved with the checkpoint."""

    def __init__(self, dist_info):
        self.dist = dist_info
        self.mean_history: list[float] = []
        self.component_sums = {TEMPORAL: 0.0, SPATIAL: 0.0, "n": 0}

    def _gather(self, values: list[float]) -> list[float]:
        """This step's values of every rank, rank-major (ranks may hold different counts: a rank
        whose samples failed to decode contributes fewer)."""
        if self.dist.backend is None or self.dist.world_size == 1:
            return list(values)
        out: list = [None] * self.dist.world_size
        dist.all_gather_object(out, list(values))
        return [v for part in out for v in part]

    def add(self, means: list[float], components: list[dict[str, float]]) -> None:
        """Add this rank's prompts (collective: every rank calls it, even with none)."""
        self.mean_history += self._gather(means)
        flat = self._gather([x for c in components for x in (c[TEMPORAL], c[SPATIAL])])
        self.component_sums[TEMPORAL] += sum(flat[0::2])
        self.component_sums[SPATIAL] += sum(flat[1::2])
        self.component_sums["n"] += len(flat) // 2

    def averages(self) -> dict[str, float]:
        n = max(1, self.component_sums["n"])
        return {k: self.component_sums[k] / n for k in (TEMPORAL, SPATIAL)}

    def state(self) -> dict:
        return {"mean_history": self.mean_history, "component_sums": self.component_sums}

    def load(self, state: dict) -> None:
        self.mean_history = list(state.get("mean_history", []))
        self.component_sums = dict(state.get("component_sums", self.component_sums))
