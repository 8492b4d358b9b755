"""Benchmark greedy prediction decoding (``predict`` / ``infer`` / judges) on the tiny model (CPU):
the same greedy loop with and without the chosen tokens' log-probs.

Before ``generate_group(logprobs=False)``, every greedy decode step also ran a full-vocabulary
log-softmax (``torch.logsumexp`` over 151,936 logits) whose result prediction never read. The
``logprobs=True`` rows run exactly that old path (it is unchanged: RL keeps it), so the
comparison is before / after, measured interleaved in one run.

Rows (one prompt, G = 1, EOS disabled so every run decodes ``--max-new-tokens`` tokens):
  sample/logprobs     ``sample_tokens(logits [1, V], greedy=True)``: argmax + logsumexp
  sample/tokens_only  ``sample_tokens(..., logprobs=False)``: the argmax alone
  step/logprobs       one decode step as the loop runs it: ``decode_step`` (the language model
                      on one token over the static cache, lm_head) + the sampler with log-probs
  step/tokens_only    the same step, no log-probs
  generate/logprobs   ``generate_group`` on precomputed prompt embeddings (prefill + decode);
                      ms/token = run time / new tokens
  generate/tokens_only  the same with ``logprobs=False`` (what ``Session`` now runs)
  generate/hf         ``model.generate(do_sample=False)`` from the same prompt (the vision
                      tower runs again on every call there): what a user would run otherwise

Speedup is vs the ``logprobs`` row of the same level. Prints a table and appends CSV rows to
bench/results/greedy.csv (schema in bench/_common.py).

    python bench/bench_greedy.py                         # 32 new tokens, 15 repeats
    python bench/bench_greedy.py --max-new-tokens 8 --repeats 3   # smoke run
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from _common import measure_each, print_table, results_from_rows, write_results

from visioncoach import processor as P
from visioncoach.data.decode import decode
from visioncoach.models.tiny import build_tiny_model
from visioncoach.models.tokenizer import qwen25_tokenizer
from visioncoach.rollout import (
    decode_step,
    encode_vision,
    generate_group,
    prompt_embeds,
    sample_tokens,
)
from visioncoach.rollout.generate import _fill_prefix, _group_cache
from visioncoach.rollout.prompt import prefill
from visioncoach.templates import user_text

ROOT = Path(__file__).resolve().parents[1]
CUP = ROOT.parent / "shared" / "data" / "videos" / "cup.mp4"
PAD = 151643


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--nframes", type=int, default=4)
    ap.add_argument("--max-pixels", type=int, default=64 * 28 * 28)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.max_new_tokens

    clip = decode(CUP, nframes=args.nframes)
    question = user_text("What does the hand pick up, and when?", "General video QA Free-form")
    inputs = P.build_inputs(clip.frames, clip.times, clip.duration, question, qwen25_tokenizer(),
                            layout="frames", max_pixels=args.max_pixels)
    model = build_tiny_model(seed=0).eval()
    vocab = model.config.text_config.vocab_size
    with torch.no_grad():
        prompt = prompt_embeds(model, inputs, encode_vision(model, inputs))
        _, h_last = prefill(model, prompt)
        logits = model.lm_head(h_last[:, -1]).float()                        # [1, V]
    L = prompt.length

    # One decode step at position L over a static cache holding the prompt (as the loop runs it).
    with torch.no_grad():
        prefix, _ = prefill(model, prompt)
        cache = _group_cache(model, 1, L + n, prompt.inputs_embeds.dtype, logits.device, reuse=False)
        _fill_prefix(cache, prefix, L)
    tok = logits.argmax(-1)
    pos = prompt.completion_positions(1)[:, 0].view(3, 1, 1)

    def step(logprobs: bool):
        def run():
            with torch.no_grad():
                for layer in cache.layers:          # every repeat decodes the same position
                    layer.cumulative_length.fill_(L)
                return sample_tokens(decode_step(model, cache, tok, pos), greedy=True, logprobs=logprobs)
        return run

    def generate(logprobs: bool):
        return lambda: generate_group(model, inputs, 1, greedy=True, max_new_tokens=n, eos_token_ids=None,
                                      pad_token_id=PAD, prompt=prompt, logprobs=logprobs).tokens

    def hf():
        with torch.no_grad():
            out = model.generate(**inputs.tensors, do_sample=False, max_new_tokens=n, eos_token_id=None,
                                 pad_token_id=PAD)
        return out[:, L:]

    levels = {
        "sample": {"logprobs": lambda: sample_tokens(logits, greedy=True),
                   "tokens_only": lambda: sample_tokens(logits, greedy=True, logprobs=False)},
        "step": {"logprobs": step(True), "tokens_only": step(False)},
        "generate": {"logprobs": generate(True), "tokens_only": generate(False), "hf": hf},
    }
    print(f"prompt: {L} tokens ({inputs.num_vision_tokens} vision), vocabulary {vocab}, {n} new tokens, "
          f"{torch.get_num_threads()} threads, best of {args.repeats} (interleaved)")
    rows = []
    for level, fns in levels.items():
        timings = measure_each({name: fns[name] for name in fns}, repeats=args.repeats, warmup=2)
        if level == "step":     # the same token either way
            assert torch.equal(timings["logprobs"].value[0], timings["tokens_only"].value[0])
        if level == "generate":
            assert torch.equal(timings["logprobs"].value, timings["tokens_only"].value)
            assert torch.equal(timings["hf"].value, timings["logprobs"].value)
        base = timings["logprobs"].min
        per = n if level == "generate" else 1
        for name, t in timings.items():
            rows.append({"level": level, "impl": f"{level}/{name}", "ms": t.min * 1e3,
                         "ms_median": t.median * 1e3, "ms_per_token": t.min * 1e3 / per,
                         "speedup": base / t.min})

    print_table(rows, ["impl", ("ms", "best ms", ".3f"), ("ms_median", "median ms", ".3f"),
                       ("ms_per_token", "ms/token", ".3f"), ("speedup", "vs logprobs", "{:.2f}x")])
    write_results("greedy", results_from_rows(
        rows, ["level"], {"ms": ("time_min", "ms"), "ms_median": ("time_median", "ms"),
                          "speedup": ("speedup_vs_logprobs", "x")},
        prompt_tokens=L, vocab=vocab, new_tokens=n, threads=torch.get_num_threads(),
        repeats=args.repeats))


if __name__ == "__main__":
    main()
