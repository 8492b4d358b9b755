"""Synthetic test clips whose frame i is uniformly grey (STEP * i): a decoded frame tells its
own index (the grey level survives lossy coding +-2). Shared by the PyAV and DALI tests."""

from fractions import Fraction

import numpy as np

STEP = 6


def write_clip(path, n, fps=10, size=(64, 48), codec="libx264", pix_fmt="yuv420p", pts=None,
               options=None, container_options=None, content=None):
    """Write ``n`` frames: grey STEP * i, or ``content(i)`` (an RGB array); ``pts`` in
    milliseconds gives variable frame rate."""
    import av

    w, h = size
    with av.open(str(path), "w", options=container_options or {}) as out:
        s = out.add_stream(codec, rate=fps, options=options or {})
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        if pts is not None:
            s.codec_context.time_base = Fraction(1, 1000)
        for i in range(n):
            arr = content(i) if content else np.full((h, w, 3), STEP * i, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            if pts is not None:
                frame.pts = pts[i]
                frame.time_base = Fraction(1, 1000)
            for packet in s.encode(frame):
                out.mux(packet)
        for packet in s.encode():
            out.mux(packet)
    return path


def frame_ids(clip):
    """The frame index each decoded frame shows."""
    return [round(float(f.float().mean()) / STEP) for f in clip.frames]
