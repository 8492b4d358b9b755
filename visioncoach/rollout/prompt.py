"""The prompt's side of a rollout: visual features computed once, and the embeddings every later
pass feeds the language model instead of pixels.

1. ``encode_vision``: the vision tower, once per distinct visual input (pass the result as
   ``vision=`` to reuse it for another prompt on the same frames, or for later passes).
2. ``prompt_embeds``: token embeddings with the visual features scattered into the vision
   placeholders (as ``Qwen2_5_VLModel.forward`` does) and the M-RoPE position ids from the
   model's ``get_rope_index``. Every later pass over prompt + completion (rollout, old-policy
   and reference log-probs) calls the language model with these ``inputs_embeds`` and
   ``position_ids`` and never runs the vision tower again.
3. ``prefill``: the prompt through the language model once (batch 1), into a ``DynamicCache``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from visioncoach.models.access import base_model, language_model

__all__ = ["VisionFeatures", "PromptEmbeds", "encode_vision", "prompt_embeds", "prefill"]


@dataclass
class VisionFeatures:
    """Merged visual embeddings (the patch merger's output), one row per vision token."""
    image: torch.Tensor | None = None   # [n_image_tokens, D]: all images, in prompt order
    video: torch.Tensor | None = None   # [n_video_tokens, D]

    def detach(self) -> "VisionFeatures":
        return VisionFeatures(*(None if x is None else x.detach() for x in (self.image, self.video)))


@dataclass
class PromptEmbeds:
    """What the language model needs for the prompt: no pixels, no vision tower."""
    inputs_embeds: torch.Tensor    # [1, L, D]
    position_ids: torch.Tensor     # [3, 1, L] M-RoPE (temporal, height, width) positions
    rope_deltas: torch.Tensor      # [1, 1]: max position + 1 - L

    @property
    def length(self) -> int:
        return self.inputs_embeds.shape[1]

    @property
    def next_position(self) -> torch.Tensor:
        """[3]: position of the first generated token in each M-RoPE section."""
        return self.position_ids[:, 0, -1] + 1

    def completion_positions(self, n: int) -> torch.Tensor:
        """[3, n]: positions of completion tokens 0..n-1 (text: same value in all sections)."""
        return self.next_position[:, None] + torch.arange(n, device=self.position_ids.device)


def _tensors(inputs) -> Mapping[str, torch.Tensor]:
    t = inputs.tensors if hasattr(inputs, "tensors") else inputs
    if t["input_ids"].shape[0] != 1:
        raise ValueError(f"one prompt per call (batch 1), got input_ids {tuple(t['input_ids'].shape)}")
    return t



def encode_vision(model, inputs) -> VisionFeatures:
    """Run the vision tower (and patch merger) on the prompt's pixels: one call per modality.

    ``inputs``: ``ModelInputs`` or its ``tensors`` dict (batch of one prompt). Runs with
    whatever grad mode the caller has (``generate_group`` calls it under ``no_grad``).
    """
    t = _tensors(inputs)
    base = base_model(model)
    image = video = None
    if t.get("pixel_values") is not None:
        out = base.get_image_features(t["pixel_values"], t["image_grid_thw"], return_dict=True)
        image = torch.cat(list(out.pooler_output), 0)
    if t.get("pixel_values_videos") is not None:
        out = base.get_video_features(t["pixel_values_videos"], t["video_grid_thw"], return_dict=True)
        video = torch.cat(list(out.pooler_output), 0)
    return VisionFeatures(image, video)


def _scatter(embeds: torch.Tensor, ids: torch.Tensor, token_id: int, feats: torch.Tensor | None,
             what: str) -> torch.Tensor:
    mask = ids == token_id
    n = int(mask.sum())
    if feats is None:
        if n:
            raise ValueError(f"prompt has {n} {what} tokens but no {what} features were given")
        return embeds
    if feats.shape[0] != n:
        raise ValueError(f"{what} features and tokens do not match: {feats.shape[0]} rows, {n} tokens")
    return embeds.masked_scatter(mask.unsqueeze(-1), feats.to(embeds.device, embeds.dtype))


def prompt_embeds(model, inputs, vision: VisionFeatures) -> PromptEmbeds:
    """Prompt embeddings with the visual features in the placeholder rows, and M-RoPE positions.

    Equals what ``Qwen2_5_VLModel.forward`` feeds its language model for this prompt. Cheap
    (an embedding lookup and the rope index): rebuild it with a reference model whose token
    embeddings differ, reusing the same ``vision`` features.
    """
    t = _tensors(inputs)
    base = base_model(model)
    cfg = base.config
    ids = t["input_ids"]
    embeds = base.get_input_embeddings()(ids)
    embeds = _scatter(embeds, ids, cfg.image_token_id, vision.image, "image")
    embeds = _scatter(embeds, ids, cfg.video_token_id, vision.video, "video")
    has_vision = t.get("image_grid_thw") is not None or t.get("video_grid_thw") is not None
    if has_vision:
        position_ids, rope_deltas = base.get_rope_index(
            ids, mm_token_type_ids=t["mm_token_type_ids"], image_grid_thw=t.get("image_grid_thw"),
            video_grid_thw=t.get("video_grid_thw"), second_per_grid_ts=t.get("second_per_grid_ts"),
            attention_mask=t.get("attention_mask"))
    else:  # text only: plain positions, as transformers does
        position_ids = torch.arange(ids.shape[1], device=ids.device).view(1, 1, -1).expand(3, 1, -1)
        rope_deltas = torch.zeros(1, 1, dtype=torch.long, device=ids.device)
    return PromptEmbeds(embeds, position_ids.to(ids.device), rope_deltas)



def prefill(model, prompt: PromptEmbeds):
    """Run the prompt once: (DynamicCache, last hidden state [1, 1, D])."""
    from transformers import DynamicCache

    lm = language_model(model)
    cache = DynamicCache(config=lm.config)
    out = lm(inputs_embeds=prompt.inputs_embeds, position_ids=prompt.position_ids,
             past_key_values=cache, use_cache=True)
    return cache, out.last_hidden_state[:, -1:]
