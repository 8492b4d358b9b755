"""Triton reward kernels (claim IoU / nearest key frame, temporal point reward) against their
PyTorch references, on random batches with the awkward cases: padding everywhere, records
without key frames or ground-truth times, zero-area and reversed-free boxes, exact ties."""

import pytest
import torch

from visioncoach.kernels.claim_iou import claim_iou, claim_iou_reference
from visioncoach.kernels.temporal_reward import (temporal_point_reward,
                                                 temporal_point_reward_reference)

EPS32 = torch.finfo(torch.float32).eps


def _boxes(g, *shape):
    xy = torch.rand(*shape, 2, generator=g) * 80
    wh = torch.rand(*shape, 2, generator=g) * 40
    wh = torch.where(torch.rand(*shape, 1, generator=g) < 0.1, 0.0, wh)  # some zero-area boxes
    return torch.cat([xy, xy + wh], -1)


def random_spatial(seed, C=13, R=4, Kmax=3, P=5, O=3, Bmax=4):
    g = torch.Generator().manual_seed(seed)
    frame_of, frame_time, frame_boxes, box_obj, obj_count = [], [], [], [], []
    for r in range(R):
        n = 0 if r == 0 else int(torch.randint(1, Kmax + 1, (1,), generator=g))  # record 0: none
        ts = sorted(float(x) for x in torch.randint(0, 10, (n,), generator=g))  # integer times: ties
        ids = []
        for t in ts:
            ids.append(len(frame_time))
            frame_time.append(t)
            n_obj = int(torch.randint(1, O + 1, (1,), generator=g))
            n_box = int(torch.randint(n_obj, P + 1, (1,), generator=g))
            objs = list(range(n_obj)) + torch.randint(0, n_obj, (n_box - n_obj,), generator=g).tolist()
            box_obj.append(objs + [-1] * (P - n_box))
            frame_boxes.append(_boxes(g, P))
            obj_count.append(n_obj)
        frame_of.append(ids + [-1] * (Kmax - len(ids)))
    claim_record = torch.randint(0, R, (C,), generator=g)
    claim_t = torch.randint(0, 20, (C,), generator=g).float() / 2  # halves: equidistant ties
    box_count = torch.randint(1, Bmax + 1, (C,), generator=g)
    boxes = _boxes(g, C, Bmax)
    boxes = torch.where(torch.arange(Bmax)[None, :, None] < box_count[:, None, None], boxes, 0.0)
    # Make some claim boxes copies of GT boxes so IoU = 1 is exercised.
    if frame_boxes:
        boxes[0, 0] = frame_boxes[-1][0]
    return dict(
        claim_t=claim_t, claim_record=claim_record, boxes=boxes, box_count=box_count,
        frame_of=torch.tensor(frame_of, dtype=torch.int64),
        frame_time=torch.tensor(frame_time, dtype=torch.float32),
        frame_boxes=torch.stack(frame_boxes) if frame_boxes else torch.zeros(0, P, 4),
        box_obj=torch.tensor(box_obj, dtype=torch.int64).reshape(-1, P),
        obj_count=torch.tensor(obj_count, dtype=torch.int64), n_obj=O)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shape", [dict(), dict(C=1, Bmax=1, O=1, P=1), dict(C=9, Bmax=70, O=5, P=7)])
def test_claim_iou_triton_matches_reference(seed, shape):
    a = random_spatial(seed, **shape)
    got = claim_iou(**a, backend="triton")
    ref = claim_iou_reference(**a)
    assert torch.equal(got.frame, ref.frame)
    assert torch.equal(got.dt, ref.dt)
    # Same fp32 formula per pair; only the summation order of eq. 14's object mean differs.
    for name in ("best_obj", "score_max", "score_avg"):
        assert torch.allclose(getattr(got, name), getattr(ref, name), rtol=1e-6, atol=1e-7), name


def test_claim_iou_reference_hand_case():
    # One record, frames at t=1 and t=3 (the second listed later); claim at t=2 ties -> frame at t=1.
    frame_boxes = torch.tensor([[[0, 0, 10, 10], [20, 20, 30, 30]],
                                [[0, 0, 10, 10], [0, 0, 0, 0]]], dtype=torch.float32)
    a = dict(claim_t=torch.tensor([2.0, 2.9]), claim_record=torch.tensor([0, 0]),
             boxes=torch.tensor([[[0, 0, 10, 5], [20, 20, 30, 30]], [[5, 0, 15, 10], [0, 0, 0, 0]]]),
             box_count=torch.tensor([2, 1]), frame_of=torch.tensor([[0, 1]]),
             frame_time=torch.tensor([1.0, 3.0]), frame_boxes=frame_boxes,
             box_obj=torch.tensor([[0, 1], [0, -1]]), obj_count=torch.tensor([2, 1]), n_obj=2)
    for backend in ("torch", "triton"):
        r = claim_iou(**a, backend=backend)
        assert r.frame.tolist() == [0, 1] and r.dt.tolist() == pytest.approx([1.0, 0.1])
        # Claim 0: box 0 vs object 0 = 50/100; box 1 vs object 1 = 1.
        assert r.best_obj[0].tolist() == pytest.approx([0.5, 1.0])
        assert r.score_max[0].item() == pytest.approx(1.0)
        assert r.score_avg[0].item() == pytest.approx(0.5)   # best box: (0 + 1) / 2 or (0.5 + 0) / 2
        # Claim 1: [5,0,15,10] vs [0,0,10,10]: inter 50, union 150.
        assert r.best_obj[1].tolist() == pytest.approx([1 / 3, 0.0])
        assert r.score_avg[1].item() == pytest.approx(1 / 3)


def test_claim_iou_without_any_frame():
    a = random_spatial(0, R=1)  # only record 0, which has no key frames
    for backend in ("torch", "triton"):
        r = claim_iou(**a, backend=backend)
        assert (r.frame == -1).all() and torch.isinf(r.dt).all() and (r.score_max == 0).all()


def random_temporal(seed, M=37, R=5, Tmax=4, Smax=3):
    g = torch.Generator().manual_seed(seed)
    gt_times = torch.randint(0, 20, (R, Tmax), generator=g).float() / 2
    time_mask = torch.rand(R, Tmax, generator=g) < 0.7
    time_mask[0] = False                                  # a record without ground-truth times
    s = torch.randint(0, 15, (R, Smax), generator=g).float() / 2
    segments = torch.stack([s, s + torch.randint(0, 6, (R, Smax), generator=g).float() / 2], -1)
    seg_mask = (torch.rand(R, Smax, generator=g) < 0.5) & time_mask.any(1, keepdim=True)
    times = torch.randint(-2, 24, (M,), generator=g).float() / 2  # on endpoints: closed intervals
    time_record = torch.randint(0, R, (M,), generator=g)
    return times, time_record, gt_times, time_mask, segments, seg_mask


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("sigma", [0.25, 1.0, 4.0])
@pytest.mark.parametrize("M", [1, 37, 300])
def test_temporal_triton_matches_reference(seed, sigma, M):
    args = random_temporal(seed, M=M)
    got = temporal_point_reward(*args, sigma, backend="triton")
    ref = temporal_point_reward_reference(*args, sigma)
    # exp of the same fp32 argument: the interpreter's is numpy's float32 exp (at most 2.52 ulp,
    # NumPy 1.17 release notes), torch's at most 1 ulp (SLEEF's u10 expf); 1 ulp <= eps relative,
    # and 2^-149 absolute for subnormal results.
    assert torch.allclose(got, ref, rtol=(2.52 + 1) * EPS32, atol=(2.52 + 1) * 2.0**-149)
    assert (ref[args[1] == 0] == 0).all()


def test_temporal_reference_hand_case():
    gt_times = torch.tensor([[2.0, 5.0, 9.0]])
    segments = torch.tensor([[[2.0, 5.0]]])
    times = torch.tensor([2.0, 5.0, 6.0, 9.5, 0.0])
    args = (times, torch.zeros(5, dtype=torch.int64), gt_times, torch.ones(1, 3, dtype=torch.bool),
            segments, torch.ones(1, 1, dtype=torch.bool))
    import math
    expect = [1.0, 1.0, math.exp(-1 / 2), math.exp(-0.25 / 2), math.exp(-4 / 2)]
    for backend in ("torch", "triton"):
        assert temporal_point_reward(*args, 1.0, backend=backend).tolist() == pytest.approx(expect)
    with pytest.raises(ValueError, match="sigma"):
        temporal_point_reward(*args, 0.0)


def test_ops_registered_with_fakes():
    a = random_spatial(1)
    args = (a["claim_t"], a["claim_record"], a["boxes"], a["box_count"], a["frame_of"],
            a["frame_time"], a["frame_boxes"], a["box_obj"], a["obj_count"], a["n_obj"])
    torch.library.opcheck(torch.ops.visioncoach.claim_iou.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    targs = random_temporal(1) + (1.0,)
    torch.library.opcheck(torch.ops.visioncoach.temporal_point_reward.default, targs,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
def test_kernels_on_cuda_match_cpu_reference():
    a = random_spatial(3, C=4096, R=512, Bmax=8, P=12, O=6)
    ref = claim_iou_reference(**a)
    got = claim_iou(**{k: (v.cuda() if torch.is_tensor(v) else v) for k, v in a.items()})
    assert torch.equal(got.frame.cpu(), ref.frame)
    for name in ("dt", "best_obj", "score_max", "score_avg"):
        assert torch.allclose(getattr(got, name).cpu(), getattr(ref, name), rtol=1e-6, atol=1e-7)
    args = random_temporal(3, M=100_000, R=512)
    ref_t = temporal_point_reward_reference(*args, 1.0)
    got_t = temporal_point_reward(*(x.cuda() for x in args), 1.0)
    # The same fp32 argument on both sides (sigma = 1: the kernel's * 0.5 is the reference's / 2);
    # libdevice's expf is within 2 ulp (CUDA C++ Programming Guide, expf), torch's CPU exp within
    # 1: 3 ulp <= 3 eps relative. Libdevice flushes results below 2^-126 to zero: atol = 2^-126.
    # (tl.exp, ex2.approx of x log2 e, was off by up to 2 + 1.173 |x| ulp: 16 ulp at |x| = 12.)
    assert torch.allclose(got_t.cpu(), ref_t, rtol=3 * EPS32, atol=torch.finfo(torch.float32).tiny)
