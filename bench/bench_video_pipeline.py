"""Benchmark: video file -> Qwen2.5-VL model inputs (decode + VP render + preprocess), against
the pipeline a user of the reference stack writes, in one run, interleaved.

Clips: every video in shared/data/videos, plus two synthetic H.264 clips in the real datasets'
shapes, written once with PyAV (libx264 defaults: CRF 23, B-frames, keyframe every 250 frames
at most) into bench/results/clips/ (never committed): 60 s at 3 fps and 20 s at 30 fps, 640x360,
a panning textured background with moving discs.

The job, the same on both sides: the frames on screen at 18 times, 16 uniform (centres of 16
equal segments of the header's duration, ``visioncoach.data.clip.uniform_times``) and 2
annotated key times (the 5/16 and 11/16 points, between two uniform frames), at 128*28*28
pixels per frame, each frame an image after "Frame i at T s:" in one chat prompt with the same
system prompt and question. Both sides must give the same number of frames, the same
image_grid_thw and the same token count (checked on every run).

ours      ``visioncoach.data.decode.decode_pyav`` (demux index, seeks to the keyframe before each
          picked frame, drops unpicked non-reference frames, frame threads, RGB only for picked
          frames) -> ``processor.resize_frames`` (bicubic + antialias, as transformers) ->
          ``vp.render_vp`` darken box on the 2 key frames -> ``processor.build_inputs`` (native
          patchify + normalise, token expansion).
baseline  what a user writes with PyAV, PIL and transformers, qwen-vl-utils' recipe without its
          read of every frame: ``av.open`` with PyAV's default decoder settings; the frame
          index of time t is ``min(n - 1, int(t * fps))`` with n and fps from the header (the
          constant-frame-rate index arithmetic qwen-vl-utils uses); ``for frame in
          container.decode(stream)``, ``frame.to_image()`` for the wanted indices, stopping
          after the last; then ``processor.apply_chat_template`` on the same messages and
          ``processor(text=[text], images=images)``, transformers' Qwen2.5-VL processor (its
          default torchvision backend) with the same min/max pixels. No VP (the baseline gets
          the cheaper job). qwen-vl-utils itself is slower still: its torchvision reader
          converts every frame to RGB, its decord reader decodes up to the last index too.

Prints the table (per clip: median ms of each side, speed-up, frames/s, and the median CPU
time of the process, all threads, with its ratio: the work, which ours' frame-threaded decode
spreads over cores but does not shrink), then where the time
goes per stage (medians of the stages timed one by one; ours' decode split by instrumenting
``visioncoach.data.decode`` from here), and appends CSV rows to bench/results/video_pipeline.csv
(bench/_common.py's schema).

    python bench/bench_video_pipeline.py [--repeats 7] [--clips cup.mp4,sync-20s-30fps] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from _common import (
    RESULTS,
    measure,
    measure_each,
    print_table,
    results_from_rows,
    write_results,
)

VIDEOS = (Path(os.environ["VISIONCOACH_SHARED_DATA"]) / "videos" if os.environ.get("VISIONCOACH_SHARED_DATA")
          else Path(__file__).resolve().parents[2] / "shared" / "data" / "videos")
CLIPS = RESULTS / "clips"
NFRAMES, MAX_PIXELS, MIN_PIXELS = 16, 128 * 28 * 28, 3136
QUESTION = "What is held?"
# name -> (seconds, fps): the real datasets' two shapes (long and sparse, short and dense).
SYNTHETIC = {"sync-60s-3fps": (60, 3), "sync-20s-30fps": (20, 30)}
SYNTHETIC_SIZE = (640, 360)   # W, H
SYNTHETIC_VERSION = 1         # bump when the content changes: the cached files are keyed on it


# ---------------------------------------------------------------------------- clips

def _synthetic_frames(seconds: int, fps: int, size: tuple[int, int]):
    """Deterministic footage with motion everywhere: a camera pan over a textured background
    (coarse blobs + fine grain, so the encoder spends realistic bits) and three moving discs."""
    w, h = size
    rng = np.random.default_rng(0)
    pad = 96
    coarse = rng.integers(0, 256, (h // 24 + 8, w // 24 + 8, 3)).astype(np.float32)
    ys = np.linspace(0, coarse.shape[0] - 1.001, h + 2 * pad)
    xs = np.linspace(0, coarse.shape[1] - 1.001, w + 2 * pad)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    bg = ((1 - fy) * ((1 - fx) * coarse[y0][:, x0] + fx * coarse[y0][:, x0 + 1])
          + fy * ((1 - fx) * coarse[y0 + 1][:, x0] + fx * coarse[y0 + 1][:, x0 + 1]))
    bg = np.clip(bg + rng.normal(0, 12, bg.shape), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    discs = [((230, 40, 40), 0.7, 0.0, 45), ((40, 200, 60), 0.45, 1.3, 30), ((50, 80, 230), 0.3, 2.1, 60)]
    for i in range(seconds * fps):
        t = i / fps
        ox = int(pad + (pad - 1) * math.sin(0.31 * t))
        oy = int(pad + (pad - 1) * math.sin(0.17 * t + 0.5))
        frame = bg[oy:oy + h, ox:ox + w].copy()
        for color, speed, phase, r in discs:
            cx = w / 2 + (w / 2 - r) * math.sin(speed * t + phase)
            cy = h / 2 + (h / 2 - r) * math.cos(1.3 * speed * t + phase)
            frame[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = color
        yield frame


def synthetic_clip(name: str, directory: Path = CLIPS) -> Path:
    """The cached synthetic clip ``name`` (SYNTHETIC), written with PyAV on first use."""
    import av

    seconds, fps = SYNTHETIC[name]
    path = directory / f"{name}-{SYNTHETIC_SIZE[0]}x{SYNTHETIC_SIZE[1]}-v{SYNTHETIC_VERSION}.mp4"
    if path.is_file():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.mp4")
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = *SYNTHETIC_SIZE, "yuv420p"
        for arr in _synthetic_frames(seconds, fps, SYNTHETIC_SIZE):
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    tmp.replace(path)   # atomic: a concurrent run never reads a half-written clip
    return path


def clip_paths(names: list[str] | None = None) -> dict[str, Path]:
    real = {p.name: p for p in sorted(VIDEOS.glob("*.mp4"))}
    wanted = names or [*real, *SYNTHETIC]
    unknown = [n for n in wanted if n not in real and n not in SYNTHETIC]
    if unknown:
        raise SystemExit(f"unknown clip(s) {unknown}: choose from {[*real, *SYNTHETIC]} (real ones from {VIDEOS})")
    return {n: real[n] if n in real else synthetic_clip(n) for n in wanted}


def header_times(path: Path) -> tuple[list[float], list[float], float]:
    """(uniform times, key times, header duration) in seconds from the stream start: the job."""
    import av

    from visioncoach.data.clip import stream_start_and_header, uniform_times

    with av.open(str(path)) as c:
        _, duration = stream_start_and_header(c, c.streams.video[0])
    return uniform_times(duration, NFRAMES), [duration * 5 / 16, duration * 11 / 16], duration


# ---------------------------------------------------------------------------- the two sides

def ours(path: Path, tokenizer, key_times: list[float], device: torch.device, vp: bool = True):
    """-> (ModelInputs, frame count)."""
    from visioncoach.data.decode import decode_pyav
    from visioncoach.processor import build_inputs, resize_frames
    from visioncoach.vp import render_vp

    clip = decode_pyav(path, nframes=NFRAMES, key_times=key_times)
    frames = resize_frames(clip.frames.to(device), MIN_PIXELS, MAX_PIXELS)   # [F, h, w, 3]
    if vp:
        # VP on the key frames only, at the size the model sees (boxes in those pixels).
        frames = _render_keys(frames, clip.is_key.to(device), render_vp)
    inputs = build_inputs(frames, clip.times, clip.duration, QUESTION, tokenizer,
                          min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return inputs, len(clip)


def _render_keys(frames: torch.Tensor, is_key: torch.Tensor, render_vp) -> torch.Tensor:
    h, w = frames.shape[1:3]
    keys = is_key.nonzero().flatten()
    boxes = torch.tensor([[[w * 0.3, h * 0.3, w * 0.6, h * 0.7]]], device=frames.device).expand(len(keys), 1, 4)
    frames[keys] = render_vp(frames[keys], "darken", boxes.contiguous(),
                             torch.ones(len(keys), dtype=torch.int64, device=frames.device), keys)
    return frames


def baseline_frames(path: Path, times: list[float]):
    """The user's decode: PIL images of the frames at ``times`` (CFR index arithmetic) and the
    times of those frames."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        n = stream.frames or math.inf
        wanted = sorted(min(n - 1, int(t * fps)) for t in times)
        images, k = [], 0
        for i, frame in enumerate(container.decode(stream)):
            while k < len(wanted) and wanted[k] == i:
                images.append(frame.to_image())
                k += 1
            if k == len(wanted):
                break
    return images, [i / fps for i in wanted[:len(images)]]


def baseline_inputs(processor, images, times: list[float], duration: float):
    """The user's preprocessing: the same chat messages through transformers' processor."""
    from visioncoach.templates import SYSTEM_PROMPT, format_time

    content = []
    for k, t in enumerate(times):
        content += [{"type": "text", "text": f"Frame {k + 1} at {format_time(t)}s:"}, {"type": "image"}]
    content.append({"type": "text", "text": f"The video is in total {format_time(duration)} seconds. {QUESTION}"})
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(text=[text], images=images, return_tensors="pt")


def baseline(path: Path, processor, times: list[float], duration: float):
    """-> (processor outputs, frame count)."""
    images, frame_times = baseline_frames(path, times)
    return baseline_inputs(processor, images, frame_times, duration), len(images)


def check_same_job(name: str, ours_out, base_out) -> None:
    """Both sides made the same model-input shapes: frames, grid, tokens."""
    (inputs, n_ours), (hf, n_base) = ours_out, base_out
    grid = inputs.tensors["image_grid_thw"]
    if n_ours != n_base or not torch.equal(grid.cpu(), hf["image_grid_thw"]) or \
            inputs.tensors["input_ids"].shape != hf["input_ids"].shape:
        raise RuntimeError(f"{name}: the two sides did different jobs: {n_ours} vs {n_base} frames, grids "
                           f"{grid.tolist()} vs {hf['image_grid_thw'].tolist()}, "
                           f"{inputs.tensors['input_ids'].shape[1]} vs {hf['input_ids'].shape[1]} tokens")


# ---------------------------------------------------------------------------- where the time goes

@contextmanager
def _instrumented_decode(acc: dict):
    """Times ours' demux index and RGB conversion and counts decoded frames, by wrapping
    visioncoach.data.decode's helpers (restored on exit)."""
    from visioncoach.data import decode as D

    saved = D._packet_index, D._to_array, D._robust_frames

    def index(*a, **k):
        t0 = time.perf_counter()
        try:
            return saved[0](*a, **k)
        finally:
            acc["index"] += time.perf_counter() - t0

    def to_array(*a, **k):
        t0 = time.perf_counter()
        try:
            return saved[1](*a, **k)
        finally:
            acc["rgb"] += time.perf_counter() - t0

    def frames(*a, **k):
        for f in saved[2](*a, **k):
            acc["decoded"] += 1
            yield f

    D._packet_index, D._to_array, D._robust_frames = index, to_array, frames
    try:
        yield
    finally:
        D._packet_index, D._to_array, D._robust_frames = saved


def breakdown(path: Path, processor, key_times, times, duration, device, repeats: int,
              sync=None) -> dict:
    """Median ms of each stage of both sides, timed one stage at a time on that stage's input."""
    from visioncoach import ops
    from visioncoach.data.decode import decode_pyav
    from visioncoach.processor import TEMPORAL, build_inputs, resize_frames
    from visioncoach.vp import render_vp

    tok = processor.tokenizer
    parts = {k: [] for k in ("index", "rgb", "decoded")}
    totals = []
    for _ in range(repeats):
        acc = {"index": 0.0, "rgb": 0.0, "decoded": 0}
        with _instrumented_decode(acc):
            t0 = time.perf_counter()
            clip = decode_pyav(path, nframes=NFRAMES, key_times=key_times)
            totals.append(time.perf_counter() - t0)
        for k, values in parts.items():
            values.append(acc[k])
    frames = clip.frames.to(device)
    resized = resize_frames(frames, MIN_PIXELS, MAX_PIXELS)
    is_key = clip.is_key.to(device)
    images, frame_times = baseline_frames(path, times)
    with __import__("av").open(str(path)) as c:
        total_frames = c.streams.video[0].frames
    timed = {
        "resize": measure(lambda: resize_frames(frames, MIN_PIXELS, MAX_PIXELS), repeats=repeats, sync=sync),
        "vp": measure(lambda: _render_keys(resized.clone(), is_key, render_vp), repeats=repeats, sync=sync),
        "patchify": measure(lambda: ops.patchify_normalize(resized.repeat_interleave(TEMPORAL, 0)),
                            repeats=repeats, sync=sync),
        "build_inputs": measure(lambda: build_inputs(resized, clip.times, clip.duration, QUESTION, tok,
                                                     min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
                                repeats=repeats, sync=sync),
        "base_decode": measure(lambda: baseline_frames(path, times), repeats=repeats, sync=sync),
        "base_processor": measure(lambda: baseline_inputs(processor, images, frame_times, duration),
                                  repeats=repeats, sync=sync),
    }
    ms = {k: 1000 * v.median for k, v in timed.items()}
    decode_ms = 1000 * statistics.median(totals)
    index_ms, rgb_ms = (1000 * statistics.median(parts[k]) for k in ("index", "rgb"))
    return {
        "base_decode": ms["base_decode"], "base_processor": ms["base_processor"],
        "base_decoded": min(total_frames or math.inf, int(max(times) * float(_fps(path))) + 1),
        "index": index_ms, "decode": decode_ms - index_ms - rgb_ms, "rgb": rgb_ms,
        "decoded": int(statistics.median(parts["decoded"])), "total_frames": total_frames,
        "resize": ms["resize"], "vp": ms["vp"], "patchify": ms["patchify"],
        # build_inputs' own resize is a no-op on resized frames: the rest is token expansion.
        "tokens": ms["build_inputs"] - ms["patchify"],
    }


def _fps(path: Path):
    import av

    with av.open(str(path)) as c:
        return c.streams.video[0].average_rate


# ---------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--clips", default="", help="comma-separated clip names (default: all)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads for both sides (default: torch's, one per core); on a "
                         "machine busy with other jobs 1 avoids each op waiting for a descheduled "
                         "second thread")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from visioncoach.models.tiny import build_processor

    processor = build_processor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    tokenizer = processor.tokenizer
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    paths = clip_paths([c for c in args.clips.split(",") if c] or None)
    rows, stages = [], []
    load = os.getloadavg()[0]
    for name, path in paths.items():
        uniform, key_times, duration = header_times(path)
        times = sorted(uniform + key_times)
        fns = {"baseline": lambda p=path, t=times, d=duration: baseline(p, processor, t, d),
               "ours": lambda p=path, k=key_times: ours(p, tokenizer, k, device)}
        timing = measure_each(fns, repeats=args.repeats, warmup=1, sync=sync)
        # CPU time of the process (every thread): the work each side does, which parallel
        # decoding does not shrink and other jobs' load hardly changes.
        cpu = measure_each(fns, repeats=max(3, args.repeats // 2), warmup=0, sync=sync,
                           clock=time.process_time)
        check_same_job(name, timing["ours"].value, timing["baseline"].value)
        n = timing["ours"].value[1]
        base_ms, ours_ms = (1000 * timing[k].median for k in ("baseline", "ours"))
        h, w = (int(x) * 14 for x in timing["ours"].value[0].tensors["image_grid_thw"][0, 1:])
        base_cpu = 1000 * cpu["baseline"].median
        for impl, ms in (("baseline", base_ms), ("ours", ours_ms)):
            cpu_ms = 1000 * cpu[impl].median
            rows.append({"video": name, "impl": impl, "frames": n, "size": f"{w}x{h}", "ms": ms,
                         "fps": n / (ms / 1000), "speedup": base_ms / ms, "cpu_ms": cpu_ms,
                         "cpu_ratio": base_cpu / cpu_ms})
        b = breakdown(path, processor, key_times, times, duration, device, args.repeats, sync)
        stages.append(dict(video=name, speedup=base_ms / ours_ms, **b))
    load = max(load, os.getloadavg()[0])
    print_table(rows, ["video", "impl", "frames", "size", ("ms", "ms/clip", ".1f"), ("fps", "frames/s", ".1f"),
                       ("speedup", "speed-up", "{:.2f}x"), ("cpu_ms", "CPU ms", ".1f"),
                       ("cpu_ratio", "CPU ratio", "{:.2f}x")],
                title=f"decode + VP + preprocess, {NFRAMES} uniform + 2 key frames, <= {MAX_PIXELS} px/frame, "
                      f"{device.type}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
                      f"load {load:.1f}, median of {args.repeats} "
                      f"(interleaved)")
    print()
    print_table(stages, [
        "video", ("speedup", "speed-up", "{:.2f}x"),
        ("base_decode", "base decode+PIL", ".1f"),
        (lambda r: f"{r['base_decoded']}/{r['total_frames']}", "base frames"),
        ("base_processor", "base processor", ".1f"),
        ("index", "index", ".1f"), ("decode", "decode", ".1f"),
        (lambda r: f"{r['decoded']}/{r['total_frames']}", "frames decoded"),
        ("rgb", "rgb", ".1f"), ("resize", "resize", ".1f"), ("vp", "vp", ".1f"),
        ("patchify", "patchify", ".1f"), ("tokens", "tokens", ".1f")],
        title="where the time goes (median ms per stage, each timed alone; 'frames decoded': "
              "frames the decoder output of the stream's total)")
    fixed = {"nframes": NFRAMES, "key_frames": 2, "max_pixels": MAX_PIXELS, "repeats": args.repeats,
             "threads": torch.get_num_threads()}
    results = results_from_rows(rows, ["video"], {"ms": ("time_median", "ms"), "fps": ("throughput", "frames/s"),
                                                  "frames": ("frames", "count"),
                                                  "cpu_ms": ("cpu_time_median", "ms")}, **fixed)
    stage_keys = ("base_decode", "base_processor", "index", "decode", "rgb", "resize", "vp", "patchify", "tokens")
    for s in stages:
        s["impl"] = "stages"
    results += results_from_rows(stages, ["video"], {k: (f"stage_{k}_median", "ms") for k in stage_keys}
                                 | {"decoded": ("frames_decoded", "count")}, **fixed)
    write_results("video_pipeline", results)


if __name__ == "__main__":
    main()
