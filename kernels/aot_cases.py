"""The launches ``visioncoach.kernels.aot`` compiles: every public kernel function called as the
trainer calls it, at realistic shapes, on CUDA tensors (fake ones under ``aot.capture``).

Shapes (the paper's run, ``configs/qwen2_5_vl_7b.yaml``):
* VP: 16 key frames of 448x448 uint8 (``data.max_pixels`` 100,352 = 448^2), 3 boxes per frame,
  CLIP relevance maps of 14x14 (ViT-B/16 at 224 px).
* Rewards: 64 rollouts x 6 claims (384 claims, 2 boxes each) over 16 records with 4 annotated
  key frames each, 3 GT boxes and 2 objects per frame; 384 predicted times, 6 ground-truth
  times and one segment per record (a count of 1 is specialised to a constant by the JIT).
* Loss: N = 6 rows (G = 4 rollouts + 2 distilled), T = 768 (``rollout.max_new_tokens``), the
  reference's log-probs (beta 0.04) and on-policy (mu = 1: no old log-probs); mu = 2 adds them.
* LM head: Qwen2.5-VL-7B, H = 3584, V = 152,064 (its config's vocab_size: the 7B pads its head
  past the 151,936 rows of the smaller Qwen2.5 models; both are multiples of 16 and give the
  same 441-row chunks, hence the same specialisations). The trainer calls ``linear_logprob`` once per
  group (``RLRunner.token_logprobs``): [4, 768] for the rollouts and [2, 768] for the distilled
  rows, each for the policy (hidden and, in a full fine-tune, the head trainable: the backward
  runs ``_grad_logits_kernel``) and for the reference (no grad: no u rows written). The
  launcher's own vocabulary chunking (``default_chunk_size`` = 441 rows, ``_vocab_slice``)
  applies; its row-chunk views start at offsets that are not all 16-byte aligned, so one call
  launches several specialisations.
bf16 and fp32 wherever the function takes both (the VP kernels take uint8 frames only, the
reward kernels convert to fp32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable
from unittest import mock

__all__ = ["Case", "CASES"]

_CUDA = "cuda"


@dataclass(frozen=True)
class Case:
    name: str
    dtype: str                       # the input dtype it exercises: "u8", "fp32", "bf16"
    run: Callable[[], None]


def _backward(output, grad) -> None:
    """The backward of the custom op that produced ``output`` (its autograd node's own
    ``apply``: the op's registered backward with the context autograd set up). Fake CUDA tensors
    cannot go through the autograd engine without a driver (it asks the device for its CUDA
    context), and every backward here is one op deep, so the engine adds nothing."""
    node = output.grad_fn
    grads = [None] * len(node._input_metadata)        # one per output of the op
    grads[output.output_nr] = grad
    node.apply(*grads)


def _frames():
    import torch

    return torch.empty(16, 448, 448, 3, dtype=torch.uint8, device=_CUDA)


def _boxes():
    import torch

    return (torch.empty(16, 3, 4, device=_CUDA),
            torch.full((16,), 3, dtype=torch.int64, device=_CUDA))


def _vp_darken():
    from visioncoach.kernels.vp_darken import vp_darken

    vp_darken(_frames(), *_boxes(), darken_factor=0.3, backend="triton")


def _vp_circle():
    from visioncoach.kernels.vp_circle import vp_circle

    vp_circle(_frames(), *_boxes(), backend="triton")


def _vp_frame_number():
    import torch

    from visioncoach.kernels import vp_frame_number as m

    # The launcher copies its CPU glyph table to the frames' device once and caches it; fake
    # mode cannot copy real data to a device it does not have, so the cache gets a fake table
    # of the same shape and dtype (its only properties the launch sees), dropped afterwards.
    dev = torch.device(_CUDA, 0)
    m._glyph_cache[dev] = torch.empty(m.DIGIT_GLYPHS.shape, dtype=m.DIGIT_GLYPHS.dtype, device=dev)
    try:
        m.vp_frame_number(_frames(), torch.arange(16, device=_CUDA), backend="triton")
    finally:
        m._glyph_cache.pop(dev, None)


def _vp_heatmap():
    import torch

    from visioncoach.kernels.vp_heatmap import vp_heatmap_blend

    vp_heatmap_blend(_frames(), torch.empty(16, 14, 14, device=_CUDA), alpha=0.5, backend="triton")


def _claim_iou():
    import torch

    from visioncoach.kernels.claim_iou import claim_iou

    C, Bmax, R, Kmax, K, P, O = 384, 2, 16, 4, 64, 3, 2
    f32, i64 = dict(device=_CUDA), dict(dtype=torch.int64, device=_CUDA)
    claim_iou(torch.empty(C, **f32), torch.empty(C, **i64), torch.empty(C, Bmax, 4, **f32),
              torch.empty(C, **i64), torch.empty(R, Kmax, **i64), torch.empty(K, **f32),
              torch.empty(K, P, 4, **f32), torch.empty(K, P, **i64), torch.empty(K, **i64), O,
              backend="triton")


def _temporal_reward():
    import torch

    from visioncoach.kernels.temporal_reward import temporal_point_reward

    M, R, Tmax, Smax = 384, 16, 6, 1
    dev = dict(device=_CUDA)
    temporal_point_reward(torch.empty(M, **dev), torch.empty(M, dtype=torch.int64, **dev),
                          torch.empty(R, Tmax, **dev), torch.empty(R, Tmax, dtype=torch.bool, **dev),
                          torch.empty(R, Smax, 2, **dev), torch.empty(R, Smax, dtype=torch.bool, **dev),
                          sigma=1.0, backend="triton")


def _gspo(dtype: str, with_old: bool):
    def run():
        import torch

        from visioncoach.kernels.gspo_sd_loss import gspo_sd_loss

        N, T = 6, 768
        dt = getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[dtype])
        logp = torch.empty(N, T, dtype=dt, device=_CUDA, requires_grad=True)
        old = torch.empty(N, T, dtype=dt, device=_CUDA) if with_old else None
        vec = lambda: torch.empty(N, device=_CUDA)  # noqa: E731
        loss, _ = gspo_sd_loss(logp, old, torch.empty(N, T, dtype=dt, device=_CUDA), vec(),
                               torch.empty(N, T, dtype=torch.bool, device=_CUDA), vec(), vec(),
                               eps_low=3e-4, eps_high=4e-4, beta=0.04, backend="triton")
        _backward(loss, torch.ones((), device=_CUDA))
    return run


def _linear_logprob(dtype: str):
    def run():
        import torch

        from visioncoach.kernels import linear_logprob as ll

        H, V, T = 3584, 152_064, 768
        dt = getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[dtype])
        weight = torch.empty(V, H, dtype=dt, device=_CUDA, requires_grad=True)
        check = ll._check_inputs

        def check_shapes(*args):
            # Fake tensors hold no values: skip only the data-dependent target range check,
            # as the function itself does while torch.compile traces.
            with mock.patch("torch.compiler.is_compiling", lambda: True):
                check(*args)

        with mock.patch.object(ll, "_check_inputs", check_shapes):
            for rows in (4, 2):                 # the rollouts' group, the distilled rows' group
                targets = torch.empty(rows, T, dtype=torch.int64, device=_CUDA)
                with torch.no_grad():           # the reference policy's pass
                    ll.linear_logprob(torch.empty(rows, T, H, dtype=dt, device=_CUDA), weight, targets)
                hidden = torch.empty(rows, T, H, dtype=dt, device=_CUDA, requires_grad=True)
                logp = ll.linear_logprob(hidden, weight, targets)
                _backward(logp, torch.empty_like(logp))      # d loss / d logp, fp32
    return run


CASES = [
    Case("vp_darken 16x448x448x3, 3 boxes", "u8", _vp_darken),
    Case("vp_circle 16x448x448x3, 3 boxes", "u8", _vp_circle),
    Case("vp_frame_number 16x448x448x3", "u8", _vp_frame_number),
    Case("vp_heatmap 16x448x448x3, 14x14 maps", "u8", _vp_heatmap),
    Case("claim_iou 384 claims", "fp32", _claim_iou),
    Case("temporal_point_reward 384 times", "fp32", _temporal_reward),
    Case("gspo_sd_loss fwd+bwd [6, 768] ref", "fp32", _gspo("fp32", False)),
    Case("gspo_sd_loss fwd+bwd [6, 768] ref", "bf16", _gspo("bf16", False)),
    Case("gspo_sd_loss fwd+bwd [6, 768] ref+old (mu=2)", "fp32", _gspo("fp32", True)),
    Case("linear_logprob [4|2, 768] H=3584 V=152064, ref + policy fwd+bwd", "fp32", _linear_logprob("fp32")),
    Case("linear_logprob [4|2, 768] H=3584 V=152064, ref + policy fwd+bwd", "bf16", _linear_logprob("bf16")),
]
