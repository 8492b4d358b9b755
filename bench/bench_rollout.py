"""Benchmark the GSPO rollout engine against transformers' ``generate`` on the tiny model (CPU).

One prompt, G continuations: a real clip (cup.mp4, 8 frames) in the ``frames`` layout at
max_pixels 128*28*28 (the reference setting: ~117 vision tokens per frame), the tiny
random-weight Qwen2.5-VL (real 151,936-token vocabulary), temperature 1.0, top-p 0.95,
``max_new_tokens`` new tokens with EOS disabled so both sides generate the same number.

  hf         model.generate(**inputs, do_sample=True, num_return_sequences=G, top_p=0.95, ...)
  ours       visioncoach.rollout.generate_group(model, inputs, G, ...) (vision + prefill once)
  ours_sort  (--with-sort) ours with the full-sort top-p: separates the loop's gain (one
             prefill, static cache) from the sort-free sampler's

Per row: wall time (median of ``--repeats``), vision-encoder calls (forward hook on
``model.model.visual``), prompt prefills (language-model calls with more than one input
position, and the number of rows they ran). Prints a table and appends CSV rows to
bench/results/rollout.csv (the schema in bench/_common.py; ``--no-csv`` to skip).

    python bench/bench_rollout.py                    # G = 4 and 8, 64 new tokens, 3 repeats
    python bench/bench_rollout.py --profile          # also cProfile one run of ours
    python bench/bench_rollout.py --groups 2 --max-new-tokens 8 --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import os
import pstats
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from _common import measure_each, print_table, results_from_rows, write_results  # noqa: E402
from visioncoach import processor as P  # noqa: E402
from visioncoach.data.decode import decode  # noqa: E402
from visioncoach.models.tiny import build_tiny_model  # noqa: E402
from visioncoach.models.tokenizer import qwen25_tokenizer  # noqa: E402
from visioncoach.rollout import generate_group  # noqa: E402
from visioncoach.templates import user_text  # noqa: E402
from visioncoach.utils.profiling import CallCounter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CUP = ROOT.parent / "shared" / "data" / "videos" / "cup.mp4"
PAD = 151643


def build_case(nframes: int, max_pixels: int):
    clip = decode(CUP, nframes=nframes)
    question = user_text("What does the hand pick up, and when?", "General video QA Free-form")
    inputs = P.build_inputs(clip.frames, clip.times, clip.duration, question, qwen25_tokenizer(),
                            layout="frames", max_pixels=max_pixels)
    model = build_tiny_model(seed=0).eval()
    return model, inputs


def run_hf(model, inputs, G, n, seed):
    torch.manual_seed(seed)
    # top_k=0: no top-k (transformers otherwise defaults it to 50); eos None: exactly n tokens.
    out = model.generate(**inputs.tensors, do_sample=True, num_return_sequences=G, max_new_tokens=n,
                         top_p=0.95, temperature=1.0, top_k=0, eos_token_id=None, pad_token_id=PAD)
    return out[:, inputs.tensors["input_ids"].shape[1]:]


def run_ours(model, inputs, G, n, seed, top_p_method="auto"):
    gen = torch.Generator().manual_seed(seed)
    return generate_group(model, inputs, G, max_new_tokens=n, temperature=1.0, top_p=0.95,
                          eos_token_ids=None, pad_token_id=PAD, generator=gen,
                          top_p_method=top_p_method).tokens


def run_ours_sort(model, inputs, G, n, seed):
    """Ablation: our loop with a full-sort top-p (transformers' cost for that part)."""
    return run_ours(model, inputs, G, n, seed, top_p_method="sort")


def time_impls(impls, model, inputs, G, n, repeats):
    """Median wall time per implementation, with the last run's vision-encoder and prefill
    counts; runs alternate (hf, ours, hf, ours, ...) so both see the same background load on
    a shared machine. Round r samples with seed r on every side. The counters' hooks are set
    up inside the clock: microseconds, against seconds of generation."""
    def counted(fn):
        seeds = itertools.count()

        def run():
            with torch.no_grad(), CallCounter(model.model.visual) as v, \
                    CallCounter(model.model.language_model, min_seq=2) as pf:
                tokens = fn(model, inputs, G, n, seed=next(seeds))
            return dict(vision_calls=v.calls, prefill_calls=pf.calls, prefill_rows=pf.rows,
                        shape=tuple(tokens.shape))
        return run

    timings = measure_each({name: counted(fn) for name, fn in impls.items()}, repeats=repeats,
                           warmup=0)
    return {name: dict(t.value, seconds=t.median, all_seconds=[round(x, 3) for x in t.times])
            for name, t in timings.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--nframes", type=int, default=8)
    ap.add_argument("--max-pixels", type=int, default=128 * 28 * 28)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--with-sort", action="store_true",
                    help="also time our loop with the sort top-p (ablation: loop vs sampler)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, inputs = build_case(args.nframes, args.max_pixels)
    L = inputs.tensors["input_ids"].shape[1]
    print(f"prompt: {L} tokens ({inputs.num_vision_tokens} vision, {args.nframes} frames "
          f"{inputs.frame_size[0]}x{inputs.frame_size[1]}), {args.max_new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    with torch.no_grad():  # warm-up (allocator, lazy imports)
        run_ours(model, inputs, 2, 2, 0)
        run_hf(model, inputs, 2, 2, 0)

    rows = []
    for G in args.groups:
        impls = {"hf": run_hf, "ours": run_ours}
        if args.with_sort:
            impls["ours_sort"] = run_ours_sort
        res = time_impls(impls, model, inputs, G, args.max_new_tokens, args.repeats)
        for name, r in res.items():
            assert r["shape"] == (G, args.max_new_tokens), (name, r["shape"])
        for name, r in res.items():
            rows.append(dict(impl=name, G=G, **{k: v for k, v in r.items() if k != "shape"},
                             speedup=res["hf"]["seconds"] / r["seconds"]))

    print()
    print_table(rows, ["impl", "G", ("seconds", "seconds", ".3f"),
                       (lambda r: 1e3 * r["seconds"] / args.max_new_tokens, "ms/token", ".1f"),
                       ("vision_calls", "vision"), ("prefill_calls", "prefills"),
                       ("prefill_rows", "prefill rows"), ("speedup", "speedup", "{:.2f}x"),
                       ("all_seconds", "runs")])

    if args.profile:
        prof = cProfile.Profile()
        with torch.no_grad():
            prof.runcall(run_ours, model, inputs, args.groups[-1], args.max_new_tokens, 0)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)

    if not args.no_csv:
        write_results("rollout", results_from_rows(
            rows, ["G"], {"seconds": ("time_median", "s"), "vision_calls": ("vision_calls", "count"),
                          "prefill_calls": ("prefill_calls", "count"),
                          "prefill_rows": ("prefill_rows", "count"), "speedup": ("speedup_vs_hf", "x")},
            prompt_tokens=L, vision_tokens=inputs.num_vision_tokens, new_tokens=args.max_new_tokens,
            threads=torch.get_num_threads(), repeats=args.repeats))


if __name__ == "__main__":
    main()
