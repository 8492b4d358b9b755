"""Which visual prompt a hard prompt gets (``vp.selector``; paper section 3.3, appendix D.3)."""

from __future__ import annotations

import random
from typing import Mapping, Sequence

from visioncoach.algorithm import GATING_TYPES, gating_choice
from visioncoach.vp.spec import RAW, clip_required, renderable

__all__ = ["VPChooser"]


class VPChooser:
    """The visual prompt of each hard prompt, by ``vp.selector``:

    * ``fixed:<type>``: always that type.
    * ``gating`` (appendix D.3, ``algorithm.gating_choice``): frame numbers when the temporal
      reward is below its running average, darkening when the spatial one is.
    * ``random``: uniform over the renderable ``vp.types`` (seeded by seed, rank and step).
    * ``model``: the trained VP-Selector, frozen; ``selector`` is a loaded
      ``visioncoach.selector.Selector`` (the trainer loads it from ``vp.selector_path``). A type
      it names that this run cannot render (a heatmap type without ``vp.clip_path``) becomes raw,
      as does an output that names no label; both are counted (``selector_metrics``).
    * ``none``: no visual prompting (plain GSPO; hard prompts are only counted).
    """

    def __init__(self, vp_cfg, seed: int, rank: int, have_heatmaps: bool, selector=None):
        self.mode = vp_cfg.selector
        self.seed, self.rank = seed, rank
        self.types = renderable(vp_cfg.types, have_heatmaps)
        if not self.types:
            raise ValueError("config key 'vp.types': no visual prompt type this run can render; "
                             + "; ".join(clip_required(t, "'vp.clip_path'") for t in vp_cfg.types))
        self.fixed = self.mode.split(":", 1)[1] if self.mode.startswith("fixed:") else None
        if self.fixed is not None and not renderable([self.fixed], have_heatmaps):
            raise ValueError(f"config key 'vp.selector' is fixed:{self.fixed}: "
                             + clip_required(self.fixed, "'vp.clip_path'"))
        if self.mode == "model" and selector is None:
            raise ValueError("config key 'vp.selector' is 'model' but 'vp.selector_path' is empty: "
                             "train one with `python -m visioncoach.selector.train`, or use "
                             "gating, random, fixed:<type> or none")
        self.selector = selector
        self._counts = dict.fromkeys(("selector_outputs", "selector_unmapped", "selector_unrenderable"), 0)

    @property
    def active(self) -> bool:
        return self.mode != "none"

    @property
    def may_pick(self) -> list[str]:
        """Every type ``choose`` can return (what hard-sample eligibility asks about): the fixed
        type; gating's two; the renderable ``vp.types`` for random (and for none, so that its
        hard fraction counts the same samples a prompting run would); for the model those
        plus raw, which a label this run cannot render becomes."""
        if self.fixed is not None:
            return [self.fixed]
        if self.mode == "gating":
            return list(GATING_TYPES)
        return list(dict.fromkeys(self.types + ([RAW] if self.mode == "model" else [])))

    def choose(self, step: int, samples: Sequence, raw: Sequence[Mapping[str, float]],
               averages: Mapping[str, float]) -> list[str]:
        """One type per hard prompt; ``raw[i]``: mean raw reward components of prompt i,
        ``averages``: their running averages over all ranks."""
        if self.fixed is not None:
            return [self.fixed] * len(samples)
        if self.mode == "gating":
            return [gating_choice(r, averages) for r in raw]
        if self.mode == "random":
            rng = random.Random(hash((self.seed, self.rank, step)))
            return [rng.choice(self.types) for _ in samples]
        # Both ways a selector's output silently becomes raw are counted (selector_metrics).
        mapper = getattr(self.selector, "mapper", None)
        before = mapper.unmapped if mapper is not None else 0
        picked = self.selector.choose_for_samples(samples)
        self._counts["selector_outputs"] += len(picked)
        self._counts["selector_unmapped"] += (mapper.unmapped - before) if mapper is not None else 0
        self._counts["selector_unrenderable"] += sum(t not in self.types for t in picked)
        return [t if t in self.types else RAW for t in picked]

    def selector_metrics(self) -> dict[str, int]:
        """For ``model``: the selector's outputs since the last call, how many named no label
        (``selector_unmapped``) and how many named a type this run cannot render
        (``selector_unrenderable``); both became raw. Empty for the other modes."""
        if self.mode != "model":
            return {}
        out, self._counts = self._counts, dict.fromkeys(self._counts, 0)
        return out

