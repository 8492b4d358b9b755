"""A small, deterministic grounded-video dataset: the embedded default's data.

Clips of coloured shapes moving in straight lines over a plain background, written as real
H.264 mp4 files, with exact boxes and times, and STGR records of every task type with a
correct reference reasoning in the claim format (for SFT). Frames are 112 x 84 (multiples of
28 and under the tiny config's pixel budget), so the model sees them unresized and the
reasoning's pixel boxes are exact.

``ensure_synthetic(n, seed)`` generates into a cache folder on first use (atomically: a
half-written dataset is never picked up) and returns the STGR JSON path.

Two task sets (``data.synthetic_tasks``):
- ``all``: every STGR task type in turn, two objects per clip (the embedded default, which
  shows every mechanism working);
- ``color``: the learning benchmark's task (``bench/bench_learning.py``), built so a tiny
  model can learn it within minutes on a CPU while every reward component has something to
  score: one shape per clip, "what colour is it" as a four-option MCQ (options in a fixed
  order, so the answer depends on the frames only), and a reasoning of one grounded claim
  (the shape, its pixel box at the first key frame, that frame's time). The claim names the
  shape without its colour, so the answer letter is the one target token that depends on the
  colour: under teacher forcing it cannot be copied from the reasoning, which is what lets
  ``loss.sft_answer_weight`` teach the cold start to read the frames. The colour is
  drawn uniformly, so a policy that ignores the frames scores 0.25 accuracy on average; the
  background is a dim tint of the shape's colour.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Bumped when the clips' bytes change, so a cache of old clips is never reused (v2: frames
# converted to YUV by ``_yuv420p``, not by swscale).
VERSION = 2
WIDTH, HEIGHT, FPS = 112, 84, 8
BACKGROUND = (40, 40, 40)
COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 80, 230), "yellow": (230, 210, 30)}
SHAPES = ("square", "circle")
TASK_SETS = ("all", "color")
# The cache folder's suffix per task set, bumped when the set's clips or records change so a
# cache of the old ones is never reused ("color" r2: the claim names the shape only).
_CACHE_SUFFIX = {"all": "", "color": "-color-r2"}
TASKS = ("temporal-spatial free-form QA", "General video QA MCQ", "General video QA Free-form",
         "temporal QA", "temporal QA (MCQ)", "visual QA")


@dataclass
class Track:
    """One object: visible on [t_in, t_out], centre moving linearly from p0 to p1."""
    color: str
    shape: str
    size: int
    p0: tuple[float, float]
    p1: tuple[float, float]
    t_in: float
    t_out: float

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    def box(self, t: float) -> tuple[int, int, int, int] | None:
        """Integer pixel box [x1, y1, x2, y2) at time t, or None when not visible."""
        if not self.t_in <= t <= self.t_out:
            return None
        a = (t - self.t_in) / max(self.t_out - self.t_in, 1e-6)
        cx = self.p0[0] + a * (self.p1[0] - self.p0[0])
        cy = self.p0[1] + a * (self.p1[1] - self.p0[1])
        x1, y1 = int(round(cx - self.size / 2)), int(round(cy - self.size / 2))
        return x1, y1, x1 + self.size, y1 + self.size


def _draw(frame: np.ndarray, track: Track, t: float) -> None:
    b = track.box(t)
    if b is None:
        return
    x1, y1, x2, y2 = b
    color = np.array(COLORS[track.color], dtype=np.uint8)
    if track.shape == "square":
        frame[y1:y2, x1:x2] = color
    else:
        yy, xx = np.mgrid[y1:y2, x1:x2]
        r = track.size / 2
        inside = (xx + 0.5 - (x1 + r)) ** 2 + (yy + 0.5 - (y1 + r)) ** 2 <= r * r
        frame[y1:y2, x1:x2][inside] = color


def _tracks(rng: random.Random, duration: float) -> list[Track]:
    colors = rng.sample(sorted(COLORS), 2)
    tracks = []
    for k, color in enumerate(colors):
        size = rng.randint(16, 24)
        m = size // 2 + 2
        left_to_right = rng.random() < 0.5
        xa, xb = m + rng.uniform(0, 8), WIDTH - m - rng.uniform(0, 8)
        y0 = rng.uniform(m, HEIGHT - m)
        y1 = min(max(y0 + rng.uniform(-15, 15), m), HEIGHT - m)
        p0, p1 = ((xa, y0), (xb, y1)) if left_to_right else ((xb, y0), (xa, y1))
        if k == 0:
            t_in, t_out = 0.0, duration  # the main object is there throughout
        else:
            t_in = round(rng.uniform(0.5, duration / 2), 1)
            t_out = round(rng.uniform(t_in + 1.0, duration), 1)
        tracks.append(Track(color, rng.choice(SHAPES), size, p0, p1, t_in, t_out))
    return tracks


def _yuv420p(rgb: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 RGB -> [H * 3 / 2, W] uint8 planar YUV 4:2:0 (Y, then U, then V).

    BT.601 limited range (what decoders assume for an untagged stream), chroma from the mean
    of each 2 x 2 block. Done here, not by FFmpeg: with RGB frames, the conversion in PyAV's
    encode gave other bytes for the same frames from run to run (one or two clips in twelve;
    ``VideoFrame.reformat`` also changes its output with the input buffer's address), so the
    generator was not deterministic. The encoder then gets its own pixel format: no conversion.
    """
    h, w = rgb.shape[:2]
    if h % 2 or w % 2:
        raise ValueError(f"4:2:0 needs an even frame size, got {w} x {h}")
    x = rgb.astype(np.float64)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    q = x.reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
    qr, qg, qb = q[..., 0], q[..., 1], q[..., 2]
    u = 128 + (-37.797 * qr - 74.203 * qg + 112.0 * qb) / 255
    v = 128 + (112.0 * qr - 93.786 * qg - 18.214 * qb) / 255
    planes = np.concatenate([y.ravel(), u.ravel(), v.ravel()])
    return np.clip(np.rint(planes), 0, 255).astype(np.uint8).reshape(h * 3 // 2, w)


def _write_video(path: Path, tracks: list[Track], n_frames: int,
                 background: tuple[int, int, int] = BACKGROUND) -> None:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS, options={"crf": "18", "threads": "1"})
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for i in range(n_frames):
            frame = np.empty((HEIGHT, WIDTH, 3), dtype=np.uint8)
            frame[:] = background
            for tr in tracks:
                _draw(frame, tr, i / FPS)
            for packet in stream.encode(av.VideoFrame.from_ndarray(_yuv420p(frame), format="yuv420p")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _claim(track: Track, t: float, name: str | None = None) -> str:
    x1, y1, x2, y2 = track.box(t)
    return f"<obj>{track.name if name is None else name}</obj><box>[{x1}, {y1}, {x2}, {y2}]</box>at<t>{t:g}</t>s"


def _direction(track: Track) -> str:
    return "left to right" if track.p1[0] > track.p0[0] else "right to left"


def _record(i: int, rng: random.Random, task: str, tracks: list[Track], n_frames: int,
            video: str) -> dict:
    main, other = tracks
    duration = (n_frames - 1) / FPS
    # Two key frames inside the interval where the objects are visible, on frame times.
    visible = [f for f in range(n_frames) if other.box(f / FPS) is not None]
    ka, kb = visible[len(visible) // 4], visible[(3 * len(visible)) // 4]
    key_frames = [{"idx": ka, "time": ka / FPS}, {"idx": kb, "time": kb / FPS}]
    key_items = {}
    for f in (ka, kb):
        objs = {}
        for tr in tracks:
            x1, y1, x2, y2 = tr.box(f / FPS)
            objs[tr.name] = [[x1 / WIDTH, y1 / HEIGHT, x2 / WIDTH, y2 / HEIGHT]]
        key_items[str(f)] = objs
    ta, tb = ka / FPS, kb / FPS
    evidence = (f"At the start {_claim(main, ta)} and {_claim(other, ta)} are visible; later "
                f"{_claim(main, tb)} has moved.")
    rec = {"id": f"synthetic-{i:05d}", "source": "synthetic", "task": task,
           "video_path": video, "image_size": [WIDTH, HEIGHT],
           "key_frames": key_frames, "key_items": key_items}
    seg = f"<t>{other.t_in:.1f}</t>s to <t>{other.t_out:.1f}</t>s"
    answer_block = None  # what a correct policy writes in <answer>, when it differs from `a`
    if task == "temporal-spatial free-form QA":
        q = f"In which direction does the {main.name} move?"
        a = f"The {main.name} moves from {_direction(main)}."
    elif task in ("General video QA MCQ", "temporal QA (MCQ)"):
        options = list(COLORS)
        rng.shuffle(options)
        letter = "ABCD"[options.index(other.color)]
        opts = " ".join(f"{'ABCD'[k]}. {c}" for k, c in enumerate(options))
        if task == "General video QA MCQ":
            q = f"What color is the {other.shape} that appears later? {opts}"
            a = letter
        else:
            q = f"What color is the {other.shape} that appears later, and when is it visible? {opts}"
            a = f"{letter}\n[{other.t_in:.1f}, {other.t_out:.1f}]"
            answer_block = f"{letter} {seg}"
            rec["segments"] = [[other.t_in, other.t_out]]
    elif task == "General video QA Free-form":
        q = "Which object stays in the video the whole time?"
        a = f"The {main.name}."
    elif task == "temporal QA":
        q = f"When is the {other.name} visible?"
        a = f"[{other.t_in:.1f}, {other.t_out:.1f}]"
        answer_block = seg
        rec["segments"] = [[other.t_in, other.t_out]]
    else:  # visual QA: where the main object is in the first key frame
        x1, y1, x2, y2 = main.box(ta)
        q = f"Where is the {main.name} at {ta:.1f} seconds?"
        a = f"[{x1}, {y1}, {x2}, {y2}]"
    answer_block = answer_block or a
    rec.update(question=q, answer=a, duration=duration,
               reasoning_process=f"<think>{evidence}</think><answer>{answer_block}</answer>")
    return rec


COLOR_OPTIONS = ("red", "green", "blue", "yellow")   # fixed order: letter = colour


def _color_record(i: int, track: Track, n_frames: int, video: str) -> dict:
    """The ``color`` task set's record (see the module docstring)."""
    ka, kb = n_frames // 4, (3 * n_frames) // 4
    key_frames = [{"idx": ka, "time": ka / FPS}, {"idx": kb, "time": kb / FPS}]
    key_items = {}
    for f in (ka, kb):
        x1, y1, x2, y2 = track.box(f / FPS)
        key_items[str(f)] = {track.shape: [[x1 / WIDTH, y1 / HEIGHT, x2 / WIDTH, y2 / HEIGHT]]}
    options = " ".join(f"{'ABCD'[k]}. {c}" for k, c in enumerate(COLOR_OPTIONS))
    letter = "ABCD"[COLOR_OPTIONS.index(track.color)]
    return {"id": f"synthetic-color-{i:05d}", "source": "synthetic", "task": "General video QA MCQ",
            "video_path": video, "image_size": [WIDTH, HEIGHT], "key_frames": key_frames,
            "key_items": key_items, "question": f"What color is the shape? {options}",
            "answer": letter, "duration": (n_frames - 1) / FPS,
            "reasoning_process": f"<think>{_claim(track, ka / FPS, track.shape)}</think><answer>{letter}</answer>"}


def _color_track(rng: random.Random, duration: float) -> Track:
    # Large enough to cover several of the model's 28-px merged patches, so its colour
    # reaches more than one visual token.
    size = rng.randint(36, 52)
    m = size // 2 + 2
    xa, xb = m + rng.uniform(0, 8), WIDTH - m - rng.uniform(0, 8)
    y0 = rng.uniform(m, HEIGHT - m)
    y1 = min(max(y0 + rng.uniform(-15, 15), m), HEIGHT - m)
    p0, p1 = ((xa, y0), (xb, y1)) if rng.random() < 0.5 else ((xb, y0), (xa, y1))
    return Track(rng.choice(COLOR_OPTIONS), rng.choice(SHAPES), size, p0, p1, 0.0, duration)


def _check_task_set(tasks: str) -> None:
    if tasks not in TASK_SETS:
        raise ValueError(f"synthetic task set {tasks!r}: expected one of {TASK_SETS}")


def generate(out_dir: str | Path, n: int = 64, seed: int = 0, tasks: str = "all") -> Path:
    """Write ``n`` clips and ``stgr.json`` into ``out_dir``; returns the JSON path. ``tasks``:
    the task set (``TASK_SETS``, see the module docstring)."""
    _check_task_set(tasks)
    out_dir = Path(out_dir)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        # Per-sample streams: sample i never depends on n. The "all" set keeps its original
        # stream names, so existing caches and tests see the same clips.
        rng = random.Random(f"{seed}-{i}" if tasks == "all" else f"{tasks}-{seed}-{i}")
        n_frames = rng.randint(3 * FPS, 5 * FPS)
        video = f"videos/{i:05d}.mp4"
        if tasks == "color":
            track = _color_track(rng, (n_frames - 1) / FPS)
            # A dim tint of the shape's colour over the whole frame, so every visual token
            # carries the answer, not only the few the shape covers (an easier read for a
            # model trained from random weights; see bench/bench_learning.py for what it learns).
            tint = tuple(int(0.3 * c) for c in COLORS[track.color])
            _write_video(out_dir / video, [track], n_frames, background=tint)
            records.append(_color_record(i, track, n_frames, video))
            continue
        tracks = _tracks(rng, (n_frames - 1) / FPS)
        _write_video(out_dir / video, tracks, n_frames)
        records.append(_record(i, rng, TASKS[i % len(TASKS)], tracks, n_frames, video))
    path = out_dir / "stgr.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def default_cache() -> Path:
    root = os.environ.get("VISIONCOACH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "visioncoach")
    return Path(root)


def ensure_synthetic(n: int = 64, seed: int = 0, cache: str | Path | None = None,
                     tasks: str = "all") -> Path:
    """The dataset's JSON path, generating it first if the cache lacks it (atomic rename)."""
    root = Path(cache) if cache else default_cache()
    _check_task_set(tasks)
    final = root / f"synthetic-v{VERSION}-n{n}-s{seed}{_CACHE_SUFFIX[tasks]}"
    if (final / "stgr.json").is_file():
        return final / "stgr.json"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".synthetic-"))
    try:
        generate(tmp, n, seed, tasks)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "stgr.json").is_file():  # not a concurrent rank that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final / "stgr.json"
