"""Batched ROUGE: the free-form r_acc (mean of ROUGE-1, ROUGE-2 and ROUGE-L F1 with Porter
stemming) of many (prediction, target) pairs at once, equal bit for bit to
``reference.rouge`` (``rouge_score``'s ``RougeScorer(["rouge1", "rouge2", "rougeL"],
use_stemmer=True)``), which stays the specification.

Where the reference's time goes, per pair: tokenizing both texts (a Porter stem of every
token longer than 3 characters, ~10 us each), two ``Counter`` intersections, and an
O(len x len) LCS table filled in Python. Here:

* Tokens: rouge_score's rule exactly (lowercase, every run of characters outside [a-z0-9]
  is a separator, tokens longer than 3 characters stemmed by nltk's ``PorterStemmer()`` in
  its default mode, as ``rouge_score.tokenizers.DefaultTokenizer`` builds it, then tokens
  that are not ``^[a-z0-9]+$`` dropped), with each raw token's outcome memoised (the
  stemmer is a pure function of the token and a vocabulary is small) and each distinct text
  tokenized once per call.
* ROUGE-1/2 overlaps: one vectorised pass over all pairs: every (pair, n-gram) is a key,
  counted per side (bincounts into a dense [pairs, grams] table when that is small, else the
  keys numbered by one sort), and the minimum of the two counts summed per pair.
* ROUGE-L: the LCS length by the bit-parallel algorithm (Allison-Dix / Hyyrö: one
  add-and-or on a bit vector over the shorter side per token of the longer side), run for
  all pairs at once on uint64 words when the shorter side has at most 64 tokens (answers
  are short), on Python big ints pair by pair otherwise, instead of a Python loop over the
  LCS table's cells.
* F-measures: the same float64 operations in the same order as rouge_score
  (``p = hits / max(count, 1)``, ``2 * p * r / (p + r)``, ``(f1 + f2 + fL) / 3``) on the same
  integers, so the results are identical, not merely close.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import chain, repeat

import numpy as np
import torch

__all__ = ["rouge_batch", "tokenize"]

# rouge_score/tokenize.py lowercases, turns every run outside [a-z0-9] into a space and
# splits on whitespace: the raw tokens are exactly the maximal [a-z0-9] runs of the lowercased
# text.
_RAW_TOKEN = re.compile(r"[a-z0-9]+")
_VALID_TOKEN = re.compile(r"^[a-z0-9]+$")

# Raw token -> its final token (stemmed when longer than 3 characters), or None when the
# reference drops it. Cleared when it grows past this many entries (a bound on memory when
# models emit endless novel strings; refilling costs one stem per token).
_MEMO_LIMIT = 1 << 18
_token_memo: dict[str, str | None] = {}
# n-gram counts are dense [pairs, grams] tables while those have at most this many cells per
# counted gram, else sorted keys.
_DENSE_PER_GRAM = 8
# Longest side (tokens) of a pair whose LCS runs on the uint64 path.
_WORD_PATH_MAX_LONG = 1024
# (pair, bigram) keys are pair * vocab**2 + a * vocab + b while they stay below this.
_KEY_LIMIT = 1 << 62
_stemmer = None

try:  # csrc/rewards.cpp; absent where the extension is not built (or built before it)
    from visioncoach import ops as _ops  # noqa: F401  (loads _C)
    _native_op = torch.ops.visioncoach.rouge_from_ids
except (ImportError, AttributeError, RuntimeError):
    _native_op = None


def _final_token(raw: str) -> str | None:
    global _stemmer
    if _stemmer is None:
        # rouge_score.tokenizers.DefaultTokenizer(use_stemmer=True): PorterStemmer() in nltk's
        # default mode (NLTK_EXTENSIONS), not ORIGINAL_ALGORITHM; they stem some words apart.
        from nltk.stem import porter
        _stemmer = porter.PorterStemmer()
    token = _stemmer.stem(raw) if len(raw) > 3 else raw
    token = token if _VALID_TOKEN.match(token) else None
    if len(_token_memo) >= _MEMO_LIMIT:
        _token_memo.clear()
    _token_memo[raw] = token
    return token


def tokenize(text: str) -> list[str]:
    """rouge_score's tokens of ``text`` with stemming (``rouge_score.tokenize.tokenize``)."""
    memo = _token_memo
    out = []
    for raw in _RAW_TOKEN.findall(text.lower()):
        token = memo[raw] if raw in memo else _final_token(raw)
        if token is not None:
            out.append(token)
    return out


def _lcs_length(prediction: list[int], target: list[int]) -> int:
    """Length of a longest common subsequence, bit-parallel (Hyyrö 2004, Allison-Dix).

    Bit j of ``v`` is 1 where row i of the LCS table does not step up at column j; for each
    target token the positions where it occurs in the prediction (``match``) update it with
    one add (the carries move the step-ups right) and an or, and the LCS length is the
    number of zero bits among the prediction's ``len(prediction)`` bits at the end.
    """
    match: dict[int, int] = {}
    for j, tok in enumerate(prediction):
        match[tok] = match.get(tok, 0) | (1 << j)
    width = (1 << len(prediction)) - 1
    v = width
    for tok in target:
        m = match.get(tok)
        if m is not None:
            u = v & m
            v = ((v + u) | (v - u)) & width
    return len(prediction) - v.bit_count()


def _overlaps(pred_grams: np.ndarray, pred_pair: np.ndarray, tgt_grams: np.ndarray, tgt_pair: np.ndarray,
              n_pairs: int, n_grams: int) -> np.ndarray:
    """[n_pairs] float64: sum over the distinct grams g of min(count in prediction, count in
    target), each side's grams given flat as ids < ``n_grams`` with their pair ``*_pair``."""
    if pred_grams.size == 0 or tgt_grams.size == 0:
        return np.zeros(n_pairs)
    pred_keys = pred_pair * n_grams + pred_grams
    tgt_keys = tgt_pair * n_grams + tgt_grams
    if n_pairs * n_grams <= _DENSE_PER_GRAM * (pred_keys.size + tgt_keys.size):
        # a [pairs, grams] count table per side: two bincounts, no sort (worth it while the
        # table is not much larger than the grams themselves)
        size = n_pairs * n_grams
        hits = np.minimum(np.bincount(pred_keys, minlength=size),
                          np.bincount(tgt_keys, minlength=size)).reshape(n_pairs, n_grams).sum(1)
        return hits.astype(np.float64)
    # Sparse: the (pair, gram) keys present on either side, numbered by one sort.
    keys, at = np.unique(np.concatenate([pred_keys, tgt_keys]), return_inverse=True)
    at = at.reshape(-1)
    hits = np.minimum(np.bincount(at[:pred_keys.size], minlength=keys.size),
                      np.bincount(at[pred_keys.size:], minlength=keys.size))
    # integer counts as float64 weights: exact below 2**53
    return np.bincount(keys // n_grams, weights=hits, minlength=n_pairs)


def _lcs_lengths(pred_tokens: list[list[int]], tgt_tokens: list[list[int]], n_ids: int) -> np.ndarray:
    """[N] int64 LCS lengths of the pairs (token ids < ``n_ids``): the bit-parallel update of
    ``_lcs_length`` run for all pairs at once on uint64 words where the shorter side of a pair
    has at most 64 tokens (the LCS is symmetric, so that side is the bit vector) and the other
    at most ``_WORD_PATH_MAX_LONG``, one Python big-int loop per pair otherwise."""
    n = len(pred_tokens)
    short, long_ = [], []
    for p, t in zip(pred_tokens, tgt_tokens):
        if len(p) <= len(t):
            short.append(p)
            long_.append(t)
        else:
            short.append(t)
            long_.append(p)
    short_len = np.fromiter(map(len, short), dtype=np.int64, count=n)
    long_len = np.fromiter(map(len, long_), dtype=np.int64, count=n)
    out = np.zeros(n, dtype=np.int64)
    # The word path's [longest long side, pairs] match table and step loop are bounded by
    # sending pairs with a very long side to the per-pair loop too.
    in_words = (short_len > 0) & (short_len <= 64) & (long_len <= _WORD_PATH_MAX_LONG)
    for i in np.flatnonzero(~in_words & (short_len > 0)).tolist():
        out[i] = _lcs_length(short[i], long_[i])
    words = np.flatnonzero(in_words)
    if words.size == 0:
        return out
    # Longest first, so the pairs still running at long position i are a prefix [:active[i]].
    order = words[np.argsort(-long_len[words], kind="stable")]
    k = order.size
    s_len, l_len = short_len[order], long_len[order]
    slot = np.arange(k, dtype=np.int64)
    order_list = order.tolist()
    s_tok = np.fromiter(chain.from_iterable(short[i] for i in order_list), dtype=np.int64,
                        count=int(s_len.sum()))
    l_tok = np.fromiter(chain.from_iterable(long_[i] for i in order_list), dtype=np.int64,
                        count=int(l_len.sum()))
    s_slot, l_slot = np.repeat(slot, s_len), np.repeat(slot, l_len)
    starts = np.cumsum(s_len) - s_len
    s_bit = np.left_shift(np.uint64(1), (np.arange(s_tok.size) - np.repeat(starts, s_len)).astype(np.uint64))
    # Match words: for each (pair, token) of the short side, the OR (a sum: distinct bits) of
    # the bits where it occurs; looked up for each token of the long side.
    s_key = s_slot * n_ids + s_tok
    by_key = np.argsort(s_key, kind="stable")
    s_key = s_key[by_key]
    first = np.flatnonzero(np.r_[True, s_key[1:] != s_key[:-1]])
    keys, masks = s_key[first], np.add.reduceat(s_bit[by_key], first)
    l_key = l_slot * n_ids + l_tok
    at = np.minimum(np.searchsorted(keys, l_key), keys.size - 1)
    l_mask = np.where(keys[at] == l_key, masks[at], np.uint64(0))
    l_pos = np.arange(l_tok.size) - np.repeat(np.cumsum(l_len) - l_len, l_len)
    n_steps = int(l_len[0])
    match = np.zeros((n_steps, k), dtype=np.uint64)                  # [long position, pair]
    match[l_pos, l_slot] = l_mask
    width = np.right_shift(np.uint64(0xFFFFFFFFFFFFFFFF), (64 - s_len).astype(np.uint64))
    active = k - np.cumsum(np.bincount(l_len, minlength=n_steps + 1))[:n_steps]
    v = width.copy()
    for i, a in enumerate(active.tolist()):
        vi = v[:a]
        u = vi & match[i, :a]
        # uint64 addition wraps: the carry out of bit 63 is dropped, as the width mask would
        v[:a] = ((vi + u) | (vi - u)) & width[:a]
    out[order] = s_len - np.bitwise_count(v)
    return out


def _fmeasure(hits: np.ndarray, pred_count: np.ndarray, tgt_count: np.ndarray) -> np.ndarray:
    """rouge_score's F: p = hits / max(pred, 1), r = hits / max(target, 1),
    2 * p * r / (p + r), 0 where p + r == 0 (same operations, same order)."""
    p = hits / np.maximum(pred_count, 1)
    r = hits / np.maximum(tgt_count, 1)
    denom = p + r
    with np.errstate(invalid="ignore", divide="ignore"):
        f = 2 * p * r / denom
    return np.where(denom > 0, f, 0.0)


def rouge_batch(predictions: Sequence[str], targets: Sequence[str], *, native: bool = True) -> np.ndarray:
    """[N] float64: ``reference.rouge(predictions[i], targets[i])`` for every i, bit for bit.

    Each distinct text is tokenized once; N = 0 gives an empty array. The counting (n-gram
    overlaps, LCS, F-measures) runs in the C++ op ``rouge_from_ids`` (csrc/rewards.cpp) when
    the extension has it and ``native`` is True, else in the numpy code below: the same
    integers and the same float64 operations, so the same results (the op is ~10x faster
    than the ~40 numpy calls, which dominate at a few hundred short pairs).
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets")
    for name, texts in (("prediction", predictions), ("target", targets)):
        if not all(map(isinstance, texts, repeat(str))):
            i, t = next((i, t) for i, t in enumerate(texts) if not isinstance(t, str))
            raise TypeError(f"{name} {i} must be a str, got {type(t).__name__}")
    n = len(predictions)
    if n == 0:
        return np.zeros(0)

    # Dense ids per call of the final tokens, looked up by raw token (-1: dropped), and each
    # distinct text's id list once.
    vocab: dict[str, int] = {}
    raw_ids: dict[str, int] = {}
    text_ids: dict[str, list[int]] = {}
    memo = _token_memo

    def new_raw(raw: str) -> int:
        token = memo[raw] if raw in memo else _final_token(raw)
        i = raw_ids[raw] = -1 if token is None else vocab.setdefault(token, len(vocab))
        return i

    def ids_of(text: str) -> list[int]:
        got = text_ids.get(text)
        if got is None:
            raws = _RAW_TOKEN.findall(text.lower())
            got = list(map(raw_ids.get, raws))
            if None in got:
                got = [new_raw(r) if i is None else i for r, i in zip(raws, got)]
            if -1 in got:
                got = [i for i in got if i >= 0]
            text_ids[text] = got
        return got

    pred_tokens = [ids_of(t) for t in predictions]
    tgt_tokens = [ids_of(t) for t in targets]
    pred_len = np.fromiter(map(len, pred_tokens), dtype=np.int64, count=n)
    tgt_len = np.fromiter(map(len, tgt_tokens), dtype=np.int64, count=n)
    pred_flat = np.fromiter(chain.from_iterable(pred_tokens), dtype=np.int64, count=int(pred_len.sum()))
    tgt_flat = np.fromiter(chain.from_iterable(tgt_tokens), dtype=np.int64, count=int(tgt_len.sum()))
    if native and _native_op is not None:
        return _native_op(*map(torch.from_numpy, (pred_flat, pred_len, tgt_flat, tgt_len))).numpy()
    lcs = _lcs_lengths(pred_tokens, tgt_tokens, max(len(vocab), 1)).astype(np.float64)

    pairs = np.arange(n, dtype=np.int64)
    pred_pair = np.repeat(pairs, pred_len)
    tgt_pair = np.repeat(pairs, tgt_len)

    v = max(len(vocab), 1)
    f1 = _fmeasure(_overlaps(pred_flat, pred_pair, tgt_flat, tgt_pair, n, v), pred_len, tgt_len)

    # Bigrams: consecutive tokens of one text, as ids a * v + b (renumbered densely only when
    # pairs x v**2 could overflow the int64 keys).
    pred_next = pred_pair[1:] == pred_pair[:-1]
    tgt_next = tgt_pair[1:] == tgt_pair[:-1]
    pred_bi = pred_flat[:-1][pred_next] * v + pred_flat[1:][pred_next]
    tgt_bi = tgt_flat[:-1][tgt_next] * v + tgt_flat[1:][tgt_next]
    n_bigrams = v * v
    if n * n_bigrams >= _KEY_LIMIT:
        _, bi = np.unique(np.concatenate([pred_bi, tgt_bi]), return_inverse=True)
        bi = bi.reshape(-1)
        pred_bi, tgt_bi, n_bigrams = bi[:pred_bi.size], bi[pred_bi.size:], max(bi.size, 1)
    f2 = _fmeasure(_overlaps(pred_bi, pred_pair[:-1][pred_next], tgt_bi, tgt_pair[:-1][tgt_next], n,
                             n_bigrams),
                   np.maximum(pred_len - 1, 0), np.maximum(tgt_len - 1, 0))

    # ROUGE-L: rouge_score returns F = 0 when either side has no token (lcs = 0 there too).
    fl = _fmeasure(lcs, pred_len, tgt_len)
    return (f1 + f2 + fl) / 3.0
