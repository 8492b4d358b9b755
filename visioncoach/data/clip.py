"""What every decoder returns and raises, and the container facts both decoders read.

``decode.py`` (PyAV) and ``dali.py`` (NVIDIA DALI) both import from here and never from each
other, so the decoders share their types without an import circle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["DecodeError", "DecodedClip", "uniform_times", "open_video", "stream_start_and_header"]


class DecodeError(RuntimeError):
    """A video that cannot be decoded; carries the path so a data loader can count and skip it."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot decode video {self.path}: {reason}")


@dataclass
class DecodedClip:
    frames: torch.Tensor   # [F, H, W, 3] uint8 RGB
    times: torch.Tensor    # [F] float64 seconds (presentation times of the decoded frames)
    is_key: torch.Tensor   # [F] bool: frame was requested as an annotated key frame
    duration: float        # seconds, from the decoded stream (not the header's claim)

    def __len__(self) -> int:
        return int(self.frames.shape[0])


def uniform_times(duration: float, n: int) -> list[float]:
    """Centres of n equal segments of [0, duration): no frame sits on the unreliable last pts."""
    if n <= 0 or duration <= 0:
        return []
    return [duration * (i + 0.5) / n for i in range(n)]


def open_video(source, path: str | Path):
    """(container, first video stream) of ``source`` (a file name or a file object) with PyAV;
    ``path`` names the video in errors. The caller closes the container."""
    import av

    try:
        container = av.open(source)
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise DecodeError(path, f"not a readable container ({exc})") from None
    if not container.streams.video:
        container.close()
        raise DecodeError(path, "no video stream")
    return container, container.streams.video[0]


def stream_start_and_header(container, stream) -> tuple[float, float]:
    """(start time, header duration) in seconds; the header duration is 0 when absent and may
    lie (truncated files, wrong metadata): callers only place their time grid with it."""
    tb = stream.time_base
    start = float(stream.start_time * tb) if stream.start_time is not None else 0.0
    header = (float(stream.duration * tb) if stream.duration
              else (container.duration / 1e6 if container.duration else 0.0))
    return start, header
