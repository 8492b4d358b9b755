"""GSPO rollouts: G sampled continuations of one prompt, with the vision encoder and the prompt
prefill run once (``model.generate(num_return_sequences=G)`` prefills the prompt, thousands of
vision tokens, G times).

``generate_group``: the prompt is prefilled once (batch 1) into a ``DynamicCache``, whose K/V
are then copied (broadcast) into the first L slots of a preallocated ``StaticCache`` of batch
G. The G first tokens are sampled independently from the prefill's last logits, then
``decode_step`` advances all G rows one token at a time with static shapes (finished rows are
fed the pad token and masked out of the results), so on GPU it can be wrapped in
``torch.compile(mode="reduce-overhead")`` (CUDA graphs): ``compile_decode=True``.

Cache. A ``StaticCache`` rather than a ``DynamicCache`` repeated G times: fixed addresses and
shapes (the length counter is a tensor), so the decode step is capturable, and no
reallocation per token. Its length is L + max_new_tokens rounded up to 128 (few distinct
shapes to compile); attention runs over the whole buffer with the causal mask hiding the
unfilled slots (flash-attention, which cannot take that mask, gets an explicit [G, length]
mask of filled slots). The copy of the prompt's K/V to the G rows costs G x L x layers of
memory traffic, negligible next to the prefill it replaces; sharing one prefix across rows
would need a custom attention kernel.

Positions. Text tokens after the prompt get position ``last prompt position + 1 + t`` in all
three M-RoPE sections (``cache_position + rope_deltas``), as transformers' generation does
(``_update_model_kwargs_for_generation`` increments the last position ids). They are
precomputed for all steps, so a decode step never recomputes the prompt's M-RoPE index.

Host syncs. None per token except the "all rows finished?" check, done every
``check_every`` steps (default: every step on CPU, where a sync is free; every 8 on GPU;
0 = never, always run ``max_new_tokens`` steps), plus one at the end to trim the result.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from visioncoach.models.access import eval_mode, hf_model, language_model, lm_head
from visioncoach.rollout.prompt import PromptEmbeds, VisionFeatures, encode_vision, prefill, prompt_embeds
from visioncoach.rollout.sampling import sample_tokens

__all__ = ["RolloutGroup", "decode_step", "generate_group"]

# Static-cache lengths are rounded up to this, so CUDA graphs are recorded for few shapes.
_CACHE_BUCKET = 128


@dataclass
@dataclass
class RolloutGroup:
    """G continuations of one prompt."""
    tokens: torch.Tensor      # [G, T] int64, pad after a row's EOS; T = longest completion
    logprobs: torch.Tensor | None   # [G, T] float32 log p(token) under the model (0 at padding);
                                    # None when generated with ``logprobs=False``
    lengths: torch.Tensor     # [G] int64, number of completion tokens including the EOS
    finished: torch.Tensor    # [G] bool, True where the row ended with an EOS token
    prompt_length: int
    vision: VisionFeatures | None   # None when ``prompt=`` was passed in
    prompt: PromptEmbeds
    steps: int                # decode iterations run (>= T; < T + check_every)

    @property
    def mask(self) -> torch.Tensor:
        """[G, T] bool, True for completion tokens (EOS included), False for padding."""
        t = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        return t[None, :] < self.lengths[:, None]



def decode_step(model, cache, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One token for every row: input_ids [G], position_ids [3, G, 1] -> float32 logits [G, V].

    Static shapes throughout (``cache`` is a ``StaticCache``; its length counter is a tensor),
    so this is what ``torch.compile(mode="reduce-overhead")`` captures on GPU.
    ``attention_mask`` [G, max_cache_len] (1 = filled slot) is only needed by attention
    kernels that cannot take the causal offset alone (flash-attention with a static cache).
    """
    lm = language_model(model)
    embeds = lm.embed_tokens(input_ids[:, None])
    out = lm(inputs_embeds=embeds, position_ids=position_ids, past_key_values=cache,
             attention_mask=attention_mask, use_cache=True)
    return lm_head(model)(out.last_hidden_state[:, -1]).float()


_COMPILED_DECODE = None
_CACHE_POOL: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _compiled_decode_step():
    global _COMPILED_DECODE
    if _COMPILED_DECODE is None:
        _COMPILED_DECODE = torch.compile(decode_step, mode="reduce-overhead", dynamic=False)
    return _COMPILED_DECODE


def _group_cache(model, rows: int, min_len: int, dtype, device, reuse: bool):
    """A ``StaticCache`` of ``rows`` rows, length ``min_len`` rounded up to a bucket.

    ``reuse``: keep one per model and hand it back zeroed when the shape matches, so the
    captured CUDA graphs see the same cache addresses from call to call.
    """
    from transformers import StaticCache

    max_len = -(-min_len // _CACHE_BUCKET) * _CACHE_BUCKET
    key = (rows, max_len, dtype, str(device))
    if reuse:
        held = _CACHE_POOL.get(model)
        if held is not None and held[0] == key:
            held[1].reset()
            return held[1]
    cfg = language_model(model).config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cache = StaticCache(config=hf_model(model).config, max_cache_len=max_len)
    cache.early_initialization(rows, cfg.num_key_value_heads, head_dim, dtype, device)
    if reuse:
        _CACHE_POOL[model] = (key, cache)
    return cache


def _fill_prefix(cache, prefix, length: int) -> None:
    """Copy a batch-1 ``DynamicCache`` of ``length`` tokens into every row of ``cache``."""
    for dst, src in zip(cache.layers, prefix.layers, strict=True):
        dst.keys[:, :, :length].copy_(src.keys)    # broadcast over the G rows
        dst.values[:, :, :length].copy_(src.values)
        dst.cumulative_length.fill_(length)



def generate_group(model, inputs, G: int, *, max_new_tokens: int, temperature: float = 1.0,
                   top_p: float = 0.95, eos_token_ids: Iterable[int] | int | None = (),
                   pad_token_id: int, generator: torch.Generator | None = None,
                   greedy: bool = False, vision: VisionFeatures | None = None,
                   prompt: PromptEmbeds | None = None, top_p_method: str = "auto",
                   check_every: int | None = None, compile_decode: bool = False,
                   kv_mask: bool | None = None, logprobs: bool = True) -> RolloutGroup:
    """G continuations of one prompt, with one vision-encoder pass and one prompt prefill.

    inputs: ``ModelInputs`` (or its tensors) of one prompt; only ``input_ids`` and the grids
        are read when ``vision`` is given, nothing when ``prompt`` is given.
    vision / prompt: precomputed ``encode_vision`` / ``prompt_embeds`` results to reuse
        (zero vision-tower calls).
    eos_token_ids: a row stops at the first of these (included in its length); empty or
        None: no stop token (every row gets ``max_new_tokens``).
    greedy: argmax decoding (temperature, top_p and generator ignored).
    check_every: steps between "all rows finished?" checks (host syncs); None = 1 on CPU,
        8 on GPU; 0 = never check.
    compile_decode: wrap ``decode_step`` in ``torch.compile(mode="reduce-overhead")`` (CUDA
        graphs); only when the model is on CUDA, ignored elsewhere.
    kv_mask: feed ``decode_step`` an explicit [G, cache length] mask of filled slots; None =
        only for flash-attention implementations.
    logprobs: record the chosen tokens' log-probs (``RolloutGroup.logprobs``; GSPO's old-policy
        log-probs). False (prediction, judges): ``RolloutGroup.logprobs`` is None and a greedy
        step computes no log-softmax over the vocabulary; the tokens are the same.
    """
    if G < 1 or max_new_tokens < 1:
        raise ValueError(f"need G >= 1 and max_new_tokens >= 1, got G={G}, max_new_tokens={max_new_tokens}")
    if isinstance(eos_token_ids, int):
        eos_token_ids = [eos_token_ids]
    eos_list = sorted(set(eos_token_ids or ()))
    with torch.no_grad(), eval_mode(model):
        if prompt is None:
            if vision is None:
                vision = encode_vision(model, inputs)
            prompt = prompt_embeds(model, inputs, vision)
        embeds = prompt.inputs_embeds
        device, L = embeds.device, prompt.length
        on_cuda = device.type == "cuda"
        if check_every is None:
            check_every = 8 if on_cuda else 1
        use_compile = compile_decode and on_cuda
        step_fn = _compiled_decode_step() if use_compile else decode_step
        if kv_mask is None:
            kv_mask = "flash" in str(hf_model(model).config._attn_implementation)
        sample = dict(temperature=temperature, top_p=top_p, generator=generator, greedy=greedy,
                      top_p_method=top_p_method, logprobs=logprobs)

        # Prefill once (batch 1), then give each of the G rows a copy of the prompt's K/V.
        prefix, h_last = prefill(model, prompt)
        first_logits = lm_head(model)(h_last[:, -1]).float()          # [1, V]
        cache = None
        if max_new_tokens > 1:
            cache = _group_cache(model, G, L + max_new_tokens, embeds.dtype, device, reuse=use_compile)
            _fill_prefix(cache, prefix, L)
        del prefix
        mask = None
        if kv_mask and cache is not None:
            mask = torch.zeros(G, cache.get_max_length(), dtype=torch.long, device=device)
            mask[:, :L] = 1

        positions = prompt.completion_positions(max_new_tokens)        # [3, N]
        tokens = torch.full((G, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        token_logprobs = (torch.zeros(G, max_new_tokens, dtype=torch.float32, device=device)
                          if logprobs else None)
        lengths = torch.zeros(G, dtype=torch.long, device=device)
        finished = torch.zeros(G, dtype=torch.bool, device=device)
        eos = torch.tensor(eos_list, dtype=torch.long, device=device) if eos_list else None
        pad = torch.tensor(pad_token_id, dtype=torch.long, device=device)

        tok, lp = sample_tokens(first_logits.expand(G, -1), **sample)  # G independent draws
        steps = 0
        for t in range(max_new_tokens):
            alive = ~finished
            tok = torch.where(alive, tok, pad)
            tokens[:, t] = tok
            if token_logprobs is not None:
                token_logprobs[:, t] = torch.where(alive, lp, 0.0)
            lengths += alive
            if eos is not None:
                finished = finished | torch.isin(tok, eos)
            steps = t + 1
            if t + 1 == max_new_tokens:
                break
            if check_every and steps % check_every == 0 and bool(finished.all()):
                break
            if mask is not None:
                mask[:, L + t] = 1
            if use_compile:
                torch.compiler.cudagraph_mark_step_begin()
            pos = positions[:, t].view(3, 1, 1).expand(3, G, 1)
            logits = step_fn(model, cache, tok, pos, mask)
            tok, lp = sample_tokens(logits, **sample)

        T = int(lengths.max())
        kept_logprobs = token_logprobs[:, :T].contiguous() if token_logprobs is not None else None
        return RolloutGroup(tokens=tokens[:, :T].contiguous(), logprobs=kept_logprobs,
                            lengths=lengths, finished=finished, prompt_length=L, vision=vision,
                            prompt=prompt, steps=steps)
