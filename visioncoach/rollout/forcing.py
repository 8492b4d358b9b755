"""Teacher forcing: the policy's hidden states (or log-probs) of given completions after a prompt,
for the trainer's policy, old-policy and reference passes.

``completion_hidden_states`` gives the final hidden states of the completion positions, which
the trainer feeds to the fused LM-head log-prob kernel; by default the prompt is run once and
its KV cache repeated to the G rows. ``completion_logprobs`` is the plain-logits version.
"""

from __future__ import annotations

import torch

from visioncoach.models.access import checkpointing_active, language_model, lm_head
from visioncoach.rollout.prompt import PromptEmbeds, prefill

__all__ = ["completion_hidden_states", "completion_logprobs"]


def completion_hidden_states(model, prompt: PromptEmbeds, tokens: torch.Tensor,
                             lengths: torch.Tensor | None = None, *,
                             share_prompt: bool = True) -> torch.Tensor:
    """Final hidden states [G, T, D] that predict ``tokens`` [G, T] after ``prompt``.

    ``h[:, t]`` is the language model's last hidden state (after the final norm) at the
    position just before completion token t, so ``lm_head(h).log_softmax(-1)`` gathered at
    ``tokens`` gives their log-probs. Runs with the caller's grad mode (the policy pass) or
    under no_grad (old-policy / reference passes), never the vision tower.

    lengths: [G] completion lengths; positions from ``max(lengths)`` on are not computed
        (zeros). Positions past a row's own length are garbage-in: mask them.
    share_prompt: run the prompt once (batch 1) and repeat its KV cache to the G rows (exact:
        gradients of the G rows accumulate into the one prompt pass); False = one plain
        forward over the G concatenated sequences. Forced False when gradient checkpointing
        is active in training mode (it drops caches).
    """
    G, T = tokens.shape
    n = T if lengths is None else max(1, min(T, int(lengths.max())))
    lm = language_model(model)
    L = prompt.length
    comp_pos = prompt.completion_positions(n - 1)[:, None, :].expand(3, G, n - 1)
    comp_emb = lm.embed_tokens(tokens[:, : n - 1])
    if share_prompt and not checkpointing_active(model):
        cache, h0 = prefill(model, prompt)
        h = h0.expand(G, 1, -1)
        if n > 1:
            cache.batch_repeat_interleave(G)
            out = lm(inputs_embeds=comp_emb, position_ids=comp_pos, past_key_values=cache, use_cache=True)
            h = torch.cat([h, out.last_hidden_state], 1)
    else:
        emb = torch.cat([prompt.inputs_embeds.expand(G, -1, -1), comp_emb], 1)
        pos = torch.cat([prompt.position_ids.expand(3, G, L), comp_pos], -1)
        h = lm(inputs_embeds=emb, position_ids=pos, use_cache=False).last_hidden_state[:, L - 1:]
    if n < T:
        h = torch.cat([h, h.new_zeros(G, T - n, h.shape[-1])], 1)
    return h


def completion_logprobs(model, prompt: PromptEmbeds, tokens: torch.Tensor,
                        lengths: torch.Tensor | None = None, *, share_prompt: bool = True) -> torch.Tensor:
    """[G, T] float32 log p(tokens) by teacher forcing (0 past each row's length if given).

    The plain LM head + log-softmax; the trainer's fused kernel takes
    ``completion_hidden_states`` instead of materialising [G, T, V] logits.
    """
    h = completion_hidden_states(model, prompt, tokens, lengths, share_prompt=share_prompt)
    logits = lm_head(model)(h).float()
    lp = (logits.gather(-1, tokens[..., None]).squeeze(-1) - torch.logsumexp(logits, -1))
    if lengths is not None:
        t = torch.arange(tokens.shape[1], device=tokens.device)
        lp = torch.where(t[None, :] < lengths[:, None], lp, torch.zeros_like(lp))
    return lp
