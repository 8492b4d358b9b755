"""DALI decoding (visioncoach.data.dali) against the PyAV path, on synthetic clips whose frames
encode their index and on real footage.

Without CUDA only DALI's CPU decoder runs (VP8/VP9/MJPEG); the GPU (NVDEC) path is checked by
the ``gpu`` test. Pixel tolerance: both backends decode the same bitstream with libavcodec, so
the YUV planes are identical; they differ only in the YUV->RGB step. DALI's swscale upsamples
4:2:0 chroma bilinearly, PyAV's conversion repeats each chroma sample (nearest), so:
4:4:4 clips are bit-identical, flat grey 4:2:0 clips differ by at most 1 (rounding), and real
4:2:0 footage differs at colour edges only (measured on cup.mp4 transcoded to VP9: mean
|diff| 1.3, max 14-15, 1-1.5% of values off by more than 2; as MJPEG: mean 0.7, max 21).
"""


import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from visioncoach.data import dali as DL  # noqa: E402
from visioncoach.data import decode as D  # noqa: E402
import video_clips  # noqa: E402
from video_clips import frame_ids  # noqa: E402
from shared_data import VIDEOS  # noqa: E402

CUP = VIDEOS / "cup.mp4"   # H.264: NVDEC only


def write_clip(path, n, codec="libvpx-vp9", **kw):
    """DALI's CPU decoder reads VP8/VP9/MJPEG, not H.264: VP9 by default here."""
    return video_clips.write_clip(path, n, codec=codec, **kw)


def both(path, **kw):
    return D.decode(path, backend="pyav", **kw), D.decode(path, backend="dali", **kw)


def assert_same_frames(a, b, max_diff):
    """Same frames picked (times, keys, duration, identity) and pixels within ``max_diff``."""
    assert torch.equal(a.times, b.times) and torch.equal(a.is_key, b.is_key)
    assert a.duration == b.duration
    assert b.frames.dtype == torch.uint8 and b.frames.shape == a.frames.shape
    assert b.frames.device.type == "cpu"
    assert int((a.frames.int() - b.frames.int()).abs().max()) <= max_diff


CLIPS = {  # name -> (write_clip kwargs, max pixel diff vs PyAV)
    "vp9.webm": (dict(n=40, options={"g": "8"}), 1),                     # keyframe every 8
    "vp9_odd.mkv": (dict(n=40, size=(97, 61)), 1),
    "vp8.webm": (dict(n=40, codec="libvpx"), 1),
    "mjpeg420.avi": (dict(n=40, codec="mjpeg", pix_fmt="yuvj420p"), 1),
    "mjpeg444.mkv": (dict(n=40, codec="mjpeg", pix_fmt="yuvj444p", size=(97, 61)), 0),
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("dali")
    return {name: write_clip(d / name, **kw) for name, (kw, _) in CLIPS.items()}


@pytest.mark.parametrize("name", list(CLIPS))
def test_same_frames_as_pyav(clips, name):
    tol = CLIPS[name][1]
    for nframes, key_times in [(8, []), (4, [3.33, 0.05, 1.5]), (16, [0.55, 2.71]), (1, [])]:
        a, b = both(clips[name], nframes=nframes, key_times=key_times)
        assert_same_frames(a, b, tol)
        assert frame_ids(a) == frame_ids(b)
    b = D.decode(clips[name], nframes=8, backend="dali")
    assert frame_ids(b) == [int(10 * (4 * (i + 0.5) / 8)) for i in range(8)]


def test_key_frames_inserted_in_time_order(clips):
    clip = D.decode(clips["vp9.webm"], nframes=4, key_times=[3.33, 0.05, 1.5], backend="dali")
    ids = frame_ids(clip)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert [i for i, k in zip(ids, clip.is_key.tolist()) if k] == [0, 15, 33]
    clip = D.decode(clips["vp9.webm"], nframes=4, key_times=[0.55], backend="dali")
    assert frame_ids(clip) == [5, 15, 25, 35]
    assert clip.is_key.tolist() == [True, False, False, False]
    # Key times past the end map to the last frame.
    clip = D.decode(clips["vp9.webm"], nframes=2, key_times=[99.0], backend="dali")
    assert frame_ids(clip) == [10, 30, 39] and clip.is_key.tolist() == [False, False, True]


def test_bit_identical_without_chroma_subsampling(tmp_path):
    # Textured colour content, 4:4:4: no chroma upsampling, so DALI == PyAV exactly, which
    # shows the decoded bitstream is the same; only 4:2:0 -> RGB upsampling differs.
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    path = write_clip(tmp_path / "noise444.webm", 20, pix_fmt="yuv444p",
                      content=lambda i: np.roll(base, 3 * i, axis=1))
    a, b = both(path, nframes=6, key_times=[1.23])
    assert_same_frames(a, b, 0)


def test_real_footage_within_tolerance(tmp_path):
    """cup.mp4's first 2 s as VP9 4:2:0: same frames, pixels within the chroma tolerance."""
    import av

    path = tmp_path / "cup_vp9.webm"
    with av.open(str(CUP)) as inp, av.open(str(path), "w") as out:
        src = inp.streams.video[0]
        s = out.add_stream("libvpx-vp9", rate=10,
                           options={"deadline": "realtime", "cpu-used": "8", "g": "8"})
        s.width, s.height, s.pix_fmt = src.width // 2, src.height // 2, "yuv420p"
        for i, f in enumerate(inp.decode(src)):
            if i == 20:
                break
            for packet in s.encode(f.reformat(width=s.width, height=s.height)):
                out.mux(packet)
        for packet in s.encode():
            out.mux(packet)
    a, b = both(path, nframes=6, key_times=[0.55])
    assert_same_frames(a, b, 32)  # measured max 15, at colour edges
    diff = (a.frames.int() - b.frames.int()).abs().float()
    assert diff.mean() < 2.5 and (diff > 2).float().mean() < 0.05
    # Each DALI frame is closest to the PyAV frame at the same position (identity, not blur).
    dist = (b.frames[:, None].float() - a.frames[None].float()).abs().mean(dim=(2, 3, 4))
    assert dist.argmin(dim=1).tolist() == list(range(len(a)))


def test_short_video_gives_each_frame_once(tmp_path):
    path = write_clip(tmp_path / "short.webm", 3)
    a, b = both(path, nframes=16)
    assert frame_ids(b) == [0, 1, 2]
    assert_same_frames(a, b, 1)


def test_variable_frame_rate(tmp_path):
    # DALI indexes frames by their sorted pts, so VFR works: frame i is the i-th timestamp.
    pts = [0, 100, 150, 900, 1000, 1900]  # ms: bursts and gaps
    path = write_clip(tmp_path / "vfr.webm", len(pts), pts=pts)
    a, b = both(path, nframes=2, key_times=[0.12, 0.95])
    assert_same_frames(a, b, 1)
    shown = {round(t, 2): i for t, i in zip(b.times.tolist(), frame_ids(b))}
    assert shown[0.1] == 1 and shown[0.9] == 3 and b.is_key.sum() == 2


def test_lying_frame_count_and_truncated_tail(tmp_path):
    # moov first, mdat truncated: the header claims 40 frames, ~26 exist, the last is cut.
    path = write_clip(tmp_path / "full.mp4", 40, size=(128, 96), codec="mjpeg",
                      pix_fmt="yuvj420p", container_options={"movflags": "faststart"})
    data = path.read_bytes()
    mdat = data.index(b"mdat") - 4
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: mdat + 2 * (len(data) - mdat) // 3])
    a, b = both(cut, nframes=16, key_times=[3.9])
    assert_same_frames(a, b, 1)
    ids = frame_ids(b)
    assert ids == sorted(ids) and 2 <= len(ids) and ids[-1] < 30 and b.is_key[-1]


def test_max_side(clips):
    a, b = both(clips["mjpeg444.mkv"], nframes=4, max_side=48)
    assert b.frames.shape == a.frames.shape and max(b.frames.shape[1:3]) == 48
    assert frame_ids(b) == frame_ids(a) and torch.equal(a.times, b.times)
    assert int((a.frames.int() - b.frames.int()).abs().max()) <= 2  # flat frames: resize ~exact


def test_h264_on_cpu_is_a_clear_error():
    with pytest.raises(D.DecodeError, match="codec 'h264' is not supported by DALI's CPU") as err:
        D.decode(CUP, backend="dali")
    assert err.value.path == str(CUP)


@pytest.mark.parametrize("content", [b"", b"\x00" * 1000, b"not a video at all" * 50])
def test_corrupt_file_is_a_clear_error(tmp_path, content):
    bad = tmp_path / "bad.webm"
    bad.write_bytes(content)
    with pytest.raises(D.DecodeError) as err:
        D.decode(bad, backend="dali")
    assert err.value.path == str(bad)


def test_missing_file_and_bad_key_time(tmp_path, clips):
    with pytest.raises(D.DecodeError, match="file not found"):
        D.decode(tmp_path / "nope.webm", backend="dali")
    with pytest.raises(D.DecodeError, match="key frame time"):
        D.decode(clips["vp9.webm"], key_times=[-1.0], backend="dali")


@pytest.fixture()
def mid_corrupt(tmp_path):
    """An MJPEG clip whose 11th packet is garbage: PyAV skips that frame, DALI fails."""
    import av

    path = write_clip(tmp_path / "mid.avi", 20, codec="mjpeg", pix_fmt="yuvj420p")
    data = bytearray(path.read_bytes())
    with av.open(str(path)) as c:
        pos, size = [(p.pos, p.size) for p in c.demux(c.streams.video[0]) if p.size][10]
    data[pos + 2: pos + size - 2] = bytes([0xFF, 0x00]) * ((size - 4) // 2) + b"\0" * (size % 2)
    bad = tmp_path / "midbad.avi"
    bad.write_bytes(bytes(data))
    return bad


def test_decoder_failure_is_decode_error_and_pipeline_recovers(mid_corrupt, clips):
    with pytest.raises(D.DecodeError, match="DALI decoder error .*Failed to send packet"):
        D.decode(mid_corrupt, nframes=20, backend="dali")
    # The failed pipeline was dropped; the next call rebuilds and works.
    assert frame_ids(D.decode(clips["vp9.webm"], nframes=4, backend="dali")) == [5, 15, 25, 35]


def test_pipeline_is_built_once(clips, monkeypatch):
    builds = []
    real = DL._build_pipeline
    monkeypatch.setattr(DL, "_build_pipeline", lambda dev: builds.append(dev) or real(dev))
    monkeypatch.setattr(DL, "_pipelines", {})
    for name in ("vp9.webm", "mjpeg420.avi", "vp8.webm", "vp9.webm"):
        D.decode(clips[name], nframes=3, backend="dali")
    assert builds == [None]


def test_auto_uses_pyav_without_cuda(clips, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: auto uses DALI")
    assert not DL.dali_gpu_available()

    def no_dali(*a, **k):
        raise AssertionError("auto must not use DALI without CUDA")

    monkeypatch.setattr(DL, "decode_dali", no_dali)
    clip = D.decode(CUP, nframes=4)  # H.264: only PyAV decodes it here
    assert len(clip) == 4 and clip.frames.device.type == "cpu"
    a = D.decode(clips["vp9.webm"], nframes=4, backend="pyav")
    assert torch.equal(D.decode(clips["vp9.webm"], nframes=4).frames, a.frames)


def test_auto_falls_back_to_pyav_when_dali_fails(clips, mid_corrupt, monkeypatch):
    # Pretend CUDA + DALI are available; without CUDA the DALI call runs on the CPU decoder.
    monkeypatch.setattr(DL, "dali_gpu_available", lambda: True)
    calls = []
    real = DL.decode_dali
    monkeypatch.setattr(DL, "decode_dali", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    assert frame_ids(D.decode(clips["vp9.webm"], nframes=4)) == [5, 15, 25, 35]
    assert len(D.decode(CUP, nframes=4)) == 4            # H.264: DALI-CPU refuses, PyAV decodes
    ids = frame_ids(D.decode(mid_corrupt, nframes=20))   # corrupt packet: PyAV skips frame 10
    assert ids == [i for i in range(20) if i != 10]
    assert calls == [clips["vp9.webm"], CUP, mid_corrupt]
    with pytest.raises(D.DecodeError):                    # explicit dali never falls back
        D.decode(mid_corrupt, nframes=20, backend="dali")


@pytest.mark.gpu
def test_gpu_nvdec_matches_pyav():
    """NVDEC path: frames stay on CUDA; same frames as PyAV (colour conversion differs)."""
    a = D.decode(CUP, nframes=16, key_times=[1.0, 5.5], backend="pyav")
    b = D.decode(CUP, nframes=16, key_times=[1.0, 5.5], backend="dali")
    assert b.frames.is_cuda and b.frames.dtype == torch.uint8
    assert b.frames.shape == a.frames.shape
    assert torch.equal(a.times, b.times) and torch.equal(a.is_key, b.is_key)
    diff = (a.frames.int() - b.frames.cpu().int()).abs().float()
    assert diff.mean() < 4.0
    dist = (b.frames.cpu()[:, None].float() - a.frames[None].float()).abs().mean(dim=(2, 3, 4))
    assert dist.argmin(dim=1).tolist() == list(range(len(a)))
    auto = D.decode(CUP, nframes=16, key_times=[1.0, 5.5])
    assert auto.frames.is_cuda and torch.equal(auto.times, b.times)
