"""Benchmark the rewards: batched ``score`` (native front-end) vs the per-text reference loop.

One RL step's worth of scoring: 512 rollouts of ~700 tokens (~2800 characters) of grounded
reasoning, 4-8 claims each, G=4 rollouts per record (records repeat, as in training), the
task types mixed. Texts and records are synthetic and deterministic (seeded).

Rows (CPU, one thread, best of ``--repeats`` wall times; speedup = reference / row):
  main       non-free-form tasks (MCQ, temporal QA, visual QA): no ROUGE on either side, so
             this is the parse + format + temporal + spatial + cheap accuracy comparison.
    reference      ``score_reference``: the reference functions, one text at a time
    score/python   ``score`` with the Python parser (the fallback front-end)
    score/native   ``score`` with the C++ front-end (the default)
    records        ``convert_records`` alone: validating and converting each distinct record
                   (records.py), which ``score`` does first for record dicts; part of
                   score/native
    score/loader   ``score`` on records converted ahead (``rewards.records.Record``), the
                   training path: the data loader converts each record once, in its worker
  free-form  the temporal-spatial and free-form tasks, whose accuracy is ROUGE: the same
             rows, plus ROUGE alone on every distinct (answer, ground truth) pair (each
             scored once, as ``score`` does):
    rouge          ``reference.rouge`` (rouge_score) pair by pair: what ``score`` paid before
    rouge/batched  ``rewards.rouge.rouge_batch`` on all pairs at once: what ``score`` pays

Prints a table and appends rows to bench/results/rewards.csv (the schema in bench/_common.py).

    python bench/bench_rewards.py                 # 512 rollouts
    python bench/bench_rewards.py --profile       # also cProfile ``score`` (top functions)
    python bench/bench_rewards.py --n 64 --repeats 1   # a smoke run
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random

import torch

from _common import measure_each, print_table, results_from_rows, write_results
from visioncoach.grounding import parse_texts
from visioncoach.rewards import RewardConfig, batched, score, score_reference
from visioncoach.rewards.reference import rouge
from visioncoach.rewards.rouge import rouge_batch

MAIN_TASKS = ("temporal QA", "temporal QA (MCQ)", "visual QA", "General video QA MCQ")
FREE_FORM_TASKS = ("temporal-spatial free-form QA", "General video QA Free-form")

OBJECTS = ["person", "man in a red jacket", "woman", "dog", "red car", "white van", "cup",
           "laptop", "bicycle", "traffic light", "child", "ball", "chair", "door", "phone"]
PROSE = [
    "Looking at the opening frames, the scene shows a street corner with several people.",
    "The camera pans slowly to the right while the subject keeps moving forward.",
    "This suggests the action has not started yet, so the earlier frames are context.",
    "Comparing the two moments, the position has clearly changed between them.",
    "Nothing else in the background seems relevant to the question being asked.",
    "I should check whether the same object appears again later in the clip.",
    "The lighting changes a little, but the object is still easy to identify.",
    "So the event the question refers to happens in the middle part of the video.",
    "Then the interaction continues for a few seconds before the scene cuts away.",
    "Taking all of this together, the most consistent option can be chosen.",
]


def _num(rng: random.Random, lo: float, hi: float) -> str:
    v = rng.uniform(lo, hi)
    return str(int(v)) if rng.random() < 0.5 else f"{v:.1f}"


def make_record(rng: random.Random, task: str) -> dict:
    """A record with 4-8 key frames, 1-3 annotated objects on most of them."""
    w, h = rng.choice([(448, 252), (640, 360), (336, 448)])
    n_frames = rng.randint(4, 8)
    times = sorted(round(rng.uniform(0, 30), 1) for _ in range(n_frames))
    key_frames = [{"idx": 5 * i, "time": t} for i, t in enumerate(times)]
    key_items = {}
    for f in key_frames:
        if rng.random() < 0.8:
            objects = {}
            for name in rng.sample(OBJECTS, rng.randint(1, 3)):
                x, y = rng.uniform(0, 0.7), rng.uniform(0, 0.7)
                bw, bh = rng.uniform(0.05, 0.3), rng.uniform(0.05, 0.3)
                objects[name] = [[round(x, 3), round(y, 3), round(x + bw, 3), round(y + bh, 3)]]
            key_items[str(f["idx"])] = objects
    s = round(rng.uniform(0, 20), 1)
    e = round(s + rng.uniform(1, 8), 1)
    letter = rng.choice("ABCD")
    answer = {
        "temporal QA": f"[{s}, {e}]",
        "temporal QA (MCQ)": f"{letter}\n[{s}, {e}]",
        "visual QA": f"<box>[{rng.randint(0, 300)}, {rng.randint(0, 200)}, "
                     f"{rng.randint(300, 600)}, {rng.randint(200, 400)}]</box>",
        "General video QA MCQ": f"{letter}. the {rng.choice(OBJECTS)} moves to the left",
    }.get(task, f"the {rng.choice(OBJECTS)} walks past the {rng.choice(OBJECTS)} and stops")
    rec = {"task": task, "answer": answer, "frame_size": [w, h], "key_frames": key_frames,
           "key_items": key_items}
    if task == "visual QA":
        rec["image_size"] = [2 * w, 2 * h]
    return rec


def make_output(rng: random.Random, rec: dict, target_chars: int = 2800) -> str:
    """Grounded reasoning of ~target_chars: prose, 4-8 claims near the ground truth, a few
    prose times, then an answer of the record's task type."""
    w, h = rec["frame_size"]
    gt = [(f["time"], name, box) for f in rec["key_frames"]
          for name, boxes in rec["key_items"].get(str(f["idx"]), {}).items() for box in boxes]
    n_claims = rng.randint(4, 8)
    parts: list[str] = []
    for k in range(n_claims):
        parts.append(" ".join(rng.sample(PROSE, 2)))
        if gt:
            t, name, b = rng.choice(gt)
            jitter = rng.uniform(-8, 8)
            box = [b[0] * w + jitter, b[1] * h - jitter, b[2] * w + jitter, b[3] * h]
            t += rng.choice([0.0, 0.5, -1.0, 3.0])
        else:
            name, t = rng.choice(OBJECTS), rng.uniform(0, 30)
            box = [rng.uniform(0, w / 2), rng.uniform(0, h / 2), rng.uniform(w / 2, w), rng.uniform(h / 2, h)]
        if rng.random() < 0.3:
            name = rng.choice(OBJECTS)                     # a wrong or partial identity
        n_boxes = 1 if rng.random() < 0.8 else 2
        boxes = "".join(f"<box>[{', '.join(f'{v + 3 * i:.1f}' for v in box)}]</box>"
                        for i in range(n_boxes))
        parts.append(f" At <t>{t:.1f}</t>s the <obj>{name}</obj>{boxes} at <t>{t:.1f}</t>s "
                     f"is visible. ")
        if k % 3 == 1:
            parts.append(f"Around <t>{_num(rng, 0, 30)}</t>s it moves. ")
    think = "".join(parts)
    while len(think) < target_chars - 100:
        think += " " + rng.choice(PROSE)
    task = rec["task"]
    if task in ("General video QA MCQ", "temporal QA (MCQ)"):
        answer = rng.choice(["A", "B", "C. the person", "(D)"])
    elif task == "temporal QA":
        answer = f"[{_num(rng, 0, 15)}, {_num(rng, 15, 30)}]"
    elif task == "visual QA":
        corners = (_num(rng, 0, 200), _num(rng, 0, 100), _num(rng, 200, 400), _num(rng, 100, 300))
        answer = f"<box>[{', '.join(corners)}]</box>"
    else:
        answer = f"The {rng.choice(OBJECTS)} picks up the {rng.choice(OBJECTS)} and walks away."
    return f"<think>{think}</think>\n<answer>{answer}</answer>"


def make_batch(n: int, group: int, tasks: tuple[str, ...], seed: int = 0) -> tuple[list[str], list[dict]]:
    """``n`` rollouts, ``group`` per record (the rollouts of a record share the dict)."""
    rng = random.Random(seed)
    texts, samples = [], []
    for i in range(0, n, group):
        rec = make_record(rng, tasks[(i // group) % len(tasks)])
        for _ in range(min(group, n - i)):
            texts.append(make_output(rng, rec))
            samples.append(rec)
    return texts, samples


def check_equal(texts, samples, cfg) -> None:
    fast, ref = score(texts, samples, cfg), score_reference(texts, samples, cfg)
    for k in fast:
        torch.testing.assert_close(fast[k], ref[k], atol=1e-6, rtol=0, msg=k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512, help="rollouts")
    ap.add_argument("--group", type=int, default=4, help="rollouts per record (G)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--profile", action="store_true", help="cProfile score on the main batch")
    args = ap.parse_args()
    cfg = RewardConfig()
    torch.set_num_threads(1)  # the scoring runs beside the trainer; keep it to one core

    rows = []
    for label, tasks in (("main", MAIN_TASKS), ("free-form", FREE_FORM_TASKS)):
        texts, samples = make_batch(args.n, args.group, tasks)
        check_equal(texts, samples, cfg)
        n_claims = parse_texts(texts).claims.claim_t.numel()
        chars = sum(map(len, texts)) / len(texts)

        fns = {
            "reference": lambda: score_reference(texts, samples, cfg),
            "score/python": lambda: score(texts, samples, cfg, frontend="python"),
            "score/native": lambda: score(texts, samples, cfg, frontend="native"),
            "records": lambda: batched.convert_records(samples),
        }
        records, index = batched.convert_records(samples)
        converted = [records[i] for i in index]     # shared per record, as the loader's are
        fns["score/loader"] = lambda: score(texts, converted, cfg, frontend="native")
        if label == "free-form":
            pairs = {(t.split("<answer>")[-1].split("</answer>")[0], s["answer"])
                     for t, s in zip(texts, samples)}
            fns["rouge"] = lambda: [rouge(a, b) for a, b in pairs]
            answers, truths = [a for a, _ in pairs], [b for _, b in pairs]
            fns["rouge/batched"] = lambda: rouge_batch(answers, truths)
        # Interleaved rounds: a burst of load from other jobs on the machine hits every row alike.
        timings = measure_each(fns, repeats=args.repeats, warmup=1, gc_off=True)
        base = timings["reference"].min
        for impl, t in timings.items():
            rows.append(dict(
                batch=label, impl=impl, n=len(texts), group=args.group, chars=round(chars),
                claims=n_claims, threads=torch.get_num_threads(), ms=t.min * 1e3,
                # records and rouge are parts of score, not alternatives to the reference
                speedup=base / t.min if impl not in ("records", "rouge", "rouge/batched") else None))
        if args.profile and label == "main":
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(5):
                score(texts, samples, cfg, frontend="native")
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)

    print_table(rows, ["batch", "impl", "n", "chars", "claims", ("ms", "best ms", ".3f"),
                       ("speedup", "speedup", "{:.1f}x")])
    write_results("rewards", results_from_rows(
        rows, ["batch", "n", "group", "chars", "claims", "threads"],
        {"ms": ("time_min", "ms"), "speedup": ("speedup_vs_reference", "x")}, repeats=args.repeats))


if __name__ == "__main__":
    main()
