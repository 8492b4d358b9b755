"""Rewards of ST-Reasoner (paper section 3.4, eq. 4): r = r_acc + r_fmt + r_tmp + r_spa.

``score`` (batched.py) is the training path; ``score_reference`` and the per-component
functions of reference.py are the specification it is tested against; records.py validates
and converts sample records; components.py is the contract any reward function meets (its
component names, ``reward.fn``). The output grammar is in ``visioncoach.grounding``.
"""

from visioncoach.config import RewardConfig
from visioncoach.rewards.batched import score
from visioncoach.rewards.components import REWARD_KEYS, check_rewards, load_reward_fn
from visioncoach.rewards.records import TASKS, Record, convert, validate
from visioncoach.rewards.reference import (accuracy_reward, box_iou, format_reward,
                                           identity_match, score_reference, segment_iou,
                                           sigma_at, spatial_reward, temporal_reward)

__all__ = ["RewardConfig", "REWARD_KEYS", "check_rewards", "load_reward_fn", "score", "score_reference", "accuracy_reward", "format_reward",
           "temporal_reward", "spatial_reward", "box_iou", "segment_iou", "identity_match",
           "sigma_at", "validate", "convert", "Record", "TASKS"]
