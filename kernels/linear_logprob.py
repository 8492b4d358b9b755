"""Selected-token log-probabilities of the LM head, without materialising the [N*T, V] logits.

Token t of the flattened batch has the final hidden state h_t [H], the target y_t and the
LM head W [V, H] (rows w_v). With temperature tau the logits and their softmax are

    z_tv = (h_t . w_v) / tau,   lse_t = log sum_v exp(z_tv),   p_tv = exp(z_tv - lse_t)

and this op returns, per token (fp32),

    logp_t    = z_{t,y_t} - lse_t
    entropy_t = lse_t - sum_v p_tv z_tv = -sum_v p_tv log p_tv     (optional, no gradient)

Targets equal to ``IGNORE_INDEX`` (-100) give logp 0, entropy 0 and zero gradient.

Gradients, for an upstream gradient g_t = d loss / d logp_t:

    d logp_t / d h_t = (w_{y_t} - sum_v p_tv w_v) / tau = D_t / tau,   D_t = (onehot_t - p_t) @ W
    d loss / d W     = G^T @ Hid,   G_tv = (g_t / tau) (onehot_tv - p_tv)

E_t = p_t @ W is the "expected embedding" of token t, so D_t = w_{y_t} - E_t. The forward
computes D chunk by chunk (one extra GEMM, (onehot - p_chunk) @ W, while p_chunk is at hand)
and saves only lse [NT] and D [NT, H]; the hidden gradient is then g_t D_t / tau with no
recompute, which is all a frozen LM head (LoRA training) needs: two NT x H x V GEMMs in total.
A trainable head needs G, so its backward recomputes the logits, in column slices of the
vocabulary: with lse saved, p_tv for v in a slice needs only that slice's logits, and the slice
of the weight gradient, G[:, slice]^T @ Hid, is then complete in one GEMM (the reduction runs
over tokens; the torch path sums its row chunks' GEMMs in a [slice, H] fp32 accumulator),
written once in the weight's dtype, with no [V, H] fp32 accumulator. The target column is not
recomputed: G_{t,y_t} = (g_t / tau) (-expm1(logp_t)) from the forward's logp, since
1 - exp(z'_y - lse) on recomputed logits z' (a differently shaped GEMM, a few ulps off) would
lose most digits of 1 - p_y for near-certain tokens.

Memory: the torch path works in [rows, columns] tiles of the logits: a row chunk walks the
vocabulary in slices with a running max (flash-attention's rescaling of the sums and of D's
accumulator), so its one reused fp32 buffer is a tile, 32 MiB by default (``torch_tile``), plus
O(NT H) for D; a trainable head's backward adds [NT, slice] fp32 slices of 2^26 elements. The Triton path works on whole rows: one [chunk, V] fp32 logits buffer of 2^26
elements (256 MiB, see ``default_chunk_size``) and D's GEMM operand beside it, [chunk, V] in W's
dtype (128 MiB in bf16; an fp32 head's no longer overwrites the logits in place: +256 MiB).

Precision: logits, softmax and D in fp32 whatever the input dtype (bf16 products are exact in
fp32). The Triton path on CUDA runs the GEMMs in the weight's dtype with fp32 accumulation and
fp32 output (cuBLAS), so for a bf16 head the u rows and G chunks it multiplies are rounded to
bf16 (to nearest even, NaN kept), as Liger-Kernel's fused linear losses round theirs; the torch
path keeps them fp32. Gradients are returned in the input dtypes.

Implementations:
  * ``linear_logprob_reference``: materialised logits -> log_softmax -> gather; the spec.
  * ``linear_logprob_chunked``: the CPU path, a ``torch.autograd.Function`` over tiles of the
    logits (row chunks x vocabulary slices), all in torch ops, in place on one reused tile.
  * Triton (``torch.ops.visioncoach.linear_logprob``): the GEMMs stay in torch/cuBLAS, and one
    Triton program per row does the fused row work on the chunk's logits in one kernel:
    ``_logprob_fwd_kernel`` (online max/sum-exp/entropy and target gather, and in the same
    pass the rows u of D's GEMM, relative to the target logit, so that D = -r (u @ W) needs
    only a per-row factor r after the GEMM: the logits are read once) and
    ``_grad_logits_kernel`` (G for a vocabulary slice; slices of a multiple of 16 columns, so
    that it moves 16-byte vectors).

DRAM traffic of the Triton forward with D, per 3,072 tokens at Qwen2.5-VL-7B's shapes (H 3,584,
V 152,064, bf16, 441-row chunks), an analytic estimate, not a measurement (README, "LM-head DRAM
traffic"): the 1.87 GB of fp32 logits cost 3.74 GB (GEMM write + one read; 5.61 GB when read
twice), D's bf16 operand 1.87 GB, W's re-reads by both GEMMs of each chunk 15.3 GB (unchanged):
about 21.0 GB in all, 22.8 GB before.
"""

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from visioncoach.kernels._backend import Backend, interpreting, resolve_backend
from visioncoach.kernels._device import store_rounded

__all__ = [
    "IGNORE_INDEX",
    "default_chunk_size",
    "linear_logprob",
    "linear_logprob_chunked",
    "linear_logprob_reference",
    "torch_tile",
]

IGNORE_INDEX = -100

# The Triton path's row chunk: its fp32 logits buffer holds 2^26 elements = 256 MiB, 441 rows at
# V = 151,936 (whole rows: its row kernel makes one pass over a row's logits). Measured with the
# former whole-row torch path on a 2-core Xeon (H=896, 2048 tokens, frozen head, fwd+bwd, CPU
# seconds, best of 3): 128 rows 16.7, 256 rows 15.6, 441 rows 14.1, 512 rows 13.5, 1024 rows 13.1.
_CHUNK_ELEMENTS = 2**26

# The torch path's tile, [rows, columns] of the logits (vocabulary slices with a running max):
# 2,048 x 4,096 fp32 = 32 MiB, the L3 of this project's 2-core EPYC, where the tile's
# elementwise passes then run. fwd+bwd, frozen head, H=896, V=151,936, 2,048 tokens, fp32,
# interleaved with the former 441-row whole-row path, its best of 3 over ours (load 2-4 on
# 2 cores): 2,048 x 2,048 1.08x, 2,048 x 4,096 1.12x, 2,048 x 8,192 1.03x / 1.08x,
# 1,024 x 16,384 1.05x, 512 x 32,768 1.01x; under heavier load (5-7) 2,048 x 2,048 was 0.87x,
# so not smaller.
_TORCH_TILE_ROWS = 2048
_TORCH_TILE_ELEMENTS = 2**23


def default_chunk_size(vocab_size: int) -> int:
    """The Triton path's rows per chunk, so that the chunk's fp32 logits hold about 2^26
    elements (256 MiB), at least 16 rows: 441 for Qwen2.5's V = 151,936."""
    return max(16, _CHUNK_ELEMENTS // max(int(vocab_size), 1))


# --------------------------------------------------------------------------- checks


def _check_inputs(hidden, weight, targets, temperature, chunk_size):
    """Clear errors for bad arguments; the data-dependent target range check is skipped while
    torch.compile traces (it would need a host sync, i.e. a graph break)."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(f"hidden must be a [N, T, H] tensor, got shape "
                         f"{tuple(getattr(hidden, 'shape', ()))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a [V, H] tensor, got shape "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    if weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight has H = {weight.shape[1]} (shape {tuple(weight.shape)}) but "
                         f"hidden has H = {hidden.shape[2]} (shape {tuple(hidden.shape)})")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (V >= 1)")
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise ValueError(f"hidden and weight must be floating point, got {hidden.dtype} and "
                         f"{weight.dtype}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if not isinstance(targets, torch.Tensor) or tuple(targets.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"targets must be a [N, T] = {tuple(hidden.shape[:2])} tensor, got "
                         f"shape {tuple(getattr(targets, 'shape', ()))}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError(f"hidden, weight and targets must be on one device, got "
                         f"{hidden.device}, {weight.device}, {targets.device}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if not torch.compiler.is_compiling() and targets.numel() > 0:
        V = weight.shape[0]
        bad = ((targets < 0) | (targets >= V)) & (targets != IGNORE_INDEX)
        if bool(bad.any()):
            first = targets[bad][0].item()
            raise ValueError(f"targets must lie in [0, V = {V}) or equal the ignore index "
                             f"{IGNORE_INDEX}; got {first}")


# --------------------------------------------------------------------------- reference


def linear_logprob_reference(
    hidden: torch.Tensor,        # [N, T, H]
    weight: torch.Tensor,        # [V, H]
    targets: torch.Tensor,       # [N, T] int, IGNORE_INDEX allowed
    temperature: float = 1.0,
    *,
    return_entropy: bool = False,
):
    """Naive: logits = hidden @ weight.T / tau in fp32 (fp64 when given fp64) -> log_softmax ->
    gather; autograd does the backward. Materialises [N, T, V]: ground truth for small shapes."""
    _check_inputs(hidden, weight, targets, temperature, None)
    cdt = torch.promote_types(hidden.dtype, torch.float32)
    logits = (hidden.to(cdt) @ weight.to(cdt).T) / temperature       # [N, T, V]
    logp_all = torch.log_softmax(logits, dim=-1)                     # [N, T, V]
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, 0).long()
    logp = logp_all.gather(-1, safe[..., None])[..., 0]              # [N, T]
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    with torch.no_grad():
        ent = -(logp_all.exp() * logp_all).sum(-1)
        ent = torch.where(valid, ent, torch.zeros_like(ent))
    return logp, ent


# --------------------------------------------------------------------------- shared helpers


def _mm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (fp32) = a @ b with fp32 accumulation. On CUDA low-precision operands stay in their
    dtype (cuBLAS with fp32 output); on CPU they are upcast (CPU has no mixed-dtype mm)."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.is_cuda and a.dtype == b.dtype:
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.mm(a.float(), b.float(), out=out)


def _mm_weight_operand(weight: torch.Tensor) -> torch.Tensor:
    """The weight as the GEMMs take it: itself on CUDA or in fp32, else upcast once (CPU)."""
    if weight.is_cuda or weight.dtype == torch.float32:
        return weight
    return weight.float()


def _vocab_slice(n_rows: int, vocab: int, chunk_size: int, multiple: int = 1) -> int:
    """Columns per vocabulary slice of the weight-gradient pass: the same element budget as a
    forward chunk (chunk_size x V), spread over all n_rows tokens, rounded down to a multiple
    of ``multiple`` (the Triton path's 16: rows of the slice buffers then start 16-byte aligned
    and the JIT, seeing a row stride divisible by 16, emits 16-byte vector loads and stores;
    21,829 columns at 3,072 tokens compiled to scalar ones)."""
    cols = (chunk_size * vocab) // max(n_rows, 1)
    if cols >= multiple:
        cols -= cols % multiple
    return max(1, min(vocab, cols))


def _flat_view(buf: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous [rows, cols] view at the start of a flat buffer (ragged last slices)."""
    return buf[: rows * cols].view(rows, cols)


# --------------------------------------------------------------------------- chunked torch path


def _entr_rowsum(e: torch.Tensor) -> torch.Tensor:
    """sum_v -e_v log e_v per row, in row blocks so the temporary stays ~8 MB."""
    rows = max(1, 2**21 // max(e.shape[1], 1))
    return torch.cat([torch.special.entr(e[r:r + rows]).sum(1) for r in range(0, e.shape[0], rows)])


def torch_tile(n_rows: int, vocab: int, chunk_size: int | None = None,
               vocab_slice: int | None = None) -> tuple[int, int]:
    """(rows, columns) of the torch path's forward tile, the one [rows, columns] fp32 buffer it
    works in: ``chunk_size`` rows (default 2,048, at most n_rows) and ``vocab_slice``
    columns (default: 2^23 elements, 32 MiB, over the rows; at most V)."""
    rows = max(1, min(chunk_size or _TORCH_TILE_ROWS, n_rows))
    cols = vocab_slice or max(16, _TORCH_TILE_ELEMENTS // rows)
    return rows, max(1, min(cols, vocab))


def _chunked_forward(h2, weight, y, temperature, return_entropy, tile, need_d):
    """Forward in [rows, columns] tiles of the logits, torch ops. h2 [NT, H], y [NT] int64.

    A row chunk walks the vocabulary in slices with a running max m (flash-attention's
    rescaling), on one reused fp32 tile: z = (h/tau) W_s^T; m' = max(m, max_v z);
    alpha = e^(m - m'); z <- e = exp(z - m'), with the target's e set to 0 so that the sums
    run over v != y only:

        sigma <- alpha sigma + sum_v e_v,   acc <- alpha acc + e @ W_s,
        a <- alpha (a + sigma (m - m')) + sum_v e_v (z_v - m')       (entropy only)

    and after the last slice, with e_y = exp(z_y - m) and s = sigma + e_y: lse = m + log s,
    logp = (z_y - m) - log s (as log_softmax forms it: z_y - lse would round lse at |z|'s ulp
    and lose 1 - p_y's digits for a near-certain token), entropy = log s - (a + e_y (z_y - m)) / s
    and D = (onehot - p) @ W = (sigma w_y - acc) / s: the target stays out of the sums, so
    1 - p_y = sigma / s has no cancellation either. z_y is read from the GEMM's own output.
    Returns logp, entropy (or None), lse [NT] fp32, D [NT, H] fp32 (or None).
    """
    NT, H = h2.shape
    V = weight.shape[0]
    dev = h2.device
    hs = h2.float()
    if temperature != 1.0:
        hs = hs * (1.0 / temperature)                                # [NT, H] fp32
    valid = y != IGNORE_INDEX
    y_safe = torch.where(valid, y, 0)                                # [NT]
    lse = torch.empty(NT, dtype=torch.float32, device=dev)
    logp = torch.empty(NT, dtype=torch.float32, device=dev)
    ent = torch.empty(NT, dtype=torch.float32, device=dev) if return_entropy else None
    D = torch.empty(NT, H, dtype=torch.float32, device=dev) if need_d else None
    C, Vs = tile
    buf = torch.empty(C * Vs, dtype=torch.float32, device=dev) if NT > 0 else None
    for r0 in range(0, NT, C):
        r1 = min(r0 + C, NT)
        c = r1 - r0
        h_c = hs[r0:r1]                                              # [c, H]
        y_c = y_safe[r0:r1]                                          # [c]
        # finite start, not -inf: the first slice's sigma (m - m') is then 0 * finite, not nan
        m = torch.full((c,), -3.0e38, dtype=torch.float32, device=dev)
        sigma = torch.zeros(c, dtype=torch.float32, device=dev)
        a = torch.zeros(c, dtype=torch.float32, device=dev)
        z_y = torch.zeros(c, dtype=torch.float32, device=dev)
        acc = D[r0:r1].zero_() if need_d else None                   # [c, H]
        for v0 in range(0, V, Vs):
            v1 = min(v0 + Vs, V)
            W_s = weight[v0:v1].float()                              # [vs, H] (a copy only if bf16)
            z = _flat_view(buf, c, v1 - v0)                          # [c, vs]
            torch.mm(h_c, W_s.T, out=z)
            inside = (y_c >= v0) & (y_c < v1)                        # [c]
            col = (y_c - v0).clamp_(0, v1 - v0 - 1)[:, None]         # [c, 1]
            z_y = torch.where(inside, z.gather(1, col)[:, 0], z_y)
            m_new = torch.maximum(m, z.amax(1))
            alpha = torch.exp(m - m_new)
            z.sub_(m_new[:, None]).exp_()
            z.scatter_(1, col, torch.where(inside[:, None], 0.0, z.gather(1, col)))
            if return_entropy:
                a = alpha * (a + sigma * (m - m_new)) - _entr_rowsum(z)
            sigma = sigma * alpha + z.sum(1)
            if need_d:
                acc.mul_(alpha[:, None]).addmm_(z, W_s)
            m = m_new
        e_y = torch.exp(z_y - m)
        s = sigma + e_y
        log_s = s.log()
        lse[r0:r1] = m + log_s
        logp[r0:r1] = (z_y - m) - log_s
        if return_entropy:
            ent[r0:r1] = log_s - (a + e_y * (z_y - m)) / s
        if need_d:
            w_y = weight[y_c].float()                                # [c, H]
            acc.addcmul_(w_y, sigma[:, None], value=-1.0)                # acc - sigma w_y
            acc.mul_(torch.where(valid[r0:r1], -1.0 / s, 0.0)[:, None])
    zero = torch.zeros((), dtype=torch.float32, device=dev)
    logp = torch.where(valid, logp, zero)
    if return_entropy:
        ent = torch.where(valid, ent, zero)
    return logp, ent, lse, D


def _weight_grad_slice(n_rows: int, vocab: int, vocab_slice: int | None) -> int:
    """Columns per vocabulary slice of the torch path's weight-gradient pass: ``vocab_slice``,
    else the Triton path's element budget, 2^26 (256 MiB), over all n_rows tokens. All tokens at
    once: the [slice, H] gradient is then one GEMM that reduces over every token. (Its own
    budget, not the forward's tile: with 2,048 x 2,048 tiles in both passes the trainable head's
    fwd+bwd ran at 0.86x the former whole-token slices at H=896, V=151,936, 4,096 tokens,
    interleaved under load 6-8; a trainable head holds a [V, H] gradient of that order anyway.)"""
    return max(1, min(vocab, vocab_slice or _CHUNK_ELEMENTS // max(n_rows, 1)))


def _chunked_weight_grad(coef, coef_y, h2, weight, y, lse, temperature, vocab_slice):
    """d loss / d W = G^T @ Hid with G_tv = coef_t (onehot_tv - p_tv), coef_t = g_t [valid] / tau,
    one vocabulary slice at a time: the slice's logits are recomputed, p = exp(z - lse), and the
    target column is set to coef_y = coef (1 - p_y) from the forward's logp."""
    NT = h2.shape[0]
    V = weight.shape[0]
    h32 = h2.float()
    hs = h32 * (1.0 / temperature) if temperature != 1.0 else h32
    grad = torch.empty_like(weight)                                  # [V, H]
    if NT == 0:
        return grad.zero_()
    Vc = _weight_grad_slice(NT, V, vocab_slice)
    buf = torch.empty(NT * Vc, dtype=torch.float32, device=h2.device)
    neg_coef = -coef[:, None]                                        # [NT, 1]
    lse_col = lse[:, None]                                           # [NT, 1]
    rows_all = torch.arange(NT, device=h2.device)
    for v0 in range(0, V, Vc):
        v1 = min(v0 + Vc, V)
        W_s = weight[v0:v1].float()                                  # [vc, H] (a copy only if bf16)
        z = _flat_view(buf, NT, v1 - v0)                             # [NT, vc]
        torch.mm(hs, W_s.T, out=z)
        z.sub_(lse_col).exp_().mul_(neg_coef)                        # -coef p
        inside = (y >= v0) & (y < v1)
        z.index_put_((rows_all[inside], y[inside] - v0), coef_y[inside])
        if grad.dtype == torch.float32:
            torch.mm(z.T, h32, out=grad[v0:v1])
        else:
            grad[v0:v1] = torch.mm(z.T, h32)                         # one rounding, fp32 inside
    return grad


class _LinearLogprobChunked(torch.autograd.Function):
    """Tiled forward saving lse and D; backward g D / tau (+ the vocabulary-sliced W grad)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, return_entropy, tile, vocab_slice,
                need_d):
        N, T, H = hidden.shape
        h2 = hidden.reshape(N * T, H)
        y = targets.reshape(N * T).long()
        logp, ent, lse, D = _chunked_forward(h2, weight, y, temperature, return_entropy, tile,
                                             need_d)
        logp = logp.view(N, T)
        need_w = ctx.needs_input_grad[1]
        ctx.save_for_backward(h2 if need_w else None, weight if need_w else None, y, lse, D,
                              logp if need_w else None)
        ctx.hidden_meta = (hidden.shape, hidden.dtype)
        ctx.temperature = temperature
        ctx.vocab_slice = vocab_slice
        if ent is None:
            return logp
        ent = ent.view(N, T)
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, *_):
        h2, weight, y, lse, D, logp = ctx.saved_tensors
        shape, dtype = ctx.hidden_meta
        g = grad_logp.reshape(-1).float()
        coef = torch.where(y != IGNORE_INDEX, g * (1.0 / ctx.temperature), 0.0)   # [NT]
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_h = (coef[:, None] * D).to(dtype).view(shape)
        if ctx.needs_input_grad[1]:
            coef_y = coef * -torch.expm1(logp.reshape(-1))                         # coef (1 - p_y)
            grad_w = _chunked_weight_grad(coef, coef_y, h2, weight, y, lse, ctx.temperature,
                                          ctx.vocab_slice)
        return grad_h, grad_w, None, None, None, None, None, None


def linear_logprob_chunked(
    hidden: torch.Tensor,        # [N, T, H] fp32/bf16
    weight: torch.Tensor,        # [V, H], same dtype; may be frozen
    targets: torch.Tensor,       # [N, T] int, IGNORE_INDEX allowed
    temperature: float = 1.0,
    *,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
    vocab_slice: int | None = None,
):
    """The CPU path (and second reference): the tiled torch implementation, any device.

    The forward works on one [chunk_size, vocab_slice] fp32 tile of the logits at a time
    (``torch_tile``: 2,048 rows x 4,096 columns, 32 MiB, at Qwen2.5's shapes); a trainable
    head's weight-gradient pass on [N*T, vocab_slice] slices (default 2^26 elements). Saves lse
    and D = (onehot - p) @ W for the backward, never the logits; a frozen weight (requires_grad
    False) costs no weight-gradient pass. Returns logp [N, T] fp32, or (logp, entropy).
    """
    _check_inputs(hidden, weight, targets, temperature, chunk_size)
    if vocab_slice is not None and (not isinstance(vocab_slice, int) or vocab_slice < 1):
        raise ValueError(f"vocab_slice must be a positive int or None, got {vocab_slice!r}")
    return _chunked(hidden, weight, targets, temperature, return_entropy, chunk_size, vocab_slice)


def _chunked(hidden, weight, targets, temperature, return_entropy, chunk_size, vocab_slice=None):
    N, T, _ = hidden.shape
    tile = torch_tile(N * T, weight.shape[0], chunk_size, vocab_slice)
    # D is needed only for a hidden gradient: skip its GEMM under no_grad (old/ref log-probs)
    need_d = torch.is_grad_enabled() and hidden.requires_grad
    return _LinearLogprobChunked.apply(hidden, weight, targets, float(temperature),
                                       bool(return_entropy), tile, vocab_slice, need_d)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _logprob_fwd_kernel(
    z_ptr,                        # [C, V] fp32 logits chunk, row stride stride_z (unscaled h.w)
    u_ptr,                        # [C, V] out (WRITE_U): exp(x - ref), 0 at the target; W's dtype
    y_ptr,                        # [C] int targets
    lse_ptr, logp_ptr, ent_ptr,   # [C] fp32 out (ent untouched without HAS_ENT)
    r_ptr, sig_ptr,               # [C] fp32 out (WRITE_U): exp(ref - lse), sum_{v != y} u_v
    V, stride_z, stride_u,
    inv_tau,
    IGNORE: tl.constexpr, HAS_ENT: tl.constexpr, WRITE_U: tl.constexpr, REF_GAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per row t, x_v = z_tv / tau, one pass over the row, online (running max m):

        s = sum_v exp(x_v - m),   a = sum_v exp(x_v - m) (x_v - m)
        on a new max m':  s <- s e^(m - m'),   a <- e^(m - m') (a + s (m - m'))

    then lse = m + log s, logp = (x_y - m) - log s, entropy = -sum p log p = log s - a / s (both
    terms non-negative: no cancellation at large |x|). (x - m) - log s, as log_softmax forms it,
    rather than x - lse: lse rounds at |x|'s ulp, which would cost 1 - p_y its digits for a
    near-certain token.

    WRITE_U: the same pass writes the row of D's GEMM operand without waiting for lse, relative
    to a reference fixed before the pass, ref = x_y:

        u_v = exp(x_v - ref) (v != y, 0 at y),   sigma = sum_{v != y} u_v,   r = exp(ref - lse)

    so p_v = r u_v and 1 - p_y = r sigma: with u_y set to -sigma (by the launcher, after this
    kernel), D = (onehot - p) @ W = -r (u @ W), one per-row factor after the GEMM, whose terms
    are all of one size (no 1 and -p_y apart: no cancellation for a near-certain token). A row
    with lse - ref > REF_GAP (p_y < e^-REF_GAP: exp(x - x_y) may overflow the storage dtype or
    the GEMM's sums) is rewritten with ref = m, a second read of its logits. Ignored rows get
    u = 0, r = sigma = 0, logp = entropy = 0.
    """
    row = tl.program_id(0).to(tl.int64)   # int64: row * stride overflows int32 for big chunks
    z_row = z_ptr + row * stride_z
    u_row = u_ptr + row * stride_u
    y = tl.load(y_ptr + row).to(tl.int64)
    valid = y != IGNORE
    y_safe = tl.where(valid, y, 0)
    if WRITE_U:     # the u rows' reference, before the pass (without u: after it, 31 regs not 39)
        x_y = tl.load(z_row + y_safe).to(tl.float32) * inv_tau
    offs = tl.arange(0, BLOCK_V)
    # Finite start (not -inf) so that the first rescale is 0 * finite rather than 0 * inf.
    m = tl.full((), -3.0e38, tl.float32)
    s = tl.zeros((), tl.float32)
    a = tl.zeros((), tl.float32)
    sig = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + offs
        inb = v < V
        # fp32 right after the load (the interpreter's bf16 arithmetic is wrong)
        x = tl.load(z_row + v, mask=inb, other=float("-inf")).to(tl.float32) * inv_tau
        m_new = tl.maximum(m, tl.max(x, axis=0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(x - m_new)                                    # 0 where masked
        if HAS_ENT:
            d = tl.where(inb, x - m_new, 0.0)
            a = alpha * (a + s * (m - m_new)) + tl.sum(e * d, axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new
        if WRITE_U:
            u = tl.where(valid & (v != y), tl.exp(x - x_y), 0.0)   # 0 where masked
            # per tile: a [BLOCK_V] accumulator would hold 16 more registers per thread
            sig += tl.sum(u, axis=0)
            store_rounded(u_row + v, u, inb)
    if not WRITE_U:
        x_y = tl.load(z_row + y_safe).to(tl.float32) * inv_tau
    log_s = tl.log(s)
    lse = m + log_s
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, tl.where(valid, (x_y - m) - log_s, 0.0))
    if HAS_ENT:
        tl.store(ent_ptr + row, tl.where(valid, log_s - a / s, 0.0))
    if WRITE_U:
        ref = x_y
        if valid & (lse - ref > REF_GAP):        # rare: the second read, relative to the max
            ref = m
            sig = tl.zeros((), tl.float32)
            for v0 in range(0, V, BLOCK_V):
                v = v0 + offs
                inb = v < V
                x = tl.load(z_row + v, mask=inb, other=float("-inf")).to(tl.float32) * inv_tau
                u = tl.where(v != y, tl.exp(x - m), 0.0)
                sig += tl.sum(u, axis=0)
                store_rounded(u_row + v, u, inb)
        tl.store(r_ptr + row, tl.where(valid, tl.exp((ref - m) - log_s), 0.0))
        tl.store(sig_ptr + row, sig)


@triton.jit
def _grad_logits_kernel(
    z_ptr,                  # [NT, VC] fp32 logits of the vocabulary slice [v_start, v_start+VC)
    gz_ptr,                 # [NT, VC] out: G, W's dtype; may alias z (fp32 W)
                            # (row strides: the full slice width, a multiple of 16 elements)
    y_ptr,                  # [NT] int targets
    lse_ptr,                # [NT] fp32 from the forward
    coef_ptr,               # [NT] fp32: g_t / tau, 0 for ignored tokens
    coef_y_ptr,             # [NT] fp32: coef_t (1 - p_{t,y_t}), from the forward's logp
    v_start, VC, stride_z, stride_g,
    inv_tau,
    BLOCK_V: tl.constexpr,
):
    """One program per row t of a vocabulary slice: G_tv = coef_t (onehot_tv - exp(z_tv / tau -
    lse_t)), the gradient of sum_t g_t logp_t with respect to the unscaled logits h_t . w_v,
    so that the slice's weight gradient is G^T @ Hid (cuBLAS). The target column takes
    coef_y_t instead: recomputed logits are a few ulps off the forward's, which would cost
    1 - p_y its digits for near-certain tokens."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    g_row = gz_ptr + row * stride_g
    y_local = tl.load(y_ptr + row).to(tl.int64) - v_start   # outside [0, VC): no onehot here
    lse = tl.load(lse_ptr + row)
    coef = tl.load(coef_ptr + row)
    coef_y = tl.load(coef_y_ptr + row)
    offs = tl.arange(0, BLOCK_V)
    for v0 in range(0, VC, BLOCK_V):
        v = v0 + offs
        inb = v < VC
        x = tl.load(z_row + v, mask=inb, other=0.0).to(tl.float32) * inv_tau
        gz = tl.where(v == y_local, coef_y, -coef * tl.exp(x - lse))
        store_rounded(g_row + v, gz, inb)


# --------------------------------------------------------------------------- launchers


def _block_v(n_cols: int) -> int:
    # Small tiles under the interpreter so that tests with V of a few hundred loop over tiles.
    cap = 64 if interpreting() else 4096
    return max(16, min(cap, triton.next_power_of_2(max(n_cols, 1))))


def _num_warps(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4


def _ref_gap(dtype: torch.dtype) -> float:
    """_logprob_fwd_kernel's REF_GAP for u rows stored in ``dtype``: u_v <= e^gap must fit it and
    152k of them times |w| must stay far inside fp32 in the GEMM (e^64 = 6e27); fp16 tops out
    at 65,504 (e^11)."""
    return 8.0 if dtype == torch.float16 else 64.0


def _triton_forward(hidden, weight, targets, temperature, return_entropy, chunk_size, need_d):
    """Row chunks: z = h W^T (torch/cuBLAS, fp32 out) -> _logprob_fwd_kernel, one read of z
    (it writes u) -> u[t, y_t] = -sigma_t -> D = -r (u W) (the kernel's docstring)."""
    N, T, H = hidden.shape
    V = weight.shape[0]
    NT = N * T
    dev = hidden.device
    h2 = hidden.reshape(NT, H)
    y = targets.reshape(NT)
    W = _mm_weight_operand(weight)
    lse = torch.empty(NT, dtype=torch.float32, device=dev)
    logp = torch.empty(NT, dtype=torch.float32, device=dev)
    ent = torch.empty(NT if return_entropy else 0, dtype=torch.float32, device=dev)
    D = torch.empty(NT if need_d else 0, H, dtype=torch.float32, device=dev)
    if NT > 0:
        C = max(1, min(chunk_size, NT))
        z_buf = torch.empty(C, V, dtype=torch.float32, device=dev)
        if need_d:
            # u in W's dtype, so that u @ W is a plain (bf16) GEMM with fp32 output; on CPU
            # (interpreter) too, so the tests see the GPU's rounding of u. Its own buffer even
            # for fp32 W: a row's second pass (REF_GAP) reads the logits again.
            u_buf = torch.empty(C, V, dtype=weight.dtype, device=dev)
            r = torch.empty(NT, dtype=torch.float32, device=dev)
            sig = torch.empty(NT, dtype=torch.float32, device=dev)
            y_safe = torch.where(y != IGNORE_INDEX, y, 0).long()[:, None]
        block = _block_v(V)
        for r0 in range(0, NT, C):
            r1 = min(r0 + C, NT)
            z = z_buf[: r1 - r0]
            u = u_buf[: r1 - r0] if need_d else z          # dummy: WRITE_U off
            _mm_fp32(h2[r0:r1], W.T, out=z)
            _logprob_fwd_kernel[(r1 - r0,)](
                z, u, y[r0:r1], lse[r0:r1], logp[r0:r1],
                ent[r0:r1] if return_entropy else lse[r0:r1],    # dummy: HAS_ENT off
                r[r0:r1] if need_d else lse[r0:r1], sig[r0:r1] if need_d else lse[r0:r1],
                V, z.stride(0), u.stride(0), 1.0 / temperature,
                IGNORE=IGNORE_INDEX, HAS_ENT=return_entropy, WRITE_U=need_d,
                REF_GAP=_ref_gap(weight.dtype), BLOCK_V=block, num_warps=_num_warps(block))
            if need_d:
                u.scatter_(1, y_safe[r0:r1], sig[r0:r1, None].neg().to(u.dtype))    # u_y = -sigma
                d = D[r0:r1]
                _mm_fp32(u, W, out=d)
                d.mul_(r[r0:r1, None].neg())
    return logp.view(N, T), (ent.view(N, T) if return_entropy else ent), lse, D


def _triton_weight_grad(coef, coef_y, hidden, weight, targets, lse, temperature, chunk_size):
    """Vocabulary slices: z = h W[slice]^T -> _grad_logits_kernel -> grad W[slice] = G^T h."""
    N, T, H = hidden.shape
    V = weight.shape[0]
    NT = N * T
    h2 = hidden.reshape(NT, H).contiguous()
    y = targets.reshape(NT)
    grad = torch.empty_like(weight)
    if NT == 0:
        return grad.zero_()
    W = _mm_weight_operand(weight)
    Vc = _vocab_slice(NT, V, chunk_size, multiple=16)
    z_buf = torch.empty(NT, Vc, dtype=torch.float32, device=hidden.device)
    g_buf = z_buf if weight.dtype == torch.float32 else \
        torch.empty(NT, Vc, dtype=weight.dtype, device=hidden.device)
    block = _block_v(Vc)
    for v0 in range(0, V, Vc):
        v1 = min(v0 + Vc, V)
        # every slice, the last (narrower) one too, keeps the row stride Vc: 16-byte aligned rows
        z, gz = z_buf[:, : v1 - v0], g_buf[:, : v1 - v0]
        _mm_fp32(h2, W[v0:v1].T, out=z)
        _grad_logits_kernel[(NT,)](
            z, gz, y, lse, coef, coef_y, v0, v1 - v0, z.stride(0), gz.stride(0), 1.0 / temperature,
            BLOCK_V=block, num_warps=_num_warps(block))
        if gz.dtype == h2.dtype and (h2.is_cuda or h2.dtype == torch.float32):
            torch.mm(gz.T, h2, out=grad[v0:v1])      # cuBLAS: fp32 accumulation, one rounding
        else:
            grad[v0:v1] = torch.mm(gz.T.float(), h2.float())
    return grad


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("visioncoach::linear_logprob", mutates_args=())
def _linear_logprob_op(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
    return_entropy: bool, chunk_size: int, need_d: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (logp [N, T] fp32, entropy [N, T] fp32 or [0], lse [NT] fp32,
    D [NT, H] fp32 or [0, H]); lse and D are what the backward needs."""
    return _triton_forward(hidden, weight, targets, temperature, return_entropy, chunk_size,
                           need_d)


@_linear_logprob_op.register_fake
def _(hidden, weight, targets, temperature, return_entropy, chunk_size, need_d):
    N, T, H = hidden.shape
    f32 = dict(dtype=torch.float32)
    return (hidden.new_empty((N, T), **f32),
            hidden.new_empty((N, T) if return_entropy else (0,), **f32),
            hidden.new_empty((N * T,), **f32),
            hidden.new_empty((N * T if need_d else 0, H), **f32))


@torch.library.custom_op("visioncoach::linear_logprob_weight_grad", mutates_args=())
def _linear_logprob_weight_grad_op(
    coef: torch.Tensor, coef_y: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
    targets: torch.Tensor, lse: torch.Tensor, temperature: float, chunk_size: int,
) -> torch.Tensor:
    """d loss / d W [V, H] in W's dtype; coef [NT] = g_t / tau (0 for ignored tokens),
    coef_y [NT] = coef_t (1 - p_{t,y_t})."""
    return _triton_weight_grad(coef, coef_y, hidden, weight, targets, lse, temperature,
                               chunk_size)


@_linear_logprob_weight_grad_op.register_fake
def _(coef, coef_y, hidden, weight, targets, lse, temperature, chunk_size):
    return torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, temperature, _ent, chunk_size, _need_d = inputs
    logp, ent, lse, D = output
    need_w = ctx.needs_input_grad[1]
    ctx.save_for_backward(hidden if need_w else None, weight if need_w else None, targets,
                          lse, D, logp if need_w else None)
    ctx.hidden_meta = (hidden.shape, hidden.dtype)
    ctx.temperature = temperature
    ctx.chunk_size = chunk_size
    ctx.mark_non_differentiable(ent, lse, D)


def _backward(ctx, grad_logp, _grad_ent, _grad_lse, _grad_d):
    hidden, weight, targets, lse, D, logp = ctx.saved_tensors
    shape, dtype = ctx.hidden_meta
    # Plain torch ops for the O(NT H) part; only the vocabulary-sized work is a custom op, so
    # torch.compile traces the backward without entering Triton.
    g = grad_logp.reshape(-1).float()
    coef = torch.where(targets.reshape(-1) != IGNORE_INDEX, g * (1.0 / ctx.temperature), 0.0)
    grad_h = grad_w = None
    if ctx.needs_input_grad[0]:
        if D.shape[0] != coef.shape[0]:
            raise RuntimeError("visioncoach::linear_logprob was called with need_d=False, so it "
                               "kept no D for a hidden gradient")
        grad_h = (coef[:, None] * D).to(dtype).view(shape)
    if ctx.needs_input_grad[1]:
        coef_y = coef * -torch.expm1(logp.reshape(-1))                             # coef (1 - p_y)
        grad_w = torch.ops.visioncoach.linear_logprob_weight_grad(
            coef, coef_y, hidden, weight, targets, lse, ctx.temperature, ctx.chunk_size)
    return grad_h, grad_w, None, None, None, None, None


_linear_logprob_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public


def linear_logprob(
    hidden: torch.Tensor,        # [N, T, H] fp32/bf16
    weight: torch.Tensor,        # [V, H], same dtype; frozen (requires_grad False) or trainable
    targets: torch.Tensor,       # [N, T] int in [0, V), or IGNORE_INDEX (-100)
    temperature: float = 1.0,
    *,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
    backend: Backend = "auto",
):
    """Selected-token log-probabilities of the LM head, log softmax(h W^T / tau)[y], per token.

    Returns ``logp`` [N, T] fp32, or ``(logp, entropy)`` with ``return_entropy`` (entropy has no
    gradient). Differentiable in ``hidden`` and, when it requires grad, ``weight``; never holds
    the [N*T, V] logits (``chunk_size`` rows at a time; default ``default_chunk_size(V)`` on the
    Triton path, ``torch_tile``'s on the torch path, which also slices the vocabulary).
    ``backend``: "torch" is ``linear_logprob_chunked``; "triton" the custom op
    ``visioncoach::linear_logprob`` (cuBLAS GEMMs + Triton row kernels); "auto" picks Triton on
    CUDA and torch elsewhere.
    """
    _check_inputs(hidden, weight, targets, temperature, chunk_size)
    if resolve_backend(backend, hidden, weight, targets) == "torch":
        return _chunked(hidden, weight, targets, temperature, return_entropy, chunk_size)
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    need_d = torch.is_grad_enabled() and hidden.requires_grad
    logp, ent, _lse, _d = torch.ops.visioncoach.linear_logprob(
        hidden, weight, targets.long(), float(temperature), bool(return_entropy), int(chunk),
        need_d)
    return (logp, ent) if return_entropy else logp
