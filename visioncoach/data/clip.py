"""What every decoder returns and raises, the container facts both video decoders read, and
still images (image records, key-frame image files).

``decode.py`` (PyAV) and ``dali.py`` (NVIDIA DALI) both import from here and never from each
other, so the decoders share their types without an import circle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["DecodeError", "DecodedClip", "uniform_times", "open_video", "stream_start_and_header",
           "read_image", "insert_frames"]


class DecodeError(RuntimeError):
    """A video or image that cannot be decoded; carries the path so a data loader can count and
    skip it."""

    def __init__(self, path: str | Path, reason: str, what: str = "video"):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot decode {what} {self.path}: {reason}")


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


def read_image(path: str | Path, *, size: tuple[int, int] | None = None,
               max_side: int | None = None) -> torch.Tensor:
    """One image as uint8 [H, W, 3] RGB: resized (bilinear) to ``size`` = (H, W) when given (a
    key-frame image put among a video's frames), else downscaled so its longer side is at most
    ``max_side`` (aspect kept, as video frames). Raises ``DecodeError``."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DecodeError(path, "file not found", "image")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and (im.height, im.width) != tuple(size):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            elif max_side and max(im.size) > max_side:
                scale = max_side / max(im.size)
                im = im.resize((max(2, round(im.width * scale)), max(2, round(im.height * scale))),
                               Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DecodeError(path, f"not a readable image ({exc})", "image") from None
    return torch.from_numpy(arr)


def insert_frames(clip: DecodedClip, frames: list[torch.Tensor], times: list[float]) -> DecodedClip:
    """``clip`` with key frames (uint8 [H, W, 3] each, the clip's frame size) inserted at their
    times, everything in time order (a stable sort: at equal times the clip's frame first)."""
    if not frames:
        return clip
    all_frames = torch.cat([clip.frames, torch.stack(frames)])
    all_times = torch.cat([clip.times, torch.tensor(times, dtype=torch.float64)])
    is_key = torch.cat([clip.is_key, torch.ones(len(frames), dtype=torch.bool)])
    order = torch.sort(all_times, stable=True).indices
    return DecodedClip(all_frames[order], all_times[order], is_key[order], clip.duration)
