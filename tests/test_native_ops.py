"""visioncoach::patchify_normalize (csrc/) against its PyTorch reference and transformers."""

import pytest
import torch

from visioncoach import ops

SHAPES = [(2, 28, 28), (4, 56, 84), (6, 84, 56), (2, 112, 28)]


def _frames(f, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (f, h, w, 3), dtype=torch.uint8, generator=g)


def _ulp(x: torch.Tensor) -> torch.Tensor:
    return torch.finfo(x.dtype).eps * x.abs().clamp_min(1.0)


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_fp32(shape):
    frames = _frames(*shape)
    got = ops.patchify_normalize(frames)
    ref = ops.patchify_normalize_reference(frames)
    f, h, w = shape
    assert got.shape == ((f // 2) * (h // 14) * (w // 14), 3 * 2 * 14 * 14)
    # The op folds /255, -mean, /std into one multiply-add: a few fp32 ulps from the reference.
    assert torch.all((got - ref).abs() <= 4 * _ulp(ref)), (got - ref).abs().max()


@pytest.mark.parametrize("f, h, w, patch, temporal, merge", [
    (3, 21, 35, 7, 1, 1),     # odd sizes, no merge, no temporal pairing
    (4, 36, 24, 6, 2, 2),     # even patch, several merge blocks per row
    (6, 30, 60, 5, 3, 2),     # temporal patch of 3
    (1, 16, 16, 16, 1, 1),    # one patch
])
def test_other_patch_geometries(f, h, w, patch, temporal, merge):
    # The CPU kernel walks patches row by row from the geometry alone: any patch, temporal and
    # merge size must give the reference's layout.
    frames = _frames(f, h, w, seed=2)
    kw = {"patch_size": patch, "temporal_patch_size": temporal, "merge_size": merge}
    got = ops.patchify_normalize(frames, **kw)
    ref = ops.patchify_normalize_reference(frames, **kw)
    assert got.shape == ref.shape == ((f // temporal) * (h // patch) * (w // patch), 3 * temporal * patch * patch)
    assert torch.all((got - ref).abs() <= 4 * _ulp(ref)), (got - ref).abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_output_is_rounded_fp32(dtype):
    frames = _frames(4, 56, 84)
    got = ops.patchify_normalize(frames, dtype=dtype)
    ref = ops.patchify_normalize_reference(frames)
    assert got.dtype == dtype
    # Rounding the fp32 value once to the output dtype: within half an ulp of that dtype
    # (plus the few fp32 ulps above).
    assert torch.all((got.float() - ref).abs() <= 0.5 * _ulp(ref.to(dtype)).float() + 4 * _ulp(ref))


def test_matches_transformers_processors():
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    frames = _frames(4, 56, 84, seed=1)
    vp = Qwen2VLVideoProcessor(size={"shortest_edge": 3136, "longest_edge": 56 * 84})
    out = vp(videos=[frames.permute(0, 3, 1, 2)], do_resize=False, do_sample_frames=False,
             return_tensors="pt")
    assert out["video_grid_thw"].tolist() == [[2, 4, 6]]
    ours = ops.patchify_normalize(frames)
    ref = out["pixel_values_videos"]
    assert torch.all((ours - ref).abs() <= 4 * _ulp(ref)), (ours - ref).abs().max()
    # A still image is its frame repeated over the temporal patch, as the image processor does.
    ip = Qwen2VLImageProcessor()
    img = ip(images=[frames[0].permute(2, 0, 1)], do_resize=False, return_tensors="pt")
    still = ops.patchify_normalize(frames[:1].repeat(2, 1, 1, 1))
    assert torch.all((still - img["pixel_values"]).abs() <= 4 * _ulp(still))


def test_non_contiguous_input():
    frames = _frames(4, 56, 56).permute(0, 2, 1, 3)  # a transposed view
    assert not frames.is_contiguous()
    ref = ops.patchify_normalize_reference(frames.contiguous())
    assert torch.all((ops.patchify_normalize(frames) - ref).abs() <= 4 * _ulp(ref))


@pytest.mark.parametrize("frames, message", [
    (torch.zeros(3, 28, 28, 3, dtype=torch.uint8), "not a multiple of temporal_patch_size"),
    (torch.zeros(2, 30, 28, 3, dtype=torch.uint8), "not a multiple of 28"),
    (torch.zeros(2, 28, 28, 4, dtype=torch.uint8), r"\[F, H, W, 3\]"),
    (torch.zeros(2, 28, 28, 3, dtype=torch.float32), "must be uint8"),
])
def test_bad_input_errors(frames, message):
    with pytest.raises(RuntimeError, match=message):
        ops.patchify_normalize(frames)


def test_opcheck_schema_fake_and_compile():
    frames = _frames(2, 28, 56)
    args = (frames, list(ops.QWEN_MEAN), list(ops.QWEN_STD), 14, 2, 2, torch.float32)
    torch.library.opcheck(torch.ops.visioncoach.patchify_normalize.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(ops.patchify_normalize, backend="eager", fullgraph=True)
    assert torch.equal(compiled(frames), ops.patchify_normalize(frames))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    assert ops.native_info()["cuda_usable"], ops.native_info()["cuda_error"]
    frames = _frames(16, 336, 448)
    got = ops.patchify_normalize(frames.cuda(), dtype=dtype).cpu()
    ref = ops.patchify_normalize(frames, dtype=dtype)
    assert torch.equal(got, ref)
