"""One RL step of this project against TRL's ``GRPOTrainer``, on the same tiny model (CPU).

The comparison a new user would make, in one run: the same tiny random-weight Qwen2.5-VL
(``visioncoach/configs/tiny.yaml``: seed 0, real 151,936-token vocabulary, fp32), the same
prompt (the first record of the bundled synthetic dataset: its frames decoded and resized
once, given to both sides as the same images, the same system prompt and prompt text), one
prompt per step, G completions of exactly ``--max-new-tokens`` tokens (no EOS stop),
temperature 1, top-p 0.95, no top-k, this project's reward (``visioncoach.rewards.score``, all
four components) on both sides, fused AdamW (tiny.yaml's lr 1e-4, weight decay 0.01, grad clip
5), cosine schedule, vision tower frozen on both sides (this project's RL never trains it),
``torch.set_num_threads(--threads)``.

  ours   ``visioncoach.trainer.rl.RLRunner.train_step``, built as ``python -m visioncoach.train
         --stage=rl`` builds it from tiny.yaml, with ``--vp.selector=none`` (plain GSPO: TRL has
         no visual prompting, so no hard-sample re-rollouts), ``loss.beta``, ``loss.
         updates_per_rollout`` = mu, GSPO clip 3e-4 / 4e-4; EOS stop switched off (the
         runner's stop list emptied). Phases from its own per-step timings.
  trl    ``trl.GRPOTrainer(...).train()`` (TRL 1.16.0) on the model saved to a folder (so the
         beta > 0 reference model is loaded from it, as for a user's checkpoint), with
         ``GRPOConfig(importance_sampling_level="sequence", loss_type="grpo", beta,
         num_iterations=mu, num_generations=G, per_device_train_batch_size=G,
         max_completion_length=N, temperature=1, top_p=0.95, top_k=0, epsilon=3e-4,
         epsilon_high=4e-4, use_cpu=True)``, ``generation_kwargs={"min_new_tokens": N}`` (EOS
         masked until N tokens: every completion has N tokens) and the reward wrapped as a TRL
         reward function. Phases: timers wrapped around the trainer's ``_generate`` (generation),
         ``_get_per_token_logps_and_entropies`` (every log-prob forward: old, reference and
         policy), ``_calculate_rewards``, and from ``accelerator.backward`` to the end of the
         optimizer step (backward + clip + AdamW + schedule + zero_grad).

A step is one rollout batch and its mu updates (TRL: mu trainer steps, the first of which
generates). Each implementation runs in its own worker process (so its peak RSS is its own),
built fresh for each case; the parent alternates the steps (ours, trl, ours, trl, ...) after
one untimed warm-up step each. Per step and side: wall and CPU time (``time.process_time``,
all threads) of the step and of generation / log-prob forwards / backward + optimizer, vision-
encoder calls and images through it (a forward pre-hook on each model's vision tower, the
reference model's included), tokens generated, the prompt's token ids (both sides must have
been given the same ones: the script says whether they were) and the process's peak RSS.
Ours' phases: gen = prep + rollout, logprob = ref_logprobs + policy_logprobs (the latter with
the loss kernel), bwd+opt = backward_optim, of its own ``Phases``; "other" is the step's time
outside the named phases on either side (TRL: the second processor call, the loss math,
metrics). The table shows medians over the timed steps; "vs trl" is TRL's median step time over
ours, same case, same run.

Cases: G in ``--groups`` with beta 0 and mu 1 (the main rows), then, at the largest G, beta
0.04 (a reference model on both sides) and mu 2 (two updates per rollout), with
``--extra-repeats`` timed steps (default 1, to keep the default run near 8 minutes on a quiet
2-core machine), unless ``--no-extra``. TRL is an optional extra (``pip install -e .[bench]``); without it the
script says so, times ours alone and exits 0.

    python bench/bench_rl_step.py                  # 128 new tokens, 2 (extra rows: 1) repeats
    python bench/bench_rl_step.py --quick          # smoke run: 8 new tokens, 1 repeat
    python bench/bench_rl_step.py --groups 8 --repeats 5 --no-extra

Prints a table and appends CSV rows to bench/results/rl_step.csv (``--no-csv`` to skip).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}.items():
    os.environ.setdefault(_k, _v)

from _common import print_table, results_from_rows, write_results
from _rl_step_workers import BETA_EXTRA, PHASES, worker_main

TRL_VERSION = "1.16.0"
TRL_MISSING = "skipped: TRL not installed (pip install -e .[bench])"


def trl_version() -> str | None:
    """The installed TRL's version, or None without it (a cheap import: trl loads lazily)."""
    try:
        import trl
    except ImportError:
        return None
    return trl.__version__


# ------------------------------------------------------------------------------ parent side

class Worker:
    """One implementation's worker process for one case."""

    def __init__(self, impl: str, case: dict):
        self.impl = impl
        # Open for the worker's lifetime (its stderr), closed in close().
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"bench_rl_step_{impl}_", suffix=".log")  # noqa: SIM115
        env = {**os.environ, "OMP_NUM_THREADS": str(case["threads"]), "MKL_NUM_THREADS": str(case["threads"])}
        # The worker imports bench/_common.py from its own folder, which PYTHONSAFEPATH would hide.
        env.pop("PYTHONSAFEPATH", None)
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", impl,
                                      "--case", json.dumps(case)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.seek(0)
            tail = "".join(self.log.readlines()[-40:])
            raise RuntimeError(f"the {self.impl} worker exited (code {self.proc.returncode}); its log:\n{tail}")
        return json.loads(line)

    def ready(self) -> dict:
        return self.read()["ready"]

    def step(self) -> dict:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self.read()["step"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def run_case(case: dict, impls: list[str], warmup: int, repeats: int) -> dict[str, list[dict]]:
    """Per implementation, its timed steps' reports (warm-up steps dropped), steps alternating."""
    workers = {impl: Worker(impl, case) for impl in impls}   # start-ups overlap: not timed
    try:
        info = {impl: w.ready() for impl, w in workers.items()}
        if len({round(i["checksum"], 6) for i in info.values()}) != 1:
            raise RuntimeError(f"the sides built different weights: {info}")
        steps: dict[str, list[dict]] = {impl: [] for impl in impls}
        for r in range(warmup + repeats):
            for impl, w in workers.items():
                s = w.step()
                if r >= warmup:
                    steps[impl].append(s)
        return {"info": info, "steps": steps}
    finally:
        for w in workers.values():
            w.close()


def summarize(impl: str, case: dict, steps: list[dict], info: dict) -> dict:
    def med(key: str) -> float:
        return statistics.median(s[key] for s in steps)

    row = {"impl": impl, "G": case["G"], "beta": case["beta"], "mu": case["mu"], "repeats": len(steps),
           "tokens": med("tokens"), "prompt_tokens": len(steps[-1]["prompt_ids"]),
           "frames": info["frames"],
           "step_s": med("wall"), "cpu_s": med("cpu"), "peak_rss_gb": max(s["peak_rss_gb"] for s in steps),
           "vision_calls": med("vision_calls"), "images": med("images"),
           "all_s": [round(s["wall"], 2) for s in steps]}
    for k in PHASES:
        row[f"{k}_s"] = med(f"{k}_wall")
        row[f"{k}_cpu_s"] = med(f"{k}_cpu")
    row["other_s"] = statistics.median(s["wall"] - sum(s[f"{k}_wall"] for k in PHASES) for s in steps)
    return row


def cases_of(args) -> list[dict]:
    """The main rows (every G, beta 0, mu 1), then the extra ones at the largest G."""
    base = {"new_tokens": args.max_new_tokens, "threads": args.threads}
    out = [{**base, "G": g, "beta": 0.0, "mu": 1, "repeats": args.repeats} for g in args.groups]
    if not args.no_extra:
        extra = {**base, "G": max(args.groups), "repeats": args.extra_repeats}
        out += [{**extra, "beta": BETA_EXTRA, "mu": 1}, {**extra, "beta": 0.0, "mu": 2}]
    for c in out:
        c["steps"] = args.warmup + c["repeats"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, nargs="+", default=[4, 8], help="G values of the main rows")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 128 (--quick: 8)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed steps per side of a main row (default 2; --quick: 1)")
    ap.add_argument("--extra-repeats", type=int, default=None,
                    help="timed steps per side of the beta > 0 and mu = 2 rows (default 1)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per side and case first")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each worker")
    ap.add_argument("--no-extra", action="store_true", help="skip the beta > 0 and mu = 2 rows")
    ap.add_argument("--quick", action="store_true", help="smoke run: 8 new tokens, 1 repeat")
    ap.add_argument("--no-trl", action="store_true", help="time ours alone")
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("--csv-dir", type=Path, default=None, help="default: bench/results")
    ap.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, json.loads(args.case))
    quick = {"max_new_tokens": 8, "repeats": 1, "extra_repeats": 1}
    full = {"max_new_tokens": 128, "repeats": 2, "extra_repeats": 1}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("max_new_tokens", "repeats", "extra_repeats", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or min(args.groups) < 2:
        ap.error("--warmup must be >= 0 and every --groups value >= 2 (GRPO needs a group)")

    impls = ["ours"]
    if args.no_trl:
        print("TRL: not timed (--no-trl)")
    elif (version := trl_version()) is None:
        print(TRL_MISSING)
    else:
        if version != TRL_VERSION:
            print(f"note: TRL {version} installed; the comparison is set up for {TRL_VERSION}")
        impls.append("trl")
    cases = cases_of(args)
    print(f"{len(cases)} case(s) x {impls}: {args.max_new_tokens} new tokens, {args.warmup} warm-up + "
          f"{args.repeats} timed step(s) per side ({args.extra_repeats} for the extra rows), alternating, "
          f"{args.threads} threads per worker; load average {os.getloadavg()[0]:.2f}", flush=True)
    t0 = time.perf_counter()
    rows = []
    for case in cases:
        res = run_case(case, impls, args.warmup, case["repeats"])
        case_rows = {impl: summarize(impl, case, res["steps"][impl], res["info"][impl]) for impl in impls}
        if "trl" in case_rows:
            same = res["steps"]["ours"][-1]["prompt_ids"] == res["steps"]["trl"][-1]["prompt_ids"]
            for row in case_rows.values():
                row["same_prompt"] = same
            print(f"  prompt: {case_rows['ours']['prompt_tokens']} tokens ({case_rows['ours']['frames']} "
                  f"frames) ours, {case_rows['trl']['prompt_tokens']} TRL; identical token ids: "
                  f"{'yes' if same else 'NO'}", flush=True)
        for impl, row in case_rows.items():
            row["speedup"] = case_rows["trl"]["step_s"] / row["step_s"] if "trl" in case_rows else None
            rows.append(row)
            print(f"  G={case['G']} beta={case['beta']} mu={case['mu']} {impl}: steps {row['all_s']} s",
                  flush=True)
    print()
    print_table(rows, ["impl", "G", "beta", "mu", ("tokens", "tokens", ".0f"),
                       ("step_s", "step s", ".2f"), ("gen_s", "gen s", ".2f"),
                       ("logprob_s", "logprob s", ".2f"), ("bwd_opt_s", "bwd+opt s", ".2f"),
                       ("reward_s", "reward s", ".3f"), ("other_s", "other s", ".2f"),
                       ("cpu_s", "CPU s", ".2f"), ("peak_rss_gb", "peak RSS GB", ".2f"),
                       ("vision_calls", "vision calls", ".0f"), ("images", "images", ".0f"),
                       ("speedup", "vs trl", "{:.2f}x")],
                title=f"RL step: median over the timed steps (wall s; CPU s: all threads), "
                      f"{args.max_new_tokens} new tokens, {args.threads} threads")
    print(f"total {time.perf_counter() - t0:.0f} s; load average now {os.getloadavg()[0]:.2f}")
    if not args.no_csv:
        metrics = {"step_s": ("time_median", "s"), "cpu_s": ("cpu_time_median", "s"),
                   **{f"{k}_s": (f"{k}_time_median", "s") for k in (*PHASES, "other")},
                   **{f"{k}_cpu_s": (f"{k}_cpu_time_median", "s") for k in PHASES},
                   "peak_rss_gb": ("peak_rss", "GiB"), "vision_calls": ("vision_calls", "count"),
                   "images": ("vision_images", "count"), "tokens": ("tokens_generated", "count"),
                   "speedup": ("speedup_vs_trl", "x")}
        kw = {"directory": args.csv_dir} if args.csv_dir else {}
        write_results("rl_step", results_from_rows(
            rows, ["G", "beta", "mu", "repeats"], metrics, new_tokens=args.max_new_tokens,
            threads=args.threads, trl=version if "trl" in impls else "none"), device="cpu", **kw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
