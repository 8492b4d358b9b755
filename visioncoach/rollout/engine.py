"""GSPO rollout engine for Qwen2.5-VL: one prompt, G sampled continuations.

``model.generate(num_return_sequences=G)`` prefills the prompt (thousands of vision tokens)
G times, once per continuation (transformers 5.23 already runs the vision tower once and
repeats its output; older versions ran it G times too). Here each stage runs as often as it
must:

1. ``encode_vision``: the vision tower, once per distinct visual input (pass the result as
   ``vision=`` to reuse it for another prompt on the same frames, or for later passes).
2. ``prompt_embeds``: token embeddings with the visual features scattered into the vision
   placeholders (as ``Qwen2_5_VLModel.forward`` does) and the M-RoPE position ids from the
   model's ``get_rope_index``. Every later pass over prompt + completion (rollout, old-policy
   and reference log-probs) calls the language model with these ``inputs_embeds`` and
   ``position_ids`` and never runs the vision tower again.
3. ``generate_group``: the prompt is prefilled once (batch 1) into a ``DynamicCache``, whose
   K/V are then copied (broadcast) into the first L slots of a preallocated ``StaticCache``
   of batch G. The G first tokens are sampled independently from the prefill's last logits,
   then ``decode_step`` advances all G rows one token at a time with static shapes (finished
   rows are fed the pad token and masked out of the results), so on GPU it can be wrapped in
   ``torch.compile(mode="reduce-overhead")`` (CUDA graphs): ``compile_decode=True``.
4. ``completion_hidden_states``: the teacher-forced pass for the trainer (final hidden states
   of the completion positions, for the fused LM-head log-prob kernel); by default the
   prompt is run once and its KV cache repeated to the G rows.

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

Sampling. Temperature, then top-p with ``TopPLogitsWarper`` semantics (the smallest set of
most likely tokens whose mass is >= top_p, at least one token), then one inverse-CDF draw per
row from a ``torch.Generator``. Masses are accumulated in float64 (transformers accumulates
float32 from the least likely token up and compares with 1 - top_p: boundary tokens can
differ by rounding, and a tiny top_p rounds away). Two implementations of the mask: ``sort``
(a full sort) and ``radix`` (a three-round radix select of the threshold over the float32
probability bits with mass-weighted histograms: no sort, static shapes, no host sync).
``auto`` picks ``sort`` on CUDA (a fast, deterministic radix sort there) and ``radix`` on CPU
for large vocabularies, where ``torch.sort`` of a 151,936-entry row costs ~20 ms and
dominates transformers' sampling steps. ``RolloutGroup.logprobs`` are the model's own
log-probs of the chosen tokens (log-softmax of the raw logits, before temperature / top-p):
the old-policy log-probs of GSPO.

Host syncs. None per token except the "all rows finished?" check, done every
``check_every`` steps (default: every step on CPU, where a sync is free; every 8 on GPU;
0 = never, always run ``max_new_tokens`` steps), plus one at the end to trim the result.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

__all__ = [
    "CallCounter", "PromptEmbeds", "RolloutGroup", "VisionFeatures", "completion_hidden_states",
    "completion_logprobs", "decode_step", "encode_vision", "generate_group", "prompt_embeds",
    "sample_tokens", "top_p_mask",
]

# Static-cache lengths are rounded up to this, so CUDA graphs are recorded for few shapes.
_CACHE_BUCKET = 128
# Rows per block of the radix top-p select.
_RADIX_ROWS = 64


# ----------------------------------------------------------------------------- data types

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


@dataclass
class RolloutGroup:
    """G continuations of one prompt."""
    tokens: torch.Tensor      # [G, T] int64, pad after a row's EOS; T = longest completion
    logprobs: torch.Tensor    # [G, T] float32 log p(token) under the model (0 at padding)
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


class CallCounter:
    """Counts forward calls of a module (e.g. ``model.model.visual``) with a forward pre-hook.

    ``rows`` sums the batch size of the counted calls; ``min_seq`` counts only calls whose
    input sequence (dim 1 of ``inputs_embeds``) is at least that long, e.g. ``min_seq=2`` on the
    language model counts prefills and not decode steps.

        with CallCounter(model.model.visual) as vision: ...
        vision.calls
    """

    def __init__(self, module: torch.nn.Module, min_seq: int | None = None):
        self.module, self.min_seq = module, min_seq
        self.calls = self.rows = 0
        self._handle = None

    def _hook(self, module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        if x is None:
            x = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if self.min_seq is not None:
            if x is None or x.dim() < 3 or x.shape[1] < self.min_seq:
                return
        self.calls += 1
        self.rows += int(x.shape[0]) if x is not None and x.dim() >= 2 else 1

    def __enter__(self) -> "CallCounter":
        self._handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


# ----------------------------------------------------------------------------- model access

def _unwrap(model):
    """The ``Qwen2_5_VLForConditionalGeneration`` inside a PEFT wrapper (LoRA layers stay in)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def _base(model):
    """``Qwen2_5_VLModel`` (has ``visual``, ``language_model``, ``get_rope_index``)."""
    model = _unwrap(model)
    return model.model if hasattr(model, "lm_head") else model


def _language_model(model):
    return _base(model).language_model


def _lm_head(model):
    return _unwrap(model).lm_head


def _tensors(inputs) -> Mapping[str, torch.Tensor]:
    t = inputs.tensors if hasattr(inputs, "tensors") else inputs
    if t["input_ids"].shape[0] != 1:
        raise ValueError(f"one prompt per call (batch 1), got input_ids {tuple(t['input_ids'].shape)}")
    return t


@contextlib.contextmanager
def _eval_mode(model):
    """Gradient checkpointing in training mode silently drops the KV cache: decode in eval,
    then give every submodule back its own mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _checkpointing_active(model) -> bool:
    lm = _language_model(model)
    return lm.training and any(getattr(layer, "gradient_checkpointing", False) for layer in lm.layers)


# ----------------------------------------------------------------------------- vision + prompt

def encode_vision(model, inputs) -> VisionFeatures:
    """Run the vision tower (and patch merger) on the prompt's pixels: one call per modality.

    ``inputs``: ``ModelInputs`` or its ``tensors`` dict (batch of one prompt). Runs with
    whatever grad mode the caller has (``generate_group`` calls it under ``no_grad``).
    """
    t = _tensors(inputs)
    base = _base(model)
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
    base = _base(model)
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


# ----------------------------------------------------------------------------- sampling

def top_p_mask(scores: torch.Tensor, top_p: float, *, method: str = "auto") -> torch.Tensor:
    """[B, V] bool: tokens kept by nucleus filtering of ``scores`` (logits after temperature).

    The semantics of transformers' ``TopPLogitsWarper``: the smallest set of most likely
    tokens whose probability mass is >= top_p, i.e. a token is kept iff the mass of the
    tokens more likely than it is < top_p; the most likely token is always kept. Masses are
    accumulated in float64 (transformers accumulates float32 from the least likely token up
    and compares with 1 - top_p, which moves the boundary by a few near-equal tokens and
    rounds a tiny top_p away: 1 - 1e-9 == 1 in float32). ``method``: ``sort`` (a full sort),
    ``radix`` (sort-free radix select, static shapes; see the module docstring) or ``auto``
    (radix on CPU for vocabularies over 8192 tokens, where it is several times faster than
    ``torch.sort``; sort otherwise, e.g. always on CUDA).
    """
    return _nucleus(scores.float().softmax(-1), top_p, method)


def _nucleus(probs: torch.Tensor, top_p: float, method: str) -> torch.Tensor:
    """Top-p mask of probabilities ``probs`` [B, V] (float32, >= 0; rows need not sum to 1)."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if method == "auto":
        method = "radix" if probs.device.type == "cpu" and probs.shape[-1] > 8192 else "sort"
    if method not in ("sort", "radix"):
        raise ValueError(f"top-p method must be auto, sort or radix, got {method!r}")
    if top_p == 1.0:
        return torch.ones_like(probs, dtype=torch.bool)
    if method == "sort":
        sorted_p, order = torch.sort(probs, descending=True)
        cum = sorted_p.cumsum(-1, dtype=torch.float64)
        keep = (cum - sorted_p) < cum[..., -1:] * top_p    # mass of the more likely < top_p
        keep[..., 0] = True
        return torch.zeros_like(keep).scatter_(-1, order, keep)
    probs = probs.contiguous()
    if probs.shape[0] <= _RADIX_ROWS:
        return _top_p_radix(probs, top_p)
    # Row blocks bound the temporaries (a float64 copy and int32 bin ids, ~2 MB a row).
    return torch.cat([_top_p_radix(p, top_p) for p in probs.split(_RADIX_ROWS)])


def _top_p_radix(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus mask by radix select of the threshold probability (no sort, no host sync).

    With B(v) the mass of the tokens whose probability is <= v and T the row's mass, a token
    is kept iff T - B(p) (the mass of the more likely tokens) < top_p * T, i.e.
    B(p) > thr = (1 - top_p) * T: the kept set is {p >= tau}, tau the smallest probability
    with B(tau) > thr. Non-negative float32 values order as their int32 bit patterns, so tau
    is found digit by digit (3 x 10 bits; probabilities < 2 have bit 30 clear) on the bits:
    each round histograms the mass of
    the tokens inside the current prefix by their next digit (tokens outside go to two spare
    bins, ignored) and keeps the first digit whose cumulative mass (plus the mass below the
    prefix) exceeds thr. Masses are summed in float64. Four passes over [B, V] a round at
    most; the histograms are small (1,026 bins a row).
    """
    b = probs.shape[0]
    bits = probs.view(torch.int32)                      # >= 0, monotone in the value
    mass = probs.double()       # float64 sums: a bin can hold most of a flat row's tokens
    row = torch.arange(b, dtype=torch.int32, device=probs.device)[:, None]
    base = torch.zeros(b, 1, dtype=torch.int32, device=probs.device)   # prefix found so far
    below = torch.zeros(b, 1, dtype=torch.float64, device=probs.device)
    thr = None
    for shift in (20, 10, 0):
        nb = 1 << 10
        if thr is None:                                 # first digit: bits 29..20, all tokens
            n, key = nb, (bits >> shift).add_(row * nb)
        else:   # row * n + (0 below the prefix, 1 + digit inside it, nb + 1 above)
            n = nb + 2
            first = row * n
            key = bits - (base - ((first + 1) << shift))
            if shift:
                key = key.bitwise_right_shift_(shift)
            key = key.clamp_(first, first + n - 1)
        hist = _row_histogram(key, mass, b, n)
        if thr is None:
            cum = hist.cumsum(1)
            thr = cum[:, -1:] * (1.0 - top_p)
        else:
            cum = hist[:, 1:-1].cumsum(1)
        # The first digit whose cumulative mass exceeds thr; never past the last non-empty one
        # (rounding), so the most likely token is always kept.
        digit = torch.minimum(torch.searchsorted(cum, thr - below, right=True),
                              torch.searchsorted(cum, cum[:, -1:].contiguous()))
        below = below + torch.where(digit > 0, cum.gather(1, (digit - 1).clamp(min=0)), 0.0)
        base = base + (digit.to(torch.int32) << shift)
    return bits >= base


def _row_histogram(flat_bins: torch.Tensor, weights: torch.Tensor, rows: int, bins: int) -> torch.Tensor:
    """[rows, bins] sums of ``weights`` by bin; ``flat_bins`` int32 = row * bins + bin.

    ``index_add_`` takes the int32 ids as they are (``scatter_add_`` needs an int64 copy of
    the whole [B, V] index) and, unlike ``bincount``, never syncs on CUDA.
    """
    out = weights.new_zeros(rows * bins)
    return out.index_add_(0, flat_bins.reshape(-1), weights.reshape(-1)).view(rows, bins)


def sample_tokens(logits: torch.Tensor, *, temperature: float = 1.0, top_p: float = 1.0,
                  generator: torch.Generator | None = None, greedy: bool = False,
                  top_p_method: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of ``logits`` [B, V] -> (tokens [B] int64, log p(token) [B] float32).

    Greedy: argmax (as transformers). Otherwise temperature, top-p, and one inverse-CDF draw
    per row with ``generator`` (on the logits' device; None = the global RNG). The log-probs
    are the model's (log-softmax of the raw logits), whatever the temperature and top-p.
    """
    logits = logits.float()
    if greedy:
        tokens = logits.argmax(-1)
        return tokens, _token_logprobs(logits, tokens)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    probs = (logits if temperature == 1.0 else logits / temperature).softmax(-1)
    weights = probs
    if top_p < 1.0:
        keep = _nucleus(probs, top_p, top_p_method)
        # (a 0-dim tensor: where() with a Python scalar is several times slower on CPU)
        weights = torch.where(keep, probs, probs.new_zeros(()))
    tokens = _inverse_cdf(weights, generator)
    if temperature == 1.0:   # the softmax already is the model's distribution
        return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1).log()
    return tokens, _token_logprobs(logits, tokens)


def _token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return (logits.gather(-1, tokens[:, None]) - torch.logsumexp(logits, -1, keepdim=True)).squeeze(-1)


def _inverse_cdf(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row from the (unnormalised, non-negative) ``weights`` [B, V]."""
    cdf = weights.cumsum(-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=cdf.device, dtype=cdf.dtype) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))   # strictly below total
    # First index whose cdf exceeds u: its weight is > 0, so a dropped token is never drawn.
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


# ----------------------------------------------------------------------------- decoding

def decode_step(model, cache, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One token for every row: input_ids [G], position_ids [3, G, 1] -> float32 logits [G, V].

    Static shapes throughout (``cache`` is a ``StaticCache``; its length counter is a tensor),
    so this is what ``torch.compile(mode="reduce-overhead")`` captures on GPU.
    ``attention_mask`` [G, max_cache_len] (1 = filled slot) is only needed by attention
    kernels that cannot take the causal offset alone (flash-attention with a static cache).
    """
    lm = _language_model(model)
    embeds = lm.embed_tokens(input_ids[:, None])
    out = lm(inputs_embeds=embeds, position_ids=position_ids, past_key_values=cache,
             attention_mask=attention_mask, use_cache=True)
    return _lm_head(model)(out.last_hidden_state[:, -1]).float()


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
    cfg = _language_model(model).config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cache = StaticCache(config=_unwrap(model).config, max_cache_len=max_len)
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


def _prefill(model, prompt: PromptEmbeds):
    """Run the prompt once: (DynamicCache, last hidden state [1, 1, D])."""
    from transformers import DynamicCache

    lm = _language_model(model)
    cache = DynamicCache(config=lm.config)
    out = lm(inputs_embeds=prompt.inputs_embeds, position_ids=prompt.position_ids,
             past_key_values=cache, use_cache=True)
    return cache, out.last_hidden_state[:, -1:]


def generate_group(model, inputs, G: int, *, max_new_tokens: int, temperature: float = 1.0,
                   top_p: float = 0.95, eos_token_ids: Iterable[int] | int | None = (),
                   pad_token_id: int, generator: torch.Generator | None = None,
                   greedy: bool = False, vision: VisionFeatures | None = None,
                   prompt: PromptEmbeds | None = None, top_p_method: str = "auto",
                   check_every: int | None = None, compile_decode: bool = False,
                   kv_mask: bool | None = None) -> RolloutGroup:
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
    """
    if G < 1 or max_new_tokens < 1:
        raise ValueError(f"need G >= 1 and max_new_tokens >= 1, got G={G}, max_new_tokens={max_new_tokens}")
    if isinstance(eos_token_ids, int):
        eos_token_ids = [eos_token_ids]
    eos_list = sorted(set(eos_token_ids or ()))
    with torch.no_grad(), _eval_mode(model):
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
            kv_mask = "flash" in str(_unwrap(model).config._attn_implementation)
        sample = dict(temperature=temperature, top_p=top_p, generator=generator, greedy=greedy,
                      top_p_method=top_p_method)

        # Prefill once (batch 1), then give each of the G rows a copy of the prompt's K/V.
        prefix, h_last = _prefill(model, prompt)
        first_logits = _lm_head(model)(h_last[:, -1]).float()          # [1, V]
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
        logprobs = torch.zeros(G, max_new_tokens, dtype=torch.float32, device=device)
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
            logprobs[:, t] = torch.where(alive, lp, 0.0)
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
        return RolloutGroup(tokens=tokens[:, :T].contiguous(), logprobs=logprobs[:, :T].contiguous(),
                            lengths=lengths, finished=finished, prompt_length=L, vision=vision,
                            prompt=prompt, steps=steps)


# ----------------------------------------------------------------------------- teacher forcing

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
    lm = _language_model(model)
    L = prompt.length
    comp_pos = prompt.completion_positions(n - 1)[:, None, :].expand(3, G, n - 1)
    comp_emb = lm.embed_tokens(tokens[:, : n - 1])
    if share_prompt and not _checkpointing_active(model):
        cache, h0 = _prefill(model, prompt)
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
    logits = _lm_head(model)(h).float()
    lp = (logits.gather(-1, tokens[..., None]).squeeze(-1) - torch.logsumexp(logits, -1))
    if lengths is not None:
        t = torch.arange(tokens.shape[1], device=tokens.device)
        lp = torch.where(t[None, :] < lengths[:, None], lp, torch.zeros_like(lp))
    return lp
