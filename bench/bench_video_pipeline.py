"""Benchmark: video file -> Qwen2.5-VL model inputs (decode + VP render + preprocess).

ours      visioncoach.data.decode (PyAV, by time, seeking across gaps) -> VP render of the key
          frames (visioncoach.vp.render_vp, darken) -> visioncoach.processor.build_inputs
          (resize + native patchify on the frames' device)
baseline  the reference stack's approach: decode every frame with PyAV, take
          linspace(0, n - 1, k) indices, convert to PIL images, transformers' Qwen2.5-VL
          processor (no VP: the baseline gets the cheaper job)
Both produce 16 uniform frames + 2 key frames at the reference's pixel budget (128*28*28),
for the real videos in ../shared/data/videos. Prints a table (median ms per clip, frames/s) and
appends CSV rows to bench/results/video_pipeline.csv (the schema in bench/_common.py).

    python bench/bench_video_pipeline.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from _common import measure, print_table, results_from_rows, write_results

VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos"
NFRAMES, MAX_PIXELS, MIN_PIXELS = 16, 128 * 28 * 28, 3136


def ours(path: Path, tokenizer, key_times, device) -> int:
    from visioncoach.data.decode import decode
    from visioncoach.processor import build_inputs, resize_frames
    from visioncoach.vp import render_vp

    clip = decode(path, nframes=NFRAMES, key_times=key_times)
    frames = clip.frames.to(device)
    # VP on the key frames only, at the size the model sees (boxes in those pixels).
    frames = resize_frames(frames, MIN_PIXELS, MAX_PIXELS)
    h, w = frames.shape[1:3]
    keys = clip.is_key.nonzero().flatten().to(device)
    boxes = torch.tensor([[[w * 0.3, h * 0.3, w * 0.6, h * 0.7]]], device=device).expand(len(keys), 1, 4)
    frames[keys] = render_vp(frames[keys], "darken", boxes.contiguous(),
                             torch.ones(len(keys), dtype=torch.int64, device=device), keys)
    build_inputs(frames, clip.times, clip.duration, "What is held?", tokenizer,   # timed, then dropped
                 min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return len(clip)


def baseline(path: Path, processor, key_times) -> int:
    import av
    import numpy as np
    from PIL import Image

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = [f for f in c.decode(s)]
    n = len(frames)
    fps = float(s.average_rate)
    idx = sorted(set(np.linspace(0, n - 1, NFRAMES).round().astype(int).tolist()
                     + [min(n - 1, int(t * fps)) for t in key_times]))
    images = [Image.fromarray(frames[i].to_ndarray(format="rgb24")) for i in idx]
    content = []
    for k, i in enumerate(idx):
        content += [{"type": "text", "text": f"Frame {k + 1} at {i / fps:.1f}s:"}, {"type": "image"}]
    content.append({"type": "text", "text": "What is held?"})
    text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    processor(text=[text], images=images, return_tensors="pt")
    return len(idx)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from visioncoach.models.tiny import build_processor

    processor = build_processor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    tokenizer = processor.tokenizer
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for name in ("bikes.mp4", "cup.mp4"):
        path = VIDEOS / name
        key_times = [2.0, 5.5]
        for impl in ("baseline", "ours"):
            run = (lambda: baseline(path, processor, key_times)) if impl == "baseline" else \
                (lambda: ours(path, tokenizer, key_times, device))
            # warm-up: imports and first allocations stay out of the times
            timing = measure(run, repeats=args.repeats, warmup=1,
                             sync=torch.cuda.synchronize if device.type == "cuda" else None)
            n, ms = timing.value, 1000 * timing.median
            rows.append(dict(video=name, impl=impl, frames=n, ms=ms, fps=n / (ms / 1000)))
    base = {r["video"]: r["ms"] for r in rows if r["impl"] == "baseline"}
    for r in rows:
        r["speedup"] = base[r["video"]] / r["ms"]
    print_table(rows, ["video", "impl", "frames", ("ms", "ms/clip", ".1f"), ("fps", "frames/s", ".1f"),
                       ("speedup", "speed-up", "{:.2f}x")],
                title=f"decode + VP + preprocess, {NFRAMES} uniform + 2 key frames, {MAX_PIXELS} px/frame, "
                      f"{device.type}, {os.cpu_count()} cores, median of {args.repeats}")
    write_results("video_pipeline", results_from_rows(
        rows, ["video"], {"ms": ("time_median", "ms"), "fps": ("throughput", "frames/s"),
                          "frames": ("frames", "count")},
        nframes=NFRAMES, key_frames=2, max_pixels=MAX_PIXELS, repeats=args.repeats))


if __name__ == "__main__":
    main()
