"""Pipeline microbenchmarks under pytest-benchmark (see bench/conftest.py), each beside the
baseline a user would otherwise run, with the case builders of the bench scripts:

  rewards   the per-text reference loop vs ``score`` on Records converted by the loader (the
            training path), on the main batch and the free-form (ROUGE) batch (bench_rewards.py)
  video     decode + VP + preprocess of a clip: PyAV -> PIL -> transformers processor vs ours
            (bench_video_pipeline.py)
  rollout   transformers' ``generate`` vs our rollout engine, G continuations of one real clip
            on the tiny random-weight Qwen2.5-VL (bench_rollout.py)
"""

from __future__ import annotations

import itertools

import pytest
import torch
from _common import bench_case


@pytest.fixture(scope="module")
def reward_batches(quick):
    from bench_rewards import FREE_FORM_TASKS, MAIN_TASKS, make_batch

    from visioncoach.rewards import batched

    n, group = (16, 4) if quick else (512, 4)
    out = {}
    for label, tasks in (("main", MAIN_TASKS), ("free-form", FREE_FORM_TASKS)):
        texts, samples = make_batch(n, group, tasks)
        records, index = batched.convert_records(samples)
        out[label] = (texts, samples, [records[i] for i in index], group)
    return out


@pytest.mark.parametrize("impl", ["reference", "ours"])
@pytest.mark.parametrize("batch", ["main", "free-form"])
def test_rewards(benchmark, reward_batches, impl, batch):
    from visioncoach.rewards import RewardConfig, score, score_reference

    texts, samples, converted, group = reward_batches[batch]
    cfg = RewardConfig()
    fn = (lambda: score_reference(texts, samples, cfg)) if impl == "reference" else \
        (lambda: score(texts, converted, cfg, frontend="native"))
    bench_case(benchmark, bench="rewards", case={"batch": batch, "n": len(texts), "group": group, "threads": 1},
               impl=impl, baseline="reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # scoring runs beside the trainer on one core, as in bench_rewards.py
    try:
        benchmark(fn)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rollout_case(quick):
    from bench_rollout import build_case

    return build_case(4 if quick else 8, 128 * 28 * 28)


@pytest.mark.parametrize("impl", ["hf", "ours"])
@pytest.mark.parametrize("G", [4, 8])
def test_rollout(benchmark, rollout_case, quick, rounds, impl, G):
    from bench_rollout import run_hf, run_ours

    model, inputs = rollout_case
    n = 4 if quick else 64
    fn = run_hf if impl == "hf" else run_ours
    seeds = itertools.count()

    def run():
        with torch.no_grad():
            tokens = fn(model, inputs, G, n, seed=next(seeds))
        assert tokens.shape == (G, n)   # EOS off: both sides generate exactly n tokens

    bench_case(benchmark, bench="rollout",
               case={"G": G, "new_tokens": n, "prompt_tokens": inputs.tensors["input_ids"].shape[1]},
               impl=impl, baseline="hf")
    benchmark.pedantic(run, rounds=rounds(3), warmup_rounds=1, iterations=1)


@pytest.fixture(scope="module")
def video_processor():
    from bench_video_pipeline import MAX_PIXELS, MIN_PIXELS

    from visioncoach.models.tiny import build_processor

    return build_processor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def _video_clips():
    from bench_video_pipeline import SYNTHETIC, VIDEOS

    return [p.name for p in sorted(VIDEOS.glob("*.mp4"))] + list(SYNTHETIC)


@pytest.mark.parametrize("impl", ["baseline", "ours"])
@pytest.mark.parametrize("clip", _video_clips())
def test_video_pipeline(benchmark, video_processor, quick, rounds, impl, clip):
    """Decode + VP + preprocess of 16 uniform + 2 key frames (bench_video_pipeline.py's job)."""
    from bench_video_pipeline import (
        baseline,
        check_same_job,
        clip_paths,
        header_times,
        ours,
    )

    if quick and clip in ("sync-60s-3fps", "sync-20s-30fps"):
        pytest.skip("--bench-quick: the real clips only (the synthetic ones are encoded on first use)")
    path = clip_paths([clip])[clip]
    uniform, key_times, duration = header_times(path)
    times = sorted(uniform + key_times)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = lambda: baseline(path, video_processor, times, duration)
    mine = lambda: ours(path, video_processor.tokenizer, key_times, device)
    check_same_job(clip, mine(), base())
    fn = base if impl == "baseline" else mine
    bench_case(benchmark, bench="video_pipeline",
               case={"video": clip, "frames": len(times), "device": device.type},
               impl=impl, baseline="baseline")
    benchmark.pedantic(fn, rounds=rounds(7), warmup_rounds=1, iterations=1)
