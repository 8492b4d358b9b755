"""The reward contract: component names and what a reward function returns.

A reward function (``reward.fn``; default ``visioncoach.rewards:score``) is called as
``fn(texts, records, cfg.reward, progress)`` with one text per rollout, one reward record per
text (``rewards.records.Record``) and the training progress in [0, 1], and returns a mapping
with a 1-D tensor of one value per text for each of ``REWARD_KEYS`` (more keys are allowed
and ignored). ``TOTAL`` is the reward GSPO optimises (eq. 4: the sum of the others for ours);
the algorithm also reads ``ACCURACY`` (distillation ranking), ``TEMPORAL`` and ``SPATIAL``
(the gating selector) and the summaries read ``FORMAT``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Callable

__all__ = ["ACCURACY", "FORMAT", "TEMPORAL", "SPATIAL", "TOTAL", "REWARD_KEYS", "COMPONENTS",
           "DEFAULT_REWARD_FN", "RewardFn", "load_reward_fn", "check_rewards", "with_components"]

ACCURACY, FORMAT, TEMPORAL, SPATIAL, TOTAL = "accuracy", "format", "temporal", "spatial", "total"
REWARD_KEYS = (ACCURACY, FORMAT, TEMPORAL, SPATIAL, TOTAL)
COMPONENTS = (ACCURACY, FORMAT, TEMPORAL, SPATIAL)     # what eq. 4 sums (``reward.components``)
DEFAULT_REWARD_FN = "visioncoach.rewards:score"

RewardFn = Callable[..., Mapping]


def load_reward_fn(spec: str, key: str = "reward.fn") -> RewardFn:
    """The callable named by ``spec`` ("package.module:attr" or "package.module.attr");
    ValueError naming ``key`` when it cannot be imported or is not callable."""
    module, sep, attr = spec.partition(":")
    if not sep:
        module, _, attr = spec.rpartition(".")
    if not module or not attr:
        raise ValueError(f"config key {key!r}: {spec!r} is not a dotted path "
                         "(package.module:function)")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        raise ValueError(f"config key {key!r}: cannot import {module!r} ({exc})") from None
    except AttributeError:
        raise ValueError(f"config key {key!r}: module {module!r} has no {attr!r}") from None
    if not callable(fn):
        raise ValueError(f"config key {key!r}: {spec!r} is not callable")
    return fn


def check_rewards(out: Mapping, n: int, where: str) -> None:
    """Raise ValueError unless ``out`` holds every component as ``n`` values."""
    missing = [k for k in REWARD_KEYS if k not in out]
    if missing:
        raise ValueError(f"{where} returned no {missing} (a reward function returns "
                         f"{list(REWARD_KEYS)}, one value per text)")
    bad = {k: tuple(getattr(out[k], "shape", ())) for k in REWARD_KEYS
           if tuple(getattr(out[k], "shape", ())) != (n,)}
    if bad:
        raise ValueError(f"{where} returned components of shapes {bad}, expected ({n},) each")


def with_components(fn: RewardFn, components) -> RewardFn:
    """``fn`` with ``total`` = the sum of ``components`` (``reward.components``, paper Table 9),
    the one place every consumer's total comes from (RL and train.py's held-out check).

    All four components: ``fn`` unchanged (its own total; ours is that sum). A subset: the
    other components stay in the output as ``fn`` computed them (logged, and read by rules that
    name them), only ``total`` changes. Wrapping a wrapped function re-wraps the original."""
    enabled = tuple(c for c in COMPONENTS if c in components)
    base = getattr(fn, "reward_base", fn)
    if enabled == COMPONENTS:
        return base

    def restricted(texts, records, cfg, progress=0.0):
        out = dict(base(texts, records, cfg, progress))
        check_rewards(out, len(texts), "the reward function (config key 'reward.fn')")
        out[TOTAL] = sum((out[c].float() for c in enabled[1:]), out[enabled[0]].float())
        return out

    restricted.reward_base = base
    restricted.components = enabled
    return restricted
