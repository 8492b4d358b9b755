"""Frame sampling (visioncoach.data.decode) on synthetic clips whose frames encode their index,
and on the real sample videos."""


import numpy as np
import pytest
import torch

from visioncoach.data import decode as D
from video_clips import STEP, frame_ids, write_clip
from shared_data import VIDEOS  # noqa: E402


@pytest.fixture(scope="module")
def clip40(tmp_path_factory):
    # 40 frames at 10 fps with a keyframe every 8 frames, so seeking is exercised.
    return write_clip(tmp_path_factory.mktemp("v") / "c40.mp4", 40, options={"g": "8"})


def test_uniform_frames_are_the_ones_on_screen(clip40):
    clip = D.decode(clip40, nframes=8)
    # Centres of 8 segments of 4 s: 0.25, 0.75, ...; frame on screen at t is floor(10 t).
    assert frame_ids(clip) == [int(10 * (4 * (i + 0.5) / 8)) for i in range(8)]
    assert torch.allclose(clip.times, torch.tensor(frame_ids(clip), dtype=torch.float64) / 10)
    assert clip.frames.dtype == torch.uint8 and clip.frames.shape == (8, 48, 64, 3)
    assert not clip.is_key.any()
    assert clip.duration == pytest.approx(4.0, abs=0.11)


def test_key_frames_inserted_in_time_order(clip40):
    clip = D.decode(clip40, nframes=4, key_times=[3.33, 0.05, 1.5])
    ids = frame_ids(clip)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert [i for i, k in zip(ids, clip.is_key.tolist()) if k] == [0, 15, 33]
    # A key time on a uniform frame (0.5 s = frame 5, uniform centre of 4 segments) is not
    # duplicated: the frame is marked key instead.
    clip = D.decode(clip40, nframes=4, key_times=[0.55])
    assert frame_ids(clip) == [5, 15, 25, 35] and clip.is_key.tolist() == [True, False, False, False]


def _count_decoded(monkeypatch) -> list[int]:
    """A one-element list that counts the frames the decoder outputs from now on."""
    count, inner = [0], D._robust_frames

    def counted(*args, **kwargs):
        for frame in inner(*args, **kwargs):
            count[0] += 1
            yield frame

    monkeypatch.setattr(D, "_robust_frames", counted)
    return count


def _sequential(monkeypatch, path, **kw):
    """decode() without the packet index: no skipped frames, one forward pass."""
    with monkeypatch.context() as m:
        m.setattr(D, "_packet_index", lambda container, stream: None)
        m.setattr(D, "_SEEK_GAP_S", 1e9)
        return D.decode(path, **kw)


def test_seeking_and_sequential_decoding_agree(clip40, monkeypatch):
    planned = D.decode(clip40, nframes=16, key_times=[2.71])
    seq = _sequential(monkeypatch, clip40, nframes=16, key_times=[2.71])
    monkeypatch.setattr(D, "_packet_index", lambda container, stream: None)
    monkeypatch.setattr(D, "_SEEK_GAP_S", 0.0)   # without an index: seek for every target
    seek = D.decode(clip40, nframes=16, key_times=[2.71])
    for clip in (planned, seek):
        assert torch.equal(clip.frames, seq.frames) and torch.equal(clip.times, seq.times)
    assert frame_ids(seq) == sorted(set([int(10 * 4 * (i + 0.5) / 16) for i in range(16)] + [27]))


def _moving(i, w=96, h=64):
    # Grey level STEP * i (the frame's id) plus a moving bar: motion gives the encoder reasons
    # for B-frames, the mean stays within +-3 of the id's grey.
    arr = np.full((h, w, 3), STEP * i, dtype=np.uint8)
    x = (5 * i) % (w - 8)
    arr[:, x:x + 8] = np.clip(arr[:, x:x + 8].astype(int) + 24, 0, 255).astype(np.uint8)
    arr[:, (x + w // 2) % (w - 8):(x + w // 2) % (w - 8) + 8] -= min(24, STEP * i)
    return arr


def _on_screen_reference(path, nframes, key_times):
    """Plain PyAV: decode every frame in order, then per target time (uniform grid of the
    header's duration + key times) the last frame starting at or before it (else the first).
    -> (times, frames) of the distinct picked frames in time order."""
    import av

    from visioncoach.data.clip import stream_start_and_header, uniform_times

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        start, header = stream_start_and_header(c, s)
        decoded = [(float(f.pts * s.time_base), f.to_ndarray(format="rgb24")) for f in c.decode(s)]
    decoded.sort(key=lambda x: x[0])
    picked = []
    for target in sorted(uniform_times(header, nframes) + list(key_times)):
        before = [i for i, (t, _) in enumerate(decoded) if t <= start + target]
        picked.append(before[-1] if before else 0)
    picked = sorted(set(picked))
    return ([decoded[i][0] - start for i in picked],
            torch.from_numpy(np.stack([decoded[i][1] for i in picked])))


@pytest.mark.parametrize("codec, suffix", [("libx264", "mp4"), ("libx265", "mkv"), ("mpeg4", "avi")])
def test_skipping_unpicked_frames_is_bit_identical(tmp_path, monkeypatch, codec, suffix):
    # B-frames (non-reference: the decoder may drop them) and short GOPs (seeks between
    # targets; AVI indexes keyframes by dts, so a seek to a time can land past it); several
    # grids, key frames between, on and before frames.
    opts = {"g": "12", "bf": "3"} if codec != "libx265" else {"x265-params": "keyint=12:bframes=3:log-level=0"}
    path = write_clip(tmp_path / f"b.{suffix}", 42, fps=12, size=(96, 64), codec=codec, options=opts,
                      content=_moving)
    for nframes, key_times in [(16, [1.04, 2.71]), (5, []), (0, [0.0, 3.49]), (40, [0.5])]:
        count = _count_decoded(monkeypatch)
        clip = D.decode(path, nframes=nframes, key_times=key_times)
        monkeypatch.undo()
        times, frames = _on_screen_reference(path, nframes, key_times)
        assert clip.times.tolist() == pytest.approx(times, abs=1e-9)
        assert torch.equal(clip.frames, frames)
        if nframes == 5:
            assert count[0] < 42   # frames no target needs were not decoded


def test_short_video_gives_each_frame_once(tmp_path):
    clip = D.decode(write_clip(tmp_path / "short.mp4", 3), nframes=16)
    assert frame_ids(clip) == [0, 1, 2]


def test_variable_frame_rate(tmp_path):
    pts = [0, 100, 150, 900, 1000, 1900]  # ms: bursts and gaps
    path = write_clip(tmp_path / "vfr.mkv", len(pts), pts=pts)
    clip = D.decode(path, nframes=2, key_times=[0.12, 0.95])
    # Targets 0.12 -> frame at 0.1; 0.95 -> frame at 0.9; uniform centres of the real duration.
    shown = {round(t, 2): i for t, i in zip(clip.times.tolist(), frame_ids(clip))}
    assert shown[0.1] == 1 and shown[0.9] == 3
    assert clip.is_key.sum() == 2


def test_lying_frame_count_never_hangs(tmp_path):
    # moov first (faststart) then a truncated mdat: the header claims 40 frames, about half exist.
    path = write_clip(tmp_path / "full.mp4", 40, size=(128, 96), options={"g": "5"},
                      container_options={"movflags": "faststart"})
    data = path.read_bytes()
    mdat = data.index(b"mdat") - 4  # top-level box: 4-byte size, then the type
    assert data.index(b"moov") < mdat
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: mdat + 2 * (len(data) - mdat) // 3])
    import av

    with av.open(str(cut)) as c:
        assert c.streams.video[0].frames == 40  # the lie
    clip = D.decode(cut, nframes=16, key_times=[3.9])
    ids = frame_ids(clip)
    assert ids == sorted(ids) and len(ids) >= 2 and ids[-1] < 30
    assert clip.is_key.any()  # the key time past the real end maps to the last decodable frame


@pytest.mark.parametrize("content", [b"", b"\x00" * 1000, b"not a video at all" * 50])
def test_corrupt_file_is_a_clear_error(tmp_path, content):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(content)
    with pytest.raises(D.DecodeError) as err:
        D.decode(bad)
    assert str(bad) in str(err.value) and err.value.path == str(bad)


def test_missing_file_and_bad_key_time(tmp_path, clip40):
    with pytest.raises(D.DecodeError, match="file not found"):
        D.decode(tmp_path / "nope.mp4")
    with pytest.raises(D.DecodeError, match="key frame time"):
        D.decode(clip40, key_times=[float("nan")])
    with pytest.raises(ValueError, match="backend"):
        D.decode(clip40, backend="decord")


def test_odd_resolution_and_max_side(tmp_path):
    path = write_clip(tmp_path / "odd.avi", 10, size=(97, 61), codec="mjpeg", pix_fmt="yuvj444p")
    clip = D.decode(path, nframes=4)
    assert clip.frames.shape == (4, 61, 97, 3)
    small = D.decode(path, nframes=4, max_side=48)
    assert max(small.frames.shape[1:3]) == 48
    assert frame_ids(small) == frame_ids(clip)


@pytest.mark.parametrize("name, size, duration", [("bikes.mp4", (272, 640), 10.0), ("cup.mp4", (480, 640), 8.1)])
def test_real_videos(name, size, duration):
    clip = D.decode(VIDEOS / name, nframes=16, key_times=[1.0, 5.5])
    assert clip.frames.shape[1:] == (*size, 3) and 16 <= len(clip) <= 18
    assert torch.all(clip.times[1:] > clip.times[:-1])
    assert clip.times[-1] < duration and clip.is_key.sum() == 2
    assert clip.duration == pytest.approx(duration, abs=0.1)
    # Distinct moments of real footage differ.
    assert not torch.equal(clip.frames[0], clip.frames[-1])


@pytest.mark.parametrize("name", ["bikes.mp4", "cup.mp4"])
def test_real_videos_equal_decoding_every_frame(name, monkeypatch):
    count = _count_decoded(monkeypatch)
    clip = D.decode(VIDEOS / name, nframes=16, key_times=[1.0, 5.5])
    monkeypatch.undo()
    times, frames = _on_screen_reference(VIDEOS / name, 16, [1.0, 5.5])
    assert clip.times.tolist() == pytest.approx(times, abs=1e-9) and torch.equal(clip.frames, frames)
    assert count[0] < {"bikes.mp4": 250, "cup.mp4": 217}[name]   # seeks and skips did save work
