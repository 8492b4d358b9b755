"""Visual-prompt rendering (the kernels/vp_*.py ops through visioncoach.vp's table), hints and
CLIP relevance maps (visioncoach.vp).

Kernels run through the Triton interpreter on CPU (conftest sets TRITON_INTERPRET=1), so the
frames are small; the real-size comparison is the ``gpu`` test.
"""

import math
import string

import pytest
import torch
import torch.nn.functional as F

from visioncoach.kernels import vp_heatmap
from visioncoach.kernels.vp_circle import default_thickness
from visioncoach.kernels.vp_darken import default_pad
from visioncoach.kernels.vp_frame_number import DIGIT_GLYPHS, default_digit_scale
from visioncoach.vp import add_hint, render_vp, render_vp_reference
from visioncoach.vp.spec import vp_spec

VP_TYPES = ("api_prompt", "circle", "darken", "numpro", "raw")   # the paper's pool
VP_HINTS = {t: vp_spec(t).hint for t in VP_TYPES}

H, W = 40, 56
RED = torch.tensor([255, 0, 0], dtype=torch.uint8)


def _frames(n, h=H, w=W, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g).to(device)


def _batch():
    """Key frames of three "samples" stacked along F, with the awkward box cases."""
    frames = _frames(5)
    boxes = torch.tensor([
        [[5, 5, 20, 30], [-10, -10, 8, 6], [0, 0, 0, 0]],              # past the top-left corner
        [[40, 20, 80, 50], [10, 10, 11, 11], [12, 12, 30, 30]],         # past the right edge, 1x1
        [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],                     # no boxes
        [[30.3, 3.7, 45.2, 20.9], [35, 10, 50, 25], [20, 8, 20, 30]],   # overlap, zero width
        [[50, 38, 20, 12], [-100, -100, 200, 200], [0, 0, 0, 0]],       # swapped corners, huge
    ], dtype=torch.float32)
    box_count = torch.tensor([2, 3, 0, 3, 2])
    frame_index = torch.tensor([1, 12, 7, 305, 16])
    g = torch.Generator().manual_seed(1)
    heatmap = torch.rand(5, 6, 7, generator=g)
    return frames, boxes, box_count, frame_index, heatmap


# --------------------------------------------------------------------------- kernel == reference


CUSTOM = {
    "darken": dict(darken_factor=0.55, pad=0),
    "circle": dict(thickness=3.5),
    "numpro": dict(digit_scale=2),
    "api_prompt": dict(alpha=0.8),
    "raw": {},
}


@pytest.mark.parametrize("vp_type", VP_TYPES)
def test_kernel_matches_reference(vp_type):
    frames, boxes, box_count, frame_index, heatmap = _batch()
    args = (frames, vp_type, boxes, box_count, frame_index, heatmap)
    for kw in ({}, CUSTOM[vp_type]):
        out = render_vp(*args, backend="triton", **kw)
        ref = render_vp_reference(*args, **kw)
        assert out.dtype == torch.uint8 and out.shape == frames.shape and out.is_contiguous()
        assert torch.equal(out, ref), (vp_type, kw, int((out != ref).sum()))
        assert out.data_ptr() != frames.data_ptr()
    # auto on CPU is the reference path
    assert torch.equal(render_vp(*args), render_vp_reference(*args))


@pytest.mark.parametrize("vp_type", ["darken", "circle"])
def test_random_boxes_match(vp_type):
    g = torch.Generator().manual_seed(7)
    n, bmax = 4, 6
    frames = _frames(n, 24, 33, seed=3)[:, :, 1:]               # non-contiguous input
    xy = torch.rand(n, bmax, 2, generator=g) * 50 - 10
    wh = torch.rand(n, bmax, 2, generator=g) * torch.tensor([20.0, 14.0])
    wh[:, 0] = torch.tensor([[1.0, 1.0], [0.0, 3.0], [0.3, 0.2], [5.0, 5.0]])   # 1x1, thin, tiny
    boxes = torch.cat([xy, xy + wh], -1)
    box_count = torch.tensor([6, 1, 4, 9])                       # > Bmax reads all Bmax rows
    out = render_vp(frames, vp_type, boxes, box_count, backend="triton")
    assert torch.equal(out, render_vp_reference(frames, vp_type, boxes, box_count))


@pytest.mark.parametrize("vp_type", ["darken", "circle"])
def test_nan_corners_cover_nothing(vp_type):
    """A box with a NaN coordinate covers nothing (vp_common), in the kernel as in the
    reference, bit for bit: NaN in each of the four coordinates, both corners, all four, with
    and beside a finite box. (The kernel's default tl.minimum / tl.maximum dropped the NaN and
    kept the other corner: a darkened frame then kept pixels the reference darkens.)"""
    nan = float("nan")
    frames = _frames(8, 24, 33, seed=11)
    good = [4.0, 3.0, 20.0, 15.0]
    rows = [[nan, 3, 20, 15], [4, nan, 20, 15], [4, 3, nan, 15], [4, 3, 20, nan],
            [nan, nan, 20, 15], [4, 3, nan, nan], [nan] * 4, [20, 15, nan, 3]]
    boxes = torch.tensor([[r, good] if f % 2 else [r, [0.0] * 4] for f, r in enumerate(rows)],
                         dtype=torch.float32)
    box_count = torch.tensor([1, 2] * 4)            # even frames: the NaN box alone
    out = render_vp(frames, vp_type, boxes, box_count, backend="triton")
    ref = render_vp_reference(frames, vp_type, boxes, box_count)
    assert torch.equal(out, ref), int((out != ref).any(-1).sum())
    # what "covers nothing" means: the NaN box alone keeps (darken) or draws (circle) nothing,
    # and beside a finite box the frame renders as with the finite box alone
    alone = render_vp_reference(frames[::2], vp_type, boxes[::2, :1], torch.ones(4, dtype=torch.long))
    if vp_type == "darken":
        assert (alone != frames[::2]).all(-1).sum() > 0.9 * alone[..., 0].numel()
    else:
        assert torch.equal(alone, frames[::2])
    only_good = render_vp_reference(frames[1::2], vp_type, boxes[1::2, 1:], torch.ones(4, dtype=torch.long))
    assert torch.equal(ref[1::2], only_good)


def test_frame_number_edge_indices_match():
    idx = torch.tensor([0, 9, 10, 99, 123456, 98765432, -3])
    frames = _frames(len(idx), 24, 80, seed=5)
    for scale in (1, 2):
        out = render_vp(frames, "numpro", frame_index=idx, digit_scale=scale, backend="triton")
        assert torch.equal(out, render_vp_reference(frames, "numpro", frame_index=idx,
                                                    digit_scale=scale))
    # a label taller and wider than the frame is clipped
    tiny = _frames(2, 8, 12, seed=6)
    big = torch.tensor([123456, 8])
    out = render_vp(tiny, "numpro", frame_index=big, digit_scale=2, backend="triton")
    assert torch.equal(out, render_vp_reference(tiny, "numpro", frame_index=big, digit_scale=2))
    assert (out != tiny).any()


def test_heatmap_blend_edge_cases_match():
    frames = _frames(3, 20, 30, seed=9)
    hm = torch.rand(3, 50, 70, generator=torch.Generator().manual_seed(2))   # finer than the frame
    hm[0, :5, :5] = float("nan")
    hm[1, 10:20] = float("inf")
    hm[2] = -1.0
    for heat in (hm, hm[:, :1, :1], hm[:, :3, :2]):
        out = render_vp(frames, "api_prompt", heatmap=heat, backend="triton")
        assert torch.equal(out, render_vp_reference(frames, "api_prompt", heatmap=heat))


def test_empty_inputs():
    frames = _frames(0)
    boxes = torch.zeros(0, 2, 4)
    for t in VP_TYPES:
        out = render_vp(frames, t, boxes, torch.zeros(0, dtype=torch.long),
                        torch.zeros(0, dtype=torch.long), torch.zeros(0, 3, 3), backend="triton")
        assert out.shape == frames.shape
    f2 = _frames(2)
    no_box = torch.zeros(2, 0, 4)
    for t in ("darken", "circle"):
        assert torch.equal(render_vp(f2, t, no_box, backend="triton"), f2)


def test_bad_inputs():
    frames = _frames(2)
    with pytest.raises(ValueError, match="unknown visual prompt"):
        render_vp(frames, "blur")
    with pytest.raises(ValueError, match="uint8"):
        render_vp(frames.float(), "raw")
    with pytest.raises(ValueError, match="needs boxes"):
        render_vp(frames, "darken")
    with pytest.raises(ValueError, match="frame_index"):
        render_vp(frames, "numpro")
    with pytest.raises(ValueError, match="heatmap"):
        render_vp(frames, "api_prompt")


# --------------------------------------------------------------------------- semantics (reference)


def _centres(h, w):
    py = torch.arange(h, dtype=torch.float64)[:, None] + 0.5
    px = torch.arange(w, dtype=torch.float64)[None, :] + 0.5
    return px, py


def test_darken_semantics():
    frames, boxes, box_count, _, _ = _batch()
    pad = 2
    out = render_vp_reference(frames, "darken", boxes, box_count, pad=pad)
    px, py = _centres(H, W)
    dark = torch.floor(frames.double() * 0.3 + 0.5).to(torch.uint8)
    for f in range(frames.shape[0]):
        inside = torch.zeros(H, W, dtype=torch.bool)
        for b in boxes[f, :box_count[f]].double():
            x1, x2 = min(b[0], b[2]) - pad, max(b[0], b[2]) + pad
            y1, y2 = min(b[1], b[3]) - pad, max(b[1], b[3]) + pad
            inside |= (px >= x1) & (px <= x2) & (py >= y1) & (py <= y2)
        if box_count[f] == 0:
            assert torch.equal(out[f], frames[f])             # nothing to highlight: no-op
            continue
        assert torch.equal(out[f][inside], frames[f][inside])
        assert torch.equal(out[f][~inside], dark[f][~inside])
    # pad is a parameter: a bigger pad keeps more pixels
    kept = lambda p: int((render_vp_reference(frames, "darken", boxes, box_count, pad=p)  # noqa: E731
                          == frames).all(-1).sum())
    assert kept(0) < kept(4)
    assert default_pad(H, W) == 2 and default_pad(448, 448) == 4


def test_circle_semantics():
    frames = _frames(2, 60, 80, seed=4)
    boxes = torch.tensor([[[20, 15, 40, 35]], [[30, 20, 60, 30]]], dtype=torch.float32)
    t = 3.0
    out = render_vp_reference(frames, "circle", boxes, thickness=t)
    changed = (out != frames).any(-1)
    assert (out[changed] == RED).all()                          # pure red stroke
    px, py = _centres(60, 80)
    for f in range(2):
        x1, y1, x2, y2 = boxes[f, 0].double().tolist()
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        ai, bi = (x2 - x1) / 2 * math.sqrt(2), (y2 - y1) / 2 * math.sqrt(2)
        qi = ((px - cx) / ai) ** 2 + ((py - cy) / bi) ** 2
        qo = ((px - cx) / (ai + t)) ** 2 + ((py - cy) / (bi + t)) ** 2
        red = (out[f] == RED).all(-1)
        ring = (qi >= 1) & (qo <= 1)
        assert red.sum() > 0
        # red exactly on the ring, up to fp32 rounding at its edges
        assert not (red & ((qi < 1 - 1e-5) | (qo > 1 + 1e-5))).any()
        assert not (ring & ~red & (qi > 1 + 1e-5) & (qo < 1 - 1e-5)).any()
        # the object itself is never painted; beyond the ring nothing changes either
        in_box = (px >= x1) & (px <= x2) & (py >= y1) & (py <= y2)
        assert torch.equal(out[f][in_box], frames[f][in_box])
        assert torch.equal(out[f][qo > 1 + 1e-5], frames[f][qo > 1 + 1e-5])
        # ring is centred: left/right and top/bottom extents are symmetric about the centre
        cols = red.any(0).nonzero().squeeze(1)
        rows = red.any(1).nonzero().squeeze(1)
        assert abs((cols.min() + cols.max() + 1) / 2 - cx) <= 0.5
        assert abs((rows.min() + rows.max() + 1) / 2 - cy) <= 0.5
    assert default_thickness(448, 448) == 4 and default_thickness(H, W) == 2


def _glyph_at(out, f, scale, r, h, w):
    """The 7x5 bitmap of digit position r (from the right) read back from a rendered frame."""
    m = 2 * scale
    y0, x0 = h - m - 7 * scale, w - m - 5 * scale - r * 6 * scale
    cells = (out[f, y0:y0 + 7 * scale, x0:x0 + 5 * scale] == RED).all(-1)
    return cells[::scale, ::scale].to(torch.uint8)


def test_numpro_semantics():
    h, w = 36, 64
    frames = torch.zeros(12, h, w, 3, dtype=torch.uint8) + 40
    idx = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 305])
    for scale in (1, 2):
        out = render_vp_reference(frames, "numpro", frame_index=idx, digit_scale=scale)
        red = (out == RED).all(-1)
        changed = (out != frames).any(-1)
        assert torch.equal(red, changed)                        # only pure red pixels are drawn
        m = 2 * scale
        for f, v in enumerate(idx.tolist()):
            digits = str(v)
            area = torch.zeros(h, w, dtype=torch.bool)
            area[h - m - 7 * scale:h - m, w - m - (6 * len(digits) - 1) * scale:w - m] = True
            assert red[f].any() and not (red[f] & ~area).any()   # only in the bottom-right label
            for r, d in enumerate(reversed(digits)):
                assert torch.equal(_glyph_at(out, f, scale, r, h, w), DIGIT_GLYPHS[int(d)])
        # every digit renders differently
        masks = {tuple(red[f].flatten().tolist()) for f in range(10)}
        assert len(masks) == 10
    # a negative index draws nothing; default scale grows with the frame
    neg = render_vp_reference(frames[:1], "numpro", frame_index=torch.tensor([-1]))
    assert torch.equal(neg, frames[:1])
    assert default_digit_scale(448, 448) == 5 and default_digit_scale(H, W) == 1
    assert DIGIT_GLYPHS.shape == (10, 7, 5)


def test_raw_is_identity():
    frames, *_ = _batch()
    out = render_vp_reference(frames, "raw")
    assert torch.equal(out, frames) and out.data_ptr() != frames.data_ptr()


def test_api_prompt_semantics():
    frames, *_ = _batch()
    zeros = torch.zeros(5, 4, 4)
    assert torch.equal(render_vp_reference(frames, "api_prompt", heatmap=zeros), frames)
    for a in (0.5, 0.3):
        out = render_vp_reference(frames, "api_prompt", heatmap=torch.ones(5, 4, 4), alpha=a)
        col = torch.tensor([255.0, 255.0, 0.0], dtype=torch.float64)
        want = torch.floor(frames.double() * (1 - a) + col * a + 0.5)
        assert (out.double() - want).abs().max() <= 1     # fp32 vs fp64 rounding at .5 ties
        assert ((out.double() - want).abs() > 0).float().mean() < 0.01
    # the in-kernel upsampling is F.interpolate's bilinear, align_corners=False
    hm = torch.rand(2, 5, 7, generator=torch.Generator().manual_seed(0))
    for (h, w) in ((40, 56), (13, 9), (5, 7)):
        up = vp_heatmap._upsample_heatmap_reference(hm, h, w)
        want = F.interpolate(hm[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        torch.testing.assert_close(up, want, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- custom ops


def test_opcheck():
    frames, boxes, box_count, frame_index, heatmap = _batch()
    frames, boxes, box_count = frames[:2, :16, :20], boxes[:2], box_count[:2]
    frame_index, heatmap = frame_index[:2], heatmap[:2]
    utils = ("test_schema", "test_faketensor")
    ops = torch.ops.visioncoach
    torch.library.opcheck(ops.vp_darken.default, (frames, boxes, box_count, 0.3, 2.0), test_utils=utils)
    torch.library.opcheck(ops.vp_circle.default, (frames, boxes, box_count, 2.0), test_utils=utils)
    torch.library.opcheck(ops.vp_frame_number.default, (frames, frame_index, 1), test_utils=utils)
    torch.library.opcheck(ops.vp_heatmap_blend.default, (frames, heatmap, 0.5), test_utils=utils)


# --------------------------------------------------------------------------- hints


def test_hints_table():
    from visioncoach.config import VPConfig
    from visioncoach.vp import vp_types

    assert set(VP_TYPES) == set(vp_types()) == set(VPConfig().types)
    assert VP_HINTS["raw"] == ""
    assert all(VP_HINTS[t] for t in VP_TYPES if t != "raw")
    assert len(set(VP_HINTS.values())) == len(VP_HINTS)
    q = "What does the person pick up? (A) cup (B) phone"
    assert add_hint(q, "raw") == q
    for t in ("darken", "circle", "numpro", "api_prompt"):
        assert add_hint(q, t) == q + "\n" + VP_HINTS[t]
    assert "darken" in VP_HINTS["darken"] and "red circle" in VP_HINTS["circle"]
    with pytest.raises(ValueError):
        add_hint(q, "blur")


# --------------------------------------------------------------------------- CLIP heatmaps


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random CLIPModel + CLIP tokenizer + preprocessor config saved to disk."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    path = tmp_path_factory.mktemp("tiny_clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + "?.,'":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=3, num_attention_heads=2),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(
        '{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}')
    return path


def test_clip_relevance_maps(tiny_clip_dir):
    from visioncoach.vp import ClipRelevance

    rel = ClipRelevance.from_pretrained(tiny_clip_dir)
    assert rel.grid == 4 and rel.image_size == 32
    assert rel._mean.flatten().tolist() == [0.5, 0.5, 0.5]
    frames = _frames(3, seed=11)
    m = rel(frames, ["where is the red cup?"])
    assert m.shape == (3, 4, 4) and m.dtype == torch.float32
    assert m.min() >= 0 and m.max() <= 1
    assert torch.allclose(m.amin((1, 2)), torch.zeros(3)) and torch.allclose(m.amax((1, 2)), torch.ones(3))
    assert torch.equal(m, rel(frames, ["where is the red cup?"]))          # deterministic
    # reloading from the path gives the same maps; pre-tokenized input is accepted
    rel2 = ClipRelevance.from_pretrained(tiny_clip_dir)
    ids, mask = rel2.tokenize(["where is the red cup?"])
    assert torch.allclose(rel2(frames, input_ids=ids, attention_mask=mask), m, atol=1e-6)
    # frames of several samples, each with its own query
    qs = ["where is the red cup?", "a hand"]
    multi = rel(frames, qs, query_index=torch.tensor([0, 1, 0]))
    torch.testing.assert_close(multi[[0, 2]], m[[0, 2]], atol=1e-6, rtol=0)
    assert not torch.allclose(multi[1], m[1])
    # another layer gives other maps; a bad layer index is refused
    assert not torch.allclose(ClipRelevance.from_pretrained(tiny_clip_dir, layer=1)(frames, qs[:1]), m)
    with pytest.raises(ValueError):
        ClipRelevance.from_pretrained(tiny_clip_dir, layer=9)
    with pytest.raises(ValueError, match="query_index"):
        rel(frames, qs)
    # the maps feed the api_prompt blend
    out = render_vp(frames, "api_prompt", heatmap=m, backend="triton")
    assert torch.equal(out, render_vp_reference(frames, "api_prompt", heatmap=m))


def test_clip_missing_path(tmp_path):
    from visioncoach.vp import ClipRelevance

    with pytest.raises(FileNotFoundError):
        ClipRelevance.from_pretrained(tmp_path / "nope")


# --------------------------------------------------------------------------- GPU, real size


@pytest.mark.gpu
@pytest.mark.parametrize("vp_type", VP_TYPES)
def test_cuda_real_size_matches_reference(vp_type):
    dev = "cuda"
    n, h, w = 16, 448, 448
    frames = _frames(n, h, w, seed=21, device=dev)
    g = torch.Generator().manual_seed(22)
    xy = torch.rand(n, 3, 2, generator=g) * 500 - 30
    boxes = torch.cat([xy, xy + torch.rand(n, 3, 2, generator=g) * 200], -1)
    boxes[0, 0] = torch.tensor([100.0, 100.0, 101.0, 101.0])
    box_count = torch.randint(0, 4, (n,), generator=g)
    frame_index = torch.arange(1, n + 1) * 7
    heatmap = torch.rand(n, 24, 24, generator=g)
    args = (frames, vp_type, boxes.to(dev), box_count.to(dev), frame_index.to(dev), heatmap.to(dev))
    out = render_vp(*args)                                   # auto: Triton on CUDA
    assert out.is_cuda
    ref = render_vp_reference(*args)
    assert torch.equal(out, ref), int((out != ref).sum())
    # and the CPU reference agrees too
    cpu = render_vp_reference(*(a.cpu() if torch.is_tensor(a) else a for a in args))
    assert torch.equal(out.cpu(), cpu)
