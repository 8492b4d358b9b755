"""Per-GPU memory of one RL step, term by term, as this trainer runs it under DeepSpeed ZeRO-3.

Computed from formulas (analytic), never measured: every number is bytes of tensors the code
keeps, derived from the shapes below. The rules are read from the code they describe where
the code exposes them (the StaticCache bucket of ``rollout/generate.py``, the LM-head kernel's
chunking in ``kernels/linear_logprob.py``, DeepSpeed's settings from ``trainer/distributed.py``).

Notation: N GPUs, L prompt tokens, T completion tokens, G rollouts per prompt, B prompts per
rank per step, D hidden, I intermediate, Hq = heads x head_dim, Hkv = kv_heads x head_dim, V
vocabulary rows, S = L + T - 1 tokens per row in the policy pass (the last completion token is
never an input).

An RL step's phases, in order (``trainer/rl.py``), each with its own peak:
  rollout    all parameters gathered (``gathered_for_generation``), vision tower + prefill once
             per prompt, K/V broadcast into a StaticCache of G rows, decode;
  reference  the frozen reference's log-probs (no grad), one group of rows at a time;
  policy     every group's forward kept for one backward (gradient checkpointing: each layer's
             input kept, one layer recomputed at a time); under ZeRO-3 the G rows of a group run
             as one plain forward of S tokens each (``RLRunner.share_prompt`` is False);
  optimizer  DeepSpeed's step over the fp32 partitions.
Persistent state (parameters, gradient and optimizer partitions, the reference) is in all.
"""

from __future__ import annotations

from dataclasses import dataclass

from visioncoach.kernels.linear_logprob import _vocab_slice, default_chunk_size
from visioncoach.rollout.generate import _CACHE_BUCKET
from visioncoach.tools.arch import Arch, ParamCounts

GIB = 2 ** 30
BF16, FP32 = 2, 4


@dataclass(frozen=True)
class Workload:
    gpus: int
    prompt_tokens: int         # L (data.max_prompt_tokens: the budget, the worst case)
    completion_tokens: int     # T (rollout.max_new_tokens: every rollout runs to the end)
    G: int                     # rollout.num_generations
    prompts: int               # B = rollout.prompts_per_step
    top_n: int                 # vp.top_n distilled rows per hard prompt (0: vp.selector=none)
    frames: int                # data.nframes (uniform frames; annotated key frames not counted)
    pixels: int                # data.max_pixels per frame
    layout: str                # data.layout: "frames" (one image per frame) or "video"
    checkpointing: bool        # model.gradient_checkpointing
    reference: bool            # loss.beta > 0 with full fine-tuning: a reference model exists
    reduce_bucket: int         # DeepSpeed reduce_bucket_size (elements)
    reuse_distance: int        # DeepSpeed stage3_max_reuse_distance (elements)
    sub_group_size: int        # DeepSpeed sub_group_size (elements)
    reserve_gib: float         # CUDA context, NCCL, driver share, fragmentation
    capacity_gib: float        # the GPU's memory
    bucket: int = _CACHE_BUCKET

    @property
    def seq(self) -> int:
        return self.prompt_tokens + self.completion_tokens - 1

    @property
    def sd_rows(self) -> int:
        """Distilled rows per prompt, every prompt hard: the top-N of at most G candidates."""
        return min(self.top_n, self.G)

    @property
    def groups(self) -> list[int]:
        """Rows of every loss group of a rank's step: B raw groups of G, B distilled of sd_rows."""
        return [self.G] * self.prompts + ([self.sd_rows] * self.prompts if self.sd_rows else [])


# --- bytes per token of one decoder layer (transformers 5.23's Qwen2.5-VL code, bf16) -----------

def layer_saved_bytes(a: Arch) -> int:
    """What autograd keeps for one decoder layer's backward, per token: each RMSNorm keeps its
    fp32 upcast input (4D), its fp32 1/rms (4) and the bf16 normalised value (2D, for the
    weight's gradient), and the projections after it their bf16 input (2D); RoPE keeps only
    cos/sin (shared); FA2 keeps
    q and k after RoPE, v, its output and an fp32 log-sum-exp per head (no S x S matrix); the
    MLP keeps gate, silu(gate), up and their product (4 x 2I). The layer input itself is not
    among them (the checkpoint keeps it)."""
    hq, hkv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    norms = 2 * ((FP32 + 2 * BF16) * a.hidden + FP32)
    return norms + 2 * BF16 * (hq + hkv) + FP32 * a.heads + 4 * BF16 * a.intermediate


def layer_backward_extra_bytes(a: Arch) -> int:
    """Transients of one layer's backward beyond what it saved, per token (estimate): at the
    MLP's product, the gradients of the product, silu(gate) and up (3 x 2I) with the product
    itself released (-2I), and the hidden-size gradient stream (in, out, residual: 3 x 2D)."""
    return 2 * BF16 * a.intermediate + 3 * BF16 * a.hidden


def layer_nograd_bytes(a: Arch) -> int:
    """One decoder layer's peak without grad (reference pass, prefill), per token (estimate):
    the MLP stage holds the layer input (its caller's), the residual, the normalised input,
    silu(gate), up and their product; the attention stage the input, the normalised input, q,
    k, v, two RoPE temporaries of q's size, q/k after RoPE and the output."""
    hq, hkv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    mlp = BF16 * (3 * a.hidden + 3 * a.intermediate)
    attn = BF16 * (2 * a.hidden + 5 * hq + 4 * hkv)
    return max(mlp, attn)


def head_saved_bytes(a: Arch) -> int:
    """Kept per token of every row (all S positions) outside the checkpointed layers: the final
    norm's fp32 input, 1/rms and bf16 normalised value and its output (which the LM-head kernel
    keeps through the completion slice, a view), and M-RoPE's cos and sin (bf16, head_dim each)."""
    return (FP32 + 2 * BF16) * a.hidden + FP32 + 2 * BF16 * a.head_dim


def kernel_saved_bytes(a: Arch) -> int:
    """Kept by the LM-head kernel per completion token for its backward: D (fp32 [NT, H]), lse
    and logp (fp32), the int64 target."""
    return FP32 * a.hidden + FP32 + FP32 + 8


def vision_patches(w: Workload, a: Arch) -> int:
    """Patches the vision tower sees: a frame of ``pixels`` is at most pixels / patch^2 patches
    (a multiple of merge^2); ``frames`` layout: one image per frame (its temporal patch repeats
    it), ``video``: frames / temporal_patch of them."""
    per_frame = (w.pixels // a.patch ** 2) // a.merge ** 2 * a.merge ** 2
    steps = w.frames if w.layout == "frames" else -(-w.frames // a.temporal_patch)
    return steps * per_frame


def vision_patch_bytes(a: Arch) -> int:
    """One vision block's peak per patch without grad (estimate): the attention stage holds the
    input, the normalised input, qkv (3Dv), q and k after RoPE (2Dv) and the output in bf16,
    and q, k upcast to fp32 for RoPE with as much again in temporaries (4 x 4Dv); the MLP stage
    the input, the residual, the normalised input, silu(gate), up and their product."""
    d, i = a.v_hidden, a.v_intermediate
    return max(BF16 * (3 * d + 3 * i), BF16 * 8 * d + FP32 * 4 * d)


def kernel_buffers(rows: int, w: Workload, a: Arch, grad: bool) -> int:
    """``linear_logprob``'s buffers for one group (the Triton path): forward, a [C, V] fp32 logits
    chunk (C = min(default_chunk_size(V), NT)) and, when it keeps D, its bf16 twin (u, D's GEMM
    operand); backward, NT x Vc fp32 logits and bf16 G slices (Vc = _vocab_slice, the Triton
    path's multiple of 16) and the hidden gradient."""
    nt = rows * w.completion_tokens
    chunk = default_chunk_size(a.vocab)
    fwd = min(chunk, nt) * a.vocab * (FP32 + (BF16 if grad else 0))
    if not grad:
        return fwd
    vc = _vocab_slice(nt, a.vocab, chunk, multiple=16)
    return max(fwd, nt * vc * (FP32 + BF16) + nt * a.hidden * BF16)


def partition(numels: list[int], n: int) -> int:
    """Elements a rank holds of these parameters under ZeRO-3: ceil(numel / N) each."""
    return sum(-(-x // n) for x in numels)


def largest_sub_group(numels: list[int], n: int, sub_group_size: int) -> int:
    """DeepSpeed's largest optimizer sub-group (``_create_fp16_sub_groups``): partitions taken in
    order until the running size reaches sub_group_size; one group when all fit."""
    parts = [-(-x // n) for x in numels]
    if sub_group_size >= sum(parts):
        return sum(parts)
    best = run = 0
    for p in parts:
        run += p
        if run >= sub_group_size:
            best, run = max(best, run), 0
    return max(best, run)


def terms(a: Arch, c: ParamCounts, w: Workload) -> dict[str, int]:
    """Every term in bytes per GPU (see TERMS for what each is)."""
    n, D, S, L = w.gpus, a.hidden, w.seq, w.prompt_tokens
    p_t, p_v = partition(c.trainable, n), partition(c.frozen, n)
    rows, big = w.groups, max(w.groups)
    kv_layer = 2 * a.kv_heads * a.head_dim * BF16          # K and V of one token, one layer
    cache_len = -(-(L + w.completion_tokens) // w.bucket) * w.bucket
    patches = vision_patches(w, a)
    vis_tokens = patches // a.merge ** 2
    pixel_values = 3 * a.temporal_patch * a.patch ** 2 * patches * (FP32 + BF16)  # fp32 in, bf16 copy
    saved, extra = layer_saved_bytes(a), layer_backward_extra_bytes(a)
    per_row_kept = (D * BF16 * a.layers if w.checkpointing else saved * a.layers)
    recompute = (saved + extra) if w.checkpointing else extra
    t = {
        "params_trained": p_t * BF16,
        "params_vision": p_v * BF16,
        "grads": p_t * BF16 + w.reduce_bucket * BF16,
        "optimizer": p_t * 3 * FP32,
        "ref_replica": c.total * BF16 if w.reference else 0,
        "ref_partitioned": (p_t + p_v) * BF16 if w.reference else 0,
        "zero3_gathered": c.largest_module[1] * BF16,
        "zero3_grad": c.largest_module[1] * BF16,
        "zero3_retained": w.reuse_distance * BF16,
        "rollout_params": c.total * BF16,
        "vision_acts": patches * vision_patch_bytes(a) + pixel_values,
        "prefill_ws": L * (layer_nograd_bytes(a) + D * BF16),
        "kv_prefix": L * a.layers * kv_layer,
        "kv_static": w.G * cache_len * a.layers * kv_layer + w.G * cache_len * kv_layer,
        "kept_rollouts": len(rows) * (L * D * BF16 + vis_tokens * D * BF16 + 3 * L * 8),
        # the embedded input stays referenced for the whole forward; the kernel runs after it
        "ref_ws": max(big * S * (layer_nograd_bytes(a) + D * BF16),
                      big * S * 2 * D * BF16 + kernel_buffers(big, w, a, grad=False)) if w.reference else 0,
        "act_checkpoints": sum(r * S for r in rows) * per_row_kept,
        "act_head": sum(r * S * head_saved_bytes(a) + r * w.completion_tokens * kernel_saved_bytes(a)
                        for r in rows),
        "act_layer": big * S * recompute + c.largest_in_layer * BF16 * 2,
        "act_kernel": kernel_buffers(big, w, a, grad=True),
        "opt_step": largest_sub_group(c.trainable, n, w.sub_group_size) * (FP32 + BF16),
        "reserve": int(w.reserve_gib * GIB),
    }
    return t


# name -> (what, formula); the order is the table's.
TERMS = {
    "params_trained": ("parameters: language model + LM head (bf16, 1/N)", "sum ceil(n/N) x 2"),
    "params_vision": ("parameters: vision tower, frozen (bf16, 1/N)", "sum ceil(n/N) x 2"),
    "grads": ("gradients (bf16 partition, 1/N) + IPG bucket", "P_t x 2 + reduce_bucket x 2"),
    "optimizer": ("AdamW: fp32 master + exp_avg + exp_avg_sq (1/N)", "P_t x 12"),
    "ref_replica": ("reference policy: full replica (frozen_copy)", "all params x 2"),
    "ref_partitioned": ("reference policy: partitioned (ZeRO-3 engine, 1/N)", "(P_t + P_v) x 2"),
    "zero3_gathered": ("ZeRO-3 gathered: the largest module (bf16)", "max module x 2"),
    "zero3_grad": ("ZeRO-3: that module's full bf16 grad (backward)", "max module x 2"),
    "zero3_retained": ("ZeRO-3 reuse-distance retention (worst case)", "max_reuse_distance x 2"),
    "rollout_params": ("rollout: all parameters gathered (full bf16 copy)", "all params x 2"),
    "vision_acts": ("rollout: vision tower activations (no grad, one block)", "patches x block peak"),
    "prefill_ws": ("rollout: prefill working set (one layer, L tokens)", "L x layer peak"),
    "kv_prefix": ("rollout KV: prefill cache, batch 1, L tokens", "L x layers x 2 x KV x hd x 2"),
    "kv_static": ("rollout KV: StaticCache, G rows (+ FA2 unpad copy)", "G x ceil128(L+T) x ..."),
    "kept_rollouts": ("rollout results kept to the loss (embeds, features)", "groups x (L + vis) x D x 2"),
    "ref_ws": ("reference pass working set (G rows, no grad)", "G x S x layer peak"),
    "act_checkpoints": ("policy: checkpointed layer inputs, all groups", "rows x S x layers x D x 2"),
    "act_head": ("policy: final norm + LM-head kernel saved, all groups", "rows x S x (8D + 4hd) + ..."),
    "act_layer": ("policy: one layer recomputed + its backward", "G x S x (saved + bwd) + ..."),
    "act_kernel": ("policy: LM-head kernel chunk buffers", "C x V x 6 / NT x Vc x 6 + ..."),
    "opt_step": ("optimizer step: fp32 grad of a sub-group + bf16 flat", "min(P_t, sub_group) x 6"),
    "reserve": ("reserve: CUDA context, NCCL, driver, fragmentation", "stated"),
}
PERSISTENT = ("params_trained", "params_vision", "grads", "optimizer")


def phases(t: dict[str, int], ref_mode: str) -> dict[str, int]:
    """Peak bytes of each phase with the reference ``replica`` or ``partitioned``; the reserve
    is added to each."""
    ref = t["ref_" + ref_mode]
    base = sum(t[k] for k in PERSISTENT) + ref + t["reserve"]
    zero3 = t["zero3_gathered"] + t["zero3_retained"]     # no gradients in the reference pass
    rollout = t["rollout_params"] + t["kept_rollouts"] + max(
        t["vision_acts"], t["kv_prefix"] + t["prefill_ws"], t["kv_prefix"] + t["kv_static"])
    reference = t["kept_rollouts"] + t["ref_ws"] + (zero3 if ref_mode == "partitioned" and ref else 0)
    policy = (t["kept_rollouts"] + t["act_checkpoints"] + t["act_head"]
              + max(t["act_layer"], t["act_kernel"] + t["zero3_gathered"] + t["zero3_grad"])
              + t["zero3_retained"])
    return {"rollout": base + rollout, "reference": base + reference, "policy": base + policy,
            "optimizer": base + t["opt_step"]}
