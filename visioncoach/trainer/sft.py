"""SFT cold start: token NLL of the reference reasoning, through the fused LM-head log-probs.

``SFTRunner`` is the stage (``optim.sft_steps`` steps on the shared ``StageRunner`` harness);
``build_sft_example`` / ``sft_loss`` are its step.

The prompt is the same one RL and inference use (``visioncoach.processor.sample_inputs``); the
target is ``templates.sft_target`` of the record (the reference's think/answer text around its
``reasoning_process``, boxes in model-frame pixels) followed by ``<|im_end|>``. The loss never forms
the [tokens x vocab] logits: the language model's final hidden states at the target positions
go through ``visioncoach.kernels.linear_logprob`` with the LM head's weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from visioncoach.grounding import _block
from visioncoach.models.access import base_model
from visioncoach.processor import sample_inputs
from visioncoach.templates import sft_target
from visioncoach.trainer.distributed import token_logprobs
from visioncoach.trainer.harness import StageRunner
from visioncoach.trainer.lockstep import NO_USABLE_SAMPLE
from visioncoach.utils.profiling import Phases, peak_memory_gb


@dataclass
class SFTExample:
    tensors: dict[str, torch.Tensor]  # model inputs over prompt + target, batch 1
    target_start: int                 # index of the first target token in input_ids
    frame_size: tuple[int, int]
    # Per-target-token loss weights [1, Tt] and their sum (known on the host, so the loss
    # needs no sync); None: every token weighs 1.
    weights: torch.Tensor | None = None
    weight_sum: float = 0.0


def answer_token_weights(tokenizer, text: str, answer_weight: float) -> tuple[list[int], list[float]]:
    """Token ids of the SFT target ``text`` and each token's loss weight: ``answer_weight``
    for a token that overlaps the answer block's content (the first ``<answer>`` up to the
    first ``</answer>`` after it), 1 for the others and for every token of a text without one.
    The ids are exactly ``tokenizer(text).input_ids``: the offsets come with them."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as e:     # a slow (python) tokenizer has no offsets
        raise ValueError(f"loss.sft_answer_weight={answer_weight} needs a fast tokenizer (token "
                         f"offsets), but {type(tokenizer).__name__} has none; set it to 1") from e
    span = _block(text, "answer")       # the answer block as the parser reads it
    if span is None:
        return enc.input_ids, [1.0] * len(enc.input_ids)
    a, b = span
    return enc.input_ids, [answer_weight if start < b and end > a else 1.0
                           for start, end in enc.offset_mapping]


def build_sft_example(sample, tokenizer, data_cfg, device: torch.device,
                      answer_weight: float = 1.0) -> SFTExample:
    """Model inputs for one decoded sample (``visioncoach.data.loader.ClipSample``): its prompt
    (``data_cfg``'s layout and pixel budget; one image for an image record) followed by the
    SFT target (``templates.sft_target``, boxes in the pixels of the frames the model sees).
    ``answer_weight``: ``loss.sft_answer_weight`` (``answer_token_weights``)."""
    rec = sample.record
    inputs = sample_inputs(sample, sample.frames.to(device), rec["question"], tokenizer, data_cfg)
    t = inputs.tensors
    text = sft_target(rec, inputs.frame_size) + "<|im_end|>"
    weights, weight_sum = None, 0.0
    if answer_weight == 1.0:
        target = tokenizer(text, add_special_tokens=False).input_ids
    else:
        target, w = answer_token_weights(tokenizer, text, answer_weight)
        weights = torch.tensor([w], dtype=torch.float32, device=device)        # [1, Tt]
        weight_sum = sum(w)
    target = torch.tensor([target], dtype=torch.int64, device=device)        # [1, Tt]
    start = t["input_ids"].shape[1]
    t = dict(t)
    t["input_ids"] = torch.cat([t["input_ids"], target], 1)
    t["attention_mask"] = torch.ones_like(t["input_ids"])
    t["mm_token_type_ids"] = torch.cat([t["mm_token_type_ids"], torch.zeros_like(target)], 1)
    return SFTExample(t, start, inputs.frame_size, weights, weight_sum)


def target_logprobs(model, example: SFTExample) -> torch.Tensor:
    """log pi(y_t | x, y_<t) of every target token, [1, Tt] fp32 (no full logits)."""
    lm = model.module if hasattr(model, "module") else model  # DDP wrapper
    # base_model: through a peft wrapper too (a LoRA policy's ``.model`` is the whole LM).
    hidden = base_model(lm)(**example.tensors).last_hidden_state             # [1, L, D]
    ids = example.tensors["input_ids"]
    # Position t's hidden state predicts token t + 1.
    h = hidden[:, example.target_start - 1:-1]                                # [1, Tt, D]
    y = ids[:, example.target_start:]                                         # [1, Tt]
    return token_logprobs(lm, h, y)


def sft_loss(model, examples: list[SFTExample]) -> tuple[torch.Tensor, int]:
    """Weighted mean token NLL over all target tokens of the batch, sum(w * nll) / sum(w)
    (w = 1 but for answer tokens under ``loss.sft_answer_weight``), and the token count."""
    total = None
    n, w_sum = 0, 0.0
    for ex in examples:
        logp = target_logprobs(model, ex)                                     # [1, Tt]
        if ex.weights is None:
            s, w = -logp.sum(), float(logp.numel())
        else:
            s, w = -(logp * ex.weights).sum(), ex.weight_sum
        total = s if total is None else total + s
        n += logp.numel()
        w_sum += w
    return total / (w_sum if w_sum > 0 else 1.0), n


class SFTRunner(StageRunner):
    """Runs ``optim.sft_steps`` SFT steps on ``dataset`` (an ``STGRDataset`` with reasoning)."""

    stage = "sft"

    def __init__(self, cfg, dist_info, model, tokenizer, dataset, out_dir: Path, *, processor=None):
        super().__init__(cfg, dist_info, model, tokenizer, dataset, out_dir, lr=cfg.optim.sft_lr,
                         steps=cfg.optim.sft_steps, processor=processor)

    def train_step(self, batch) -> dict:
        cfg, dev = self.cfg, self.dist.device
        phase = Phases("sft")
        with phase("data"):
            samples = self.usable(batch)
            most, pad = self.agree(samples)   # collective: ranks decide the same
            w = cfg.loss.sft_answer_weight
            examples = [build_sft_example(s, self.tokenizer, cfg.data, dev, w) for s in samples]
            # ZeRO-3, fewer samples here than on another rank: as many stand-ins, weight 0.
            stand_ins = ([build_sft_example(pad, self.tokenizer, cfg.data, dev, w)] * (most - len(samples))
                         if pad is not None else [])
        if not most:
            return self.skip_step(phase, NO_USABLE_SAMPLE)
        self.model.train()
        with phase("forward"):
            loss, n_tok = sft_loss(self.model, examples) if examples else (None, 0)
            if stand_ins:   # the module calls of the missing samples (trainer/lockstep.py)
                zero = sft_loss(self.model, stand_ins)[0] * 0.0
                loss = zero if loss is None else loss + zero
            loss = self.zero_loss() if loss is None else loss
        with phase("backward_optim", nvtx="sft/backward+optimizer"):
            ok, grad_norm, lr = self.update(loss)
        self.step += 1
        t = phase.seconds
        return {"stage": "sft", "step": self.step, "loss": float(loss.detach()) if ok else None,
                "skipped": not ok, "lr": lr, "grad_norm": float(grad_norm) if ok else None,
                "tokens": n_tok, "tokens_per_s": n_tok / max(t["forward"] + t["backward_optim"], 1e-9),
                **phase.metrics(), "peak_mem_gb": peak_memory_gb(dev),
                "samples_skipped": self.failures.total}
