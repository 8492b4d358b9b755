"""bench/bench_video_pipeline.py: both sides do the same job (same frames, same model inputs up
to the normalisation's rounding), the synthetic clips are deterministic and cached, and the
stage breakdown accounts for ours' decode."""

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))   # the bench script imports _common by name, as when run

import bench_video_pipeline as B


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory):
    """4 s at 10 fps, 320x240, libx264 defaults (B-frames): a constant-frame-rate clip, where
    the user's index arithmetic picks the frames on screen at the job's times."""
    saved = dict(B.SYNTHETIC), B.SYNTHETIC_SIZE
    B.SYNTHETIC["tiny"], B.SYNTHETIC_SIZE = (4, 10), (320, 240)
    try:
        yield B.synthetic_clip("tiny", directory=tmp_path_factory.mktemp("clips"))
    finally:
        B.SYNTHETIC.clear()
        B.SYNTHETIC.update(saved[0])
        B.SYNTHETIC_SIZE = saved[1]


@pytest.fixture(scope="module")
def bench_processor(tokenizer):
    from visioncoach.models.tiny import build_processor

    return build_processor(tokenizer, min_pixels=B.MIN_PIXELS, max_pixels=B.MAX_PIXELS)


def _ulp(x: torch.Tensor) -> torch.Tensor:
    return torch.finfo(x.dtype).eps * x.abs().clamp_min(1.0)


@pytest.mark.parametrize("vp", [False, True])
def test_both_sides_make_the_same_model_inputs(small_clip, bench_processor, vp):
    uniform, key_times, duration = B.header_times(small_clip)
    ours = B.ours(small_clip, bench_processor.tokenizer, key_times, torch.device("cpu"), vp=vp)
    base = B.baseline(small_clip, bench_processor, sorted(uniform + key_times), duration)
    B.check_same_job("tiny", ours, base)
    (inputs, n), (hf, m) = ours, base
    assert n == m == B.NFRAMES + 2
    assert torch.equal(inputs.tensors["image_grid_thw"], hf["image_grid_thw"])
    assert torch.equal(inputs.tensors["input_ids"], hf["input_ids"])   # same frame times in the text
    got, ref = inputs.tensors["pixel_values"], hf["pixel_values"]
    # Same decoded pixels, the same bicubic+antialias resize; the normalisation differs by the
    # op's folded multiply-add: a few fp32 ulps (the bound of tests/test_native_ops.py).
    close = ((got - ref).abs() <= 4 * _ulp(ref)).all(dim=1)                    # [patches]
    per_frame = close.view(n, -1).all(dim=1)                                   # [frames]
    key_frames = torch.tensor([i for i, t in enumerate(sorted(uniform + key_times)) if t in key_times])
    if not vp:
        assert per_frame.all()
    else:   # VP changes the key frames only
        assert not per_frame[key_frames].any()
        per_frame[key_frames] = True
        assert per_frame.all()


def test_a_different_job_is_refused(small_clip, bench_processor):
    uniform, key_times, duration = B.header_times(small_clip)
    ours = B.ours(small_clip, bench_processor.tokenizer, key_times, torch.device("cpu"), vp=False)
    fewer = B.baseline(small_clip, bench_processor, sorted(uniform)[:-1], duration)
    with pytest.raises(RuntimeError, match="different jobs: 18 vs 15 frames"):
        B.check_same_job("tiny", ours, fewer)


def test_synthetic_clip_is_deterministic_moving_and_cached(small_clip):
    import av

    with av.open(str(small_clip)) as c:
        s = c.streams.video[0]
        assert (s.width, s.height, s.frames, s.average_rate) == (320, 240, 40, 10)
    first = [f.copy() for _, f in zip(range(2), B._synthetic_frames(4, 10, (320, 240)))]
    again = [f for _, f in zip(range(2), B._synthetic_frames(4, 10, (320, 240)))]
    assert all((a == b).all() for a, b in zip(first, again))
    assert (first[0] != first[1]).mean() > 0.5          # the pan moves most pixels
    stamp = small_clip.stat().st_mtime_ns
    assert B.synthetic_clip("tiny", directory=small_clip.parent) == small_clip
    assert small_clip.stat().st_mtime_ns == stamp         # read from the cache, not rewritten


def test_breakdown_accounts_for_the_decode(small_clip, bench_processor):
    uniform, key_times, duration = B.header_times(small_clip)
    b = B.breakdown(small_clip, bench_processor, key_times, sorted(uniform + key_times), duration,
                    torch.device("cpu"), repeats=1)
    assert 0 < b["decoded"] < b["total_frames"] == 40     # the planned decode skipped frames
    assert b["base_decoded"] == 39                        # the user's loop stops after the last
    for stage in ("index", "decode", "rgb", "resize", "vp", "patchify", "base_decode", "base_processor"):
        assert b[stage] > 0, stage
    # The instrumentation is removed again.
    from visioncoach.data import decode as D

    assert D._packet_index.__module__ == D.__name__ and D._robust_frames.__module__ == D.__name__


def test_unknown_clip_name_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown clip"):
        B.clip_paths(["no-such-clip.mp4"])
