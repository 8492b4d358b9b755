"""Token sampling for rollouts: temperature, top-p and one inverse-CDF draw per row.

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
"""

from __future__ import annotations

import torch

__all__ = ["sample_tokens", "top_p_mask"]

# Rows per block of the radix top-p select.
_RADIX_ROWS = 64


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
                  top_p_method: str = "auto", logprobs: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One token per row of ``logits`` [B, V] -> (tokens [B] int64, log p(token) [B] float32).

    Greedy: argmax (as transformers). Otherwise temperature, top-p, and one inverse-CDF draw
    per row with ``generator`` (on the logits' device; None = the global RNG). The log-probs
    are the model's (log-softmax of the raw logits), whatever the temperature and top-p.
    ``logprobs=False``: the second element is None and, when greedy, nothing but the argmax
    touches the vocabulary (prediction never reads the log-probs; the full-vocabulary
    logsumexp was 8% of a greedy step of the tiny model on a quiet 2-core CPU, far more when
    its second thread waits for a busy core: bench/bench_greedy.py). Sampling needs the
    softmax anyway, so there it only skips the final gather / logsumexp.
    """
    logits = logits.float()
    if greedy:
        tokens = logits.argmax(-1)
        return tokens, (_token_logprobs(logits, tokens) if logprobs else None)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    probs = (logits if temperature == 1.0 else logits / temperature).softmax(-1)
    weights = probs
    if top_p < 1.0:
        keep = _nucleus(probs, top_p, top_p_method)
        # (a 0-dim tensor: where() with a Python scalar is several times slower on CPU)
        weights = torch.where(keep, probs, probs.new_zeros(()))
    tokens = _inverse_cdf(weights, generator)
    if not logprobs:
        return tokens, None
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
