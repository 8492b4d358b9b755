"""NVIDIA DALI video decoding: the same frames as ``decode.decode_pyav``, decoded by DALI.

On a GPU the frames come from NVDEC (``fn.decoders.video`` with ``device="mixed"``) and stay on
the GPU: the DALI output is handed to torch through DLPack without a copy. Without CUDA the CPU
variant of the same operator (libavcodec inside DALI) runs; it decodes only VP8, VP9 and MJPEG
and is slower than PyAV, so ``decode(backend="auto")`` only picks DALI when CUDA is available.

Frame selection. ``fn.decoders.video(encoded, frames=idx)`` takes a per-sample list of frame
*indices* (any order, duplicates allowed); DALI builds a seek index of the stream's packets
sorted by pts (``build_index=True``), seeks to the nearest keyframe before a requested frame and
decodes forward, so asking for the k sampled indices directly is the cheapest selection the
operator offers (no contiguous range is decoded and gathered in Python). Indices come from
timestamps, exactly as in ``decode.py``: the stream's packets are demuxed with PyAV (no
decoding), their pts (dts when pts is missing) sorted -- the same list DALI indexes -- and each
target time tau takes the last frame starting at or before tau (the first frame before it, the
last one past the end). DALI and PyAV therefore return the same frames, and the header's frame
count is never trusted. Indices are requested in increasing order so DALI only seeks forward.

One pipeline (per process and device) serves every file: the encoded bytes and the indices are
fed with ``fn.external_source`` / ``Pipeline.feed_input``. A DALI error leaves the pipeline
unusable ("Current pipeline object is no longer valid"), so the failing pipeline is dropped and
rebuilt on the next call.

Known differences from the PyAV path: a packet the decoder rejects in the middle of the stream
fails the whole DALI decode (PyAV skips that one frame) -- ``decode(backend="auto")`` falls back
to PyAV on any DALI ``DecodeError``; packets PyAV flags corrupt (a truncated tail) are never
selected; ``max_side`` is applied after decoding (bilinear, antialiased torch resize) instead of
by swscale, so downscaled pixels differ slightly from PyAV's.
"""

from __future__ import annotations

import bisect
import io
import math
import os
import re
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from visioncoach.data.clip import DecodedClip, DecodeError, open_video, stream_start_and_header, uniform_times

# Codecs each fn.decoders.video backend decodes (DALI 2.4 operator docs). The CPU list is
# checked before running DALI, which otherwise only says "Failed to create video decoder".
CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
GPU_CODECS = frozenset({"vp8", "vp9", "mjpeg", "h264", "hevc", "av1", "mpeg4"})

_pipelines: dict[tuple[int, int | None], tuple[object, threading.Lock]] = {}
# (pid, device) -> reason a pipeline could not be built there (e.g. CUDA unusable in a forked
# DataLoader worker); remembered so every later call fails fast instead of rebuilding.
_build_failures: dict[tuple[int, int | None], str] = {}
_pipelines_lock = threading.Lock()


def dali_available() -> bool:
    """Whether nvidia.dali imports (says nothing about CUDA)."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # ImportError, or a broken install failing on load
        return False
    return True


def dali_gpu_available() -> bool:
    """CUDA is usable and nvidia.dali imports: the condition for ``backend="auto"`` to use DALI."""
    return torch.cuda.is_available() and dali_available()


def _build_pipeline(device_id: int | None):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=max(1, min(4, os.cpu_count() or 1)),
                  device_id=device_id, prefetch_queue_depth=1, exec_dynamic=True)
    def video_frames():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        # pad_mode="none": an index past the frames DALI indexed is an error, never a padded
        # black frame.
        return fn.decoders.video(encoded, device="cpu" if device_id is None else "mixed",
                                 frames=frames, pad_mode="none")

    pipe = video_frames()
    pipe.build()
    return pipe


def _pipeline(device_id: int | None):
    """The cached pipeline (and its lock) for this process and device; built on first use.

    Keyed by pid too: a pipeline built before a DataLoader forks is not usable in the child.
    """
    key = (os.getpid(), device_id)
    with _pipelines_lock:
        if key in _build_failures:
            raise RuntimeError(_build_failures[key])
        if key not in _pipelines:
            try:
                pipe = _build_pipeline(device_id)
            except Exception as exc:
                _build_failures[key] = _summarize(exc)
                raise
            _pipelines[key] = (pipe, threading.Lock())
        return _pipelines[key]


def _drop_pipeline(device_id: int | None, pipe) -> None:
    key = (os.getpid(), device_id)
    with _pipelines_lock:
        if key in _pipelines and _pipelines[key][0] is pipe:
            del _pipelines[key]


def _summarize(exc: BaseException) -> str:
    """The operator's own message out of DALI's multi-line pipeline error."""
    msg = str(exc)
    m = re.search(r"encountered:\s*(.*?)\s*(?:C\+\+ context:|Current pipeline object|$)", msg, re.S)
    core = m.group(1) if m else msg
    core = re.sub(r'^Assert on ".*?" failed:\s*', "", core.strip(), flags=re.S)
    core = " ".join(core.split())
    return (core[:300] + "...") if len(core) > 300 else core or type(exc).__name__


def _stream_index(path: Path, data: bytes, device_id: int | None):
    """Container facts and the per-frame time list DALI indexes, from demuxing only.

    Returns (start, header, frame_times, good): frame_times are the sorted packet timestamps in
    seconds (DALI's frame i is frame_times[i]), good[i] is False for packets PyAV flags corrupt.
    """
    import av

    container, stream = open_video(io.BytesIO(data), path)
    try:
        # Canonical codec id name ("av1" even when PyAV's decoder is libdav1d).
        cc = stream.codec_context
        codec = getattr(cc.codec, "canonical_name", None) or cc.name
        allowed = CPU_CODECS if device_id is None else GPU_CODECS
        if codec not in allowed:
            where = "CPU" if device_id is None else "GPU (NVDEC)"
            raise DecodeError(path, f"codec {codec!r} is not supported by DALI's {where} video "
                                    f"decoder (supported: {', '.join(sorted(allowed))}); "
                                    "use backend='pyav'")
        tb = stream.time_base
        start, header = stream_start_and_header(container, stream)
        entries = []
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.error.FFmpegError:
                break  # unreadable container tail: DALI's index stops there too
            ts = packet.pts if packet.pts is not None else packet.dts
            if ts is None:
                if packet.size == 0:
                    continue  # PyAV's end-of-stream flush packet, not in the file
                raise DecodeError(path, "a packet without timestamps: DALI cannot index the stream")
            entries.append((float(ts * tb), packet.size > 0 and not packet.is_corrupt))
    except av.error.FFmpegError as exc:
        raise DecodeError(path, f"demuxer error ({exc})") from None
    finally:
        container.close()
    entries.sort(key=lambda e: e[0])  # DALI sorts its index by pts the same way (stable)
    return start, header, [t for t, _ in entries], [g for _, g in entries]


def _resize(frames: torch.Tensor, max_side: int | None) -> torch.Tensor:
    """``decode._to_array``'s downscale rule (aspect kept, sides >= 2) on a [F,H,W,3] batch."""
    h, w = int(frames.shape[1]), int(frames.shape[2])
    if not max_side or max(w, h) <= max_side:
        return frames
    scale = max_side / max(w, h)
    size = (max(2, round(h * scale)), max(2, round(w * scale)))
    x = frames.permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True,
                                        align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def decode_dali(path: str | Path, nframes: int = 16, key_times: Sequence[float] = (),
                device_id: int | None = None, max_side: int | None = None) -> DecodedClip:
    """``decode_pyav``'s sampling (uniform + key frames by time, merged), decoded by DALI.

    ``device_id=None`` runs DALI's CPU decoder (VP8/VP9/MJPEG only) and returns CPU frames.
    With a CUDA ``device_id`` the mixed (NVDEC) decoder runs and the frames are returned as a
    CUDA uint8 tensor [F,H,W,3] on that device, shared zero-copy with DALI's output buffer via
    DLPack (``torch.from_dlpack``; DALI synchronises with torch's current stream).
    GPU-unverified: the CUDA path is written against DALI 2.4's API but has not been run here
    (no GPU on the development machine); only the CPU path is tested.

    ``times``/``is_key``/``duration`` are CPU tensors/floats computed from the demuxed packet
    timestamps exactly as ``decode_pyav`` computes them from decoded frames.
    Raises ``DecodeError`` for missing/unreadable files, codecs the chosen DALI backend does
    not decode, and any DALI decoding failure (message summarised).
    """
    path = Path(path)
    if not path.is_file():
        raise DecodeError(path, "file not found")
    for kt in key_times:
        if not math.isfinite(kt) or kt < 0:
            raise DecodeError(path, f"key frame time {kt!r} is not a finite non-negative number")
    data = path.read_bytes()
    if not data:
        raise DecodeError(path, "empty file")
    start, header, frame_times, good = _stream_index(path, data, device_id)
    good_times = [t for t, g in zip(frame_times, good) if g]
    good_ids = [i for i, g in enumerate(good) if g]
    if not good_ids:
        raise DecodeError(path, "no decodable frames")
    # decode_pyav's probe for header-less streams: last frame time + 1 ms.
    duration = header if header > 0 else good_times[-1] - start + 1e-3
    if duration <= 0:
        raise DecodeError(path, "no decodable frames")

    targets = [(t, False) for t in uniform_times(duration, nframes)]
    targets += [(float(t), True) for t in key_times]
    targets.sort(key=lambda x: x[0])
    indices: list[int] = []   # DALI frame indices, increasing, unique
    keys: list[bool] = []
    for t, is_key in targets:
        # Last good frame starting at or before tau; the first one if tau precedes it.
        j = max(bisect.bisect_right(good_times, start + t) - 1, 0)
        idx = good_ids[j]
        if indices and indices[-1] == idx:
            keys[-1] = keys[-1] or is_key
            continue
        indices.append(idx)
        keys.append(is_key)

    frames = _run(path, data, indices, device_id)
    times = [frame_times[i] - start for i in indices]
    last = max(times)
    return DecodedClip(
        frames=_resize(frames, max_side),
        times=torch.tensor(times, dtype=torch.float64),
        is_key=torch.tensor(keys, dtype=torch.bool),
        duration=max(duration if header > 0 and last >= 0.5 * duration else last, last),
    )


def _run(path: Path, data: bytes, indices: list[int], device_id: int | None) -> torch.Tensor:
    """Decode frames ``indices`` of the encoded file ``data``: uint8 [F,H,W,3] on the device."""
    try:
        pipe, lock = _pipeline(device_id)
    except Exception as exc:
        raise DecodeError(path, f"cannot build the DALI pipeline ({_summarize(exc)})") from None
    with lock:
        try:
            pipe.feed_input("encoded", [np.frombuffer(data, dtype=np.uint8)])
            pipe.feed_input("frames", [np.asarray(indices, dtype=np.int32)])
            (out,) = pipe.run()
            # One sample: a TensorCPU / TensorGPU exposing __dlpack__; no copy either way.
            frames = torch.from_dlpack(out[0])
        except Exception as exc:  # DALI raises RuntimeError/IndexError/...; pipeline is dead
            _drop_pipeline(device_id, pipe)
            raise DecodeError(path, f"DALI decoder error ({_summarize(exc)})") from None
    if frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[3] != 3:
        raise DecodeError(path, f"DALI returned frames of shape {tuple(frames.shape)} for "
                                f"{len(indices)} requested frames")
    return frames
