"""SFT cold start: token NLL of the reference reasoning, through the fused LM-head log-probs.

The prompt is the same one RL and inference use (``visioncoach.processor.build_inputs``); the
target is the record's ``reasoning_process`` followed by ``<|im_end|>``. The loss never forms
the [tokens x vocab] logits: the language model's final hidden states at the target positions
go through ``visioncoach.kernels.linear_logprob`` with the LM head's weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from visioncoach.processor import build_inputs
from visioncoach.prompts import user_text
from visioncoach.trainer.engine import token_logprobs


@dataclass
class SFTExample:
    tensors: dict[str, torch.Tensor]  # model inputs over prompt + target, batch 1
    target_start: int                 # index of the first target token in input_ids
    frame_size: tuple[int, int]


def build_sft_example(sample, tokenizer, *, layout: str, min_pixels: int, max_pixels: int,
                      device: torch.device) -> SFTExample:
    """Model inputs for one decoded sample (``visioncoach.data.loader.ClipSample``)."""
    rec = sample.record
    inputs = build_inputs(sample.frames.to(device), sample.times, sample.duration,
                          user_text(rec["question"], rec["task"]), tokenizer, layout=layout,
                          min_pixels=min_pixels, max_pixels=max_pixels)
    t = inputs.tensors
    target = tokenizer(rec["reasoning_process"] + "<|im_end|>", add_special_tokens=False).input_ids
    target = torch.tensor([target], dtype=torch.int64, device=device)        # [1, Tt]
    start = t["input_ids"].shape[1]
    t = dict(t)
    t["input_ids"] = torch.cat([t["input_ids"], target], 1)
    t["attention_mask"] = torch.ones_like(t["input_ids"])
    t["mm_token_type_ids"] = torch.cat([t["mm_token_type_ids"], torch.zeros_like(target)], 1)
    return SFTExample(t, start, inputs.frame_size)


def target_logprobs(model, example: SFTExample) -> torch.Tensor:
    """log pi(y_t | x, y_<t) of every target token, [1, Tt] fp32 (no full logits)."""
    lm = model.module if hasattr(model, "module") else model  # DDP wrapper
    hidden = lm.model(**example.tensors).last_hidden_state                   # [1, L, D]
    ids = example.tensors["input_ids"]
    # Position t's hidden state predicts token t + 1.
    h = hidden[:, example.target_start - 1:-1]                                # [1, Tt, D]
    y = ids[:, example.target_start:]                                         # [1, Tt]
    return token_logprobs(lm, h, y)


def sft_loss(model, examples: list[SFTExample]) -> tuple[torch.Tensor, int]:
    """Mean token NLL over all target tokens of the batch, and the token count."""
    total = None
    n = 0
    for ex in examples:
        logp = target_logprobs(model, ex)
        s = -logp.sum()
        total = s if total is None else total + s
        n += logp.numel()
    return total / max(n, 1), n
