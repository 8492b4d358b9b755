"""Data flow stage 4: rollouts. A GSPO group of G continuations of one prompt, with the vision
encoder and the prompt prefill run once (``visioncoach.rollout.engine``)."""

from visioncoach.rollout.engine import (
    CallCounter,
    PromptEmbeds,
    RolloutGroup,
    VisionFeatures,
    completion_hidden_states,
    completion_logprobs,
    decode_step,
    encode_vision,
    generate_group,
    prompt_embeds,
    sample_tokens,
    top_p_mask,
)

__all__ = [
    "CallCounter",
    "PromptEmbeds",
    "RolloutGroup",
    "VisionFeatures",
    "completion_hidden_states",
    "completion_logprobs",
    "decode_step",
    "encode_vision",
    "generate_group",
    "prompt_embeds",
    "sample_tokens",
    "top_p_mask",
]
