"""A stand-in reward for trainer tests: deterministic, varying with the text, in the reward
contract's shape (``visioncoach.rewards.components``). Random-weight rollouts score 0 on the
real rewards, which would leave hard flags, candidates and distillation untested."""

import torch


def text_reward(texts, records, cfg, progress=0.0):
    codes = [sum(map(ord, t)) for t in texts]
    out = {"accuracy": torch.tensor([(len(t) % 7) / 6 for t in texts]),
           "format": torch.tensor([float(len(t) % 2) for t in texts]),
           "temporal": torch.tensor([(c % 11) / 10 for c in codes]),
           "spatial": torch.tensor([(c % 3) / 2 for c in codes])}
    out["total"] = out["accuracy"] + out["format"] + out["temporal"] + out["spatial"]
    return out
