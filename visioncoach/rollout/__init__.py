"""Data flow stage 4: rollouts. A GSPO group of G continuations of one prompt, with the vision
encoder and the prompt prefill run once.

* ``prompt``: visual features and prompt embeddings (the vision tower runs once per input);
* ``sampling``: temperature, top-p (sort-free on CPU) and the draw;
* ``generate``: the decode loop over a static KV cache shared by the G rows;
* ``forcing``: teacher-forced hidden states / log-probs of given completions (trainer passes);
* ``session``: a loaded policy for greedy generation on videos (prediction, inference, judges).
"""

from visioncoach.rollout.forcing import completion_hidden_states, completion_logprobs
from visioncoach.rollout.generate import RolloutGroup, decode_step, generate_group
from visioncoach.rollout.prompt import PromptEmbeds, VisionFeatures, encode_vision, prefill, prompt_embeds
from visioncoach.rollout.sampling import sample_tokens, top_p_mask

__all__ = [
    "PromptEmbeds", "RolloutGroup", "VisionFeatures", "completion_hidden_states",
    "completion_logprobs", "decode_step", "encode_vision", "generate_group", "prefill",
    "prompt_embeds", "sample_tokens", "top_p_mask",
]
