"""Frame sampling from video files: uniform frames plus the sample's annotated key frames.

CPU path: PyAV with seeking, sampled by *time*, never by frame index. Containers over-report
frame counts (the reference stack's decoder deadlocks on exactly that with
``linspace(0, n - 1, k)`` indices), frame rates vary, and streams end early; timestamps are the
one thing every decodable frame carries. Each target time takes the first frame whose
presentation interval covers it (the last frame for times past the real end), so a lying
header can cost accuracy in where the uniform grid falls, never a hang.

Only what the picked frames need is decoded. One demux pass (no decoding: about 1% of the
decoding time of the real clips) reads every packet's presentation time and the keyframes, so
the frame each target takes is known before decoding: decoding then seeks to the keyframe
before a picked frame whenever that keyframe lies ahead of what is decoded, and drops
non-reference frames that are not picked (``skip_frame="NONREF"`` per packet: nothing else
depends on them, so every picked frame is bit-identical to decoding the whole stream). Streams
whose packets lack timestamps fall back to decoding everything between targets closer than
``_SEEK_GAP_S``.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from visioncoach.data.clip import DecodedClip, DecodeError, open_video, stream_start_and_header, uniform_times

__all__ = ["DecodeError", "DecodedClip", "decode", "decode_pyav", "uniform_times"]


def _frame_time(frame, time_base) -> float | None:
    pts = frame.pts if frame.pts is not None else frame.dts
    return None if pts is None else float(pts * time_base)


# Without a packet index: seeking costs a keyframe's worth of decoding; below this gap
# decoding forward is cheaper.
_SEEK_GAP_S = 1.0


def decode_pyav(path: str | Path, nframes: int = 16, key_times: Sequence[float] = (),
                max_side: int | None = None) -> DecodedClip:
    """Decode ``nframes`` uniform frames plus key frames (by time) with PyAV.

    Uniform frames cover the whole video; key frames are added at their annotated times and
    the result is in time order. A target that lands on a frame already taken is not
    duplicated (a key time on a uniform frame marks that frame as key), so short videos give
    fewer than ``nframes`` frames. ``max_side`` downscales on decode (aspect kept).
    Raises ``DecodeError`` for missing, unreadable or frameless files.
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise DecodeError(path, "file not found")
    for kt in key_times:
        # Beyond a week a time cannot be a frame of a real video, and seeking there would
        # overflow the stream's int64 timestamps.
        if not math.isfinite(kt) or not 0 <= kt <= 7 * 24 * 3600:
            raise DecodeError(path, f"key frame time {kt!r} is not a number of seconds in [0, 604800]")
    container, stream = open_video(str(path), path)
    try:
        stream.thread_type = "AUTO"
        start, header = stream_start_and_header(container, stream)
        # The header may lie (truncated files, wrong metadata); it only places the grid.
        duration = header if header > 0 else _probe_duration(container, stream, start)
        if duration <= 0:
            raise DecodeError(path, "no decodable frames")
        targets = [(t, False) for t in uniform_times(duration, nframes)]
        targets += [(float(t), True) for t in key_times]
        targets.sort(key=lambda x: x[0])
        picked = _decode_at(container, stream, [start + t for t, _ in targets], max_side)
        if not picked:
            raise DecodeError(path, "no decodable frames")
    except av.error.FFmpegError as exc:
        raise DecodeError(path, f"decoder error ({exc})") from None
    finally:
        container.close()

    frames, times, keys = [], [], []
    for (t, is_key), (ft, arr) in zip(targets, picked):
        if times and abs(ft - start - times[-1]) < 1e-9:
            keys[-1] = keys[-1] or is_key  # same decoded frame: keep one, remember it is key
            continue
        frames.append(arr)
        times.append(ft - start)
        keys.append(is_key)
    last = max(ft for ft, _ in picked) - start
    return DecodedClip(
        frames=torch.from_numpy(np.stack(frames)),
        times=torch.tensor(times, dtype=torch.float64),
        is_key=torch.tensor(keys, dtype=torch.bool),
        duration=max(duration if header > 0 and last >= 0.5 * duration else last, last),
    )


def _probe_duration(container, stream, start: float) -> float:
    """Last frame time when the header has no duration (rare: raw streams)."""
    last = None
    for frame in _robust_frames(container, stream):
        t = _frame_time(frame, stream.time_base)
        if t is not None:
            last = t
    container.seek(0)
    return 0.0 if last is None else last - start + 1e-3


def _robust_frames(container, stream, picked_pts: set[int] | None = None):
    """Decoded frames, skipping packets the decoder rejects and stopping at a broken tail.

    Real files have corrupt packets and truncated ends; one bad packet must cost one frame,
    not the video. ``picked_pts``: the packets whose frames are wanted; the decoder drops the
    other packets' frames when no frame depends on them (non-reference frames).
    """
    import av

    codec = stream.codec_context
    packets = container.demux(stream)
    try:
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                return
            except av.error.FFmpegError:
                return  # unreadable container tail: what was decoded stands
            if picked_pts is not None:
                # Read per packet when it is submitted (frame threads copy it then), so
                # switching it between packets applies to exactly that packet.
                codec.skip_frame = "DEFAULT" if packet.pts in picked_pts else "NONREF"
            try:
                yield from packet.decode()
            except av.error.FFmpegError:
                continue
    finally:
        if picked_pts is not None:
            codec.skip_frame = "DEFAULT"


def _to_array(frame, max_side: int | None) -> np.ndarray:
    if max_side and max(frame.width, frame.height) > max_side:
        scale = max_side / max(frame.width, frame.height)
        frame = frame.reformat(width=max(2, round(frame.width * scale)),
                               height=max(2, round(frame.height * scale)))
    return frame.to_ndarray(format="rgb24")


@dataclass(frozen=True)
class _PacketIndex:
    """Presentation times of a stream's packets, from demuxing alone."""
    times: list[float]              # seconds (absolute stream time), sorted
    pts: list[int]                  # the packets' pts, in the order of ``times``
    key_times: list[float]          # keyframes' presentation times, sorted
    key_pts: list[int]              # the keyframes' pts, in the order of ``key_times``
    intact: bool                    # no corrupt packet, no unreadable tail


def _packet_index(container, stream) -> _PacketIndex | None:
    """The stream's packet times, or None when a packet has no pts (raw streams): then which
    frame is on screen at a time is only known by decoding."""
    import av

    tb = stream.time_base
    entries, keys = [], []
    intact = True
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue                     # the demuxer's end-of-stream marker
            if packet.pts is None:
                return None
            intact = intact and not packet.is_corrupt
            t = float(packet.pts * tb)       # as _frame_time computes a decoded frame's time
            entries.append((t, packet.pts))
            if packet.is_keyframe:
                keys.append((t, packet.pts))
    except av.error.FFmpegError:
        intact = False                       # unreadable tail: the packets before it stand
    if not entries:
        return None
    entries.sort()
    keys.sort()
    return _PacketIndex([t for t, _ in entries], [p for _, p in entries], [t for t, _ in keys],
                        [p for _, p in keys], intact)


def _picked_times(index: _PacketIndex, targets: list[float]) -> list[float]:
    """Per target, the presentation time of the frame on screen then (the first frame for a
    target before it)."""
    return [index.times[max(0, bisect.bisect_right(index.times, t) - 1)] for t in targets]


def _decode_at(container, stream, targets: list[float], max_side: int | None):
    """(frame time, RGB array) for each sorted target time (absolute stream seconds).

    The frame for time tau is the one on screen at tau: the last frame starting at or before
    tau (the first frame if tau precedes it, the last decodable one past the end). With a
    packet index (module docstring) decoding seeks to the keyframe before each picked frame
    when that keyframe is ahead of the decoded position and skips unpicked non-reference
    frames; without one it runs forward between nearby targets and seeks across gaps longer
    than ``_SEEK_GAP_S``.
    """
    tb = stream.time_base
    index = _packet_index(container, stream)
    picked = _picked_times(index, targets) if index is not None else None
    picked_pts = None
    # In a damaged stream a picked packet may not decode; the frame on screen instead is the
    # last one that does, maybe a non-reference one: decode them all.
    if index is not None and index.intact:
        wanted = set(picked)
        picked_pts = {p for t, p in zip(index.times, index.pts) if t in wanted}
    out: list[tuple[float, np.ndarray]] = []
    # id(frame) -> (frame, array); holding the frame keeps its id from being reused.
    arrays: dict[int, tuple[object, np.ndarray]] = {}
    it = None
    last = None      # (t, frame): latest decoded frame with t <= the current target
    ahead = None     # (t, frame): decoded frame past the current target, kept for the next one
    exhausted = False

    def pull():
        for frame in it:
            t = _frame_time(frame, tb)
            if t is not None:
                return (t, frame)
        return None

    def seek(ts: int):
        nonlocal it, last, ahead
        container.seek(max(0, ts), stream=stream, backward=True, any_frame=False)
        it = _robust_frames(container, stream, picked_pts)
        last = ahead = None

    for k, target in enumerate(targets):
        if not exhausted:
            pos = ahead[0] if ahead is not None else (last[0] if last is not None else -math.inf)
            if index is None:
                if it is None or target - pos > _SEEK_GAP_S:
                    seek(int(target / tb))
            else:
                key = bisect.bisect_right(index.key_times, picked[k]) - 1   # -1: none before it
                if it is None or (key >= 0 and index.key_times[key] > pos):
                    while True:
                        # A keyframe's own pts lands on it whether the demuxer indexes by pts
                        # or by dts (<= pts); one that lands past it anyway is stepped back.
                        # A keyframe that decodes to nothing (a broken file) is stepped back
                        # from too: decoding forward then finds the last decodable frame.
                        seek(index.key_pts[key] if key >= 0 else 0)
                        ahead = pull()
                        if key < 0 or (ahead is not None and ahead[0] <= picked[k]):
                            break
                        key -= 1
                    exhausted = ahead is None
            while True:
                if ahead is not None:
                    if ahead[0] > target:
                        break
                    last, ahead = ahead, None
                nxt = pull()
                if nxt is None:
                    exhausted = True
                    break
                ahead = nxt
        chosen = last if last is not None else ahead
        if chosen is None:
            break  # nothing decodable at or after this point
        frame_id = id(chosen[1])
        if frame_id not in arrays:
            arrays[frame_id] = (chosen[1], _to_array(chosen[1], max_side))
        out.append((chosen[0], arrays[frame_id][1]))
    return out


def decode(path: str | Path, nframes: int = 16, key_times: Sequence[float] = (),
           backend: str = "auto", max_side: int | None = None) -> DecodedClip:
    """Frames of one video (see ``decode_pyav``); ``backend``: ``auto``, ``pyav`` or ``dali``.

    ``dali`` decodes with NVIDIA DALI (``visioncoach.data.dali.decode_dali``, same frames and
    times as PyAV): NVDEC on the current CUDA device with frames returned on the GPU, or DALI's
    CPU decoder (VP8/VP9/MJPEG only, slower than PyAV) without CUDA. ``auto`` uses DALI on the
    GPU when CUDA is available and DALI imports, PyAV otherwise; when DALI fails on a file there
    (codec NVDEC lacks, a corrupt packet DALI will not skip) it falls back to PyAV, so ``auto``
    decodes whatever PyAV decodes. An explicit ``dali`` never falls back.
    """
    if backend not in ("auto", "pyav", "dali"):
        raise ValueError(f"decoder backend must be 'auto', 'pyav' or 'dali', got {backend!r}")
    from visioncoach.data.dali import dali_gpu_available, decode_dali

    if backend == "dali" or (backend == "auto" and dali_gpu_available()):

        device_id = torch.cuda.current_device() if torch.cuda.is_available() else None
        try:
            return decode_dali(path, nframes=nframes, key_times=key_times,
                               device_id=device_id, max_side=max_side)
        except DecodeError:
            if backend == "dali":
                raise
    return decode_pyav(path, nframes=nframes, key_times=key_times, max_side=max_side)
