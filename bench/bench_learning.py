"""Learning evidence: a CPU-sized version of the paper's main ablation (Table 5), with curves.

Does RL raise the reward, and do VisionCoach's parts (visual prompts on hard samples +
self-distillation) help over plain GSPO? On the synthetic ``color`` task
(``visioncoach.data.synthetic``: one shape per clip, "what colour is it" as a four-option
MCQ, a reasoning of one grounded claim, so accuracy, format, temporal and spatial rewards all
have something to score), per seed:

1. an alignment run (``--stage=sft`` with ``loss.sft_answer_weight=1000``: the loss is
   almost all on the answer letter, the one target token that depends on the frames), so the
   random-init model learns to read the colour at all. A pretrained Qwen2.5-VL brings this
   from pretraining; without it the tiny model never reads the frames and answers with the
   colour prior whatever the training (measured: README "Does it learn?");
2. from it, the SFT cold start (``--stage=sft --model.path=<the alignment run>``, answer
   weight 20): the format and the claim layout, keeping most of what the alignment learned;
3. from that checkpoint, each RL arm with the same steps, prompts and rollouts
   (``--stage=rl --model.path=<the SFT run>``), on clips the SFT runs never saw (as the
   paper's RL set is not its cold-start set): ``RL_CLIPS`` clips of generator seed
   ``RL_SEED_OFFSET + seed``, one epoch (RL on the cold start's own 64 clips, which the SFT
   runs had fit, moved the held-out reward by noise only: README "Does it learn?"). The arms:

   =============  ==================================================================
   sft            the control: the SFT checkpoint, no RL update
   gspo           plain GSPO: ``vp.selector=none``, ``loss.sd_alpha=0``
   gspo+vp+sd     GSPO + visual prompts on hard samples (the reward-gating rule of
                  appendix D.3; no trained selector ships) + self-distillation
                  (``loss.sd_alpha=0.1``, the paper's)
   gspo+vp+sd/max the same with ``reward.spatial_mode=max`` (eq. 13, the paper's
                  reward ablation; not run by default)
   =============  ==================================================================

Every run goes through the normal entry point, ``torchrun -m visioncoach.train``, with the
overrides printed before it starts (``--dry-run`` prints them and stops). The task, the
shared settings and the arms are fixed here, before any result: no knob differs per arm
except the arm's own. Evaluation is the trainer's held-out check (``summary.json``
``heldout``): 64 clips of a fixed other seed, greedy, no visual prompt (as the paper
evaluates), every reward component, before and after RL.

Reported per arm, over seeds: held-out mean reward per component after RL with a 95%
confidence interval (Student t over seeds), the paired difference to the control (same SFT
checkpoint per seed), the training reward per step, hard fraction, VP re-rollouts and
distilled rows per step, wall time. Prints a table, appends rows to
``bench/results/learning.csv`` (the schema of bench/_common.py: per-run numbers and per-step
curves) and draws ``bench/results/learning.png`` (training reward vs step per arm, the band
spanning the seeds; the paired held-out difference to the control per RL arm, per seed and
its mean with the interval) when matplotlib is installed (``pip install -e .[bench]``).

    python bench/bench_learning.py                       # 3 seeds, sft / gspo / gspo+vp+sd
    python bench/bench_learning.py --arms gspo --seeds 0 # one arm, one seed (its SFT first)
    python bench/bench_learning.py --dry-run             # the commands, nothing run

Runs go to ``--workdir`` (default runs/learning); a run whose ``summary.json`` says it
completed with the same overrides is reused, so an interrupted benchmark continues
(``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from _common import RESULTS, Result, print_table, write_results

# The task and what every run shares (on top of visioncoach/configs/tiny.yaml, the embedded
# default). The same for every arm; how each setting was chosen, and on which clips: README
# "Does it learn?".
TASK = [
    "--data.synthetic_tasks=color",
    "--data.synthetic_samples=64",
    "--data.heldout_samples=64",       # one changed answer: 1/64 of the accuracy
    "--data.heldout_seed=1000",        # the same held-out clips for every seed
    "--data.num_workers=1",
    "--rollout.max_new_tokens=64",     # the reference reasoning is ~40 tokens
    "--log.progress=false",
    "--log.tensorboard=false",
    "--log.checkpoint_every=1000000",  # the final checkpoint only
    "--log.keep_checkpoints=1",
]
ALIGN = [
    "--stage=sft",
    "--optim.sft_steps=300",
    "--optim.sft_lr=1e-3",
    "--loss.sft_answer_weight=1000",   # ~96% of the loss on the answer letter
]
SFT = [
    "--stage=sft",
    "--optim.sft_steps=600",
    "--optim.sft_lr=3e-3",             # 1e-2 learns the format faster but unlearns the colour
    "--loss.sft_answer_weight=20",     # ~30% of the loss on the answer
]
RL = [
    "--stage=rl",
    "--optim.rl_steps=40",
    "--optim.lr=1e-3",                 # a random-init 2-layer model: 1e-4 barely moves it in 40 steps
    "--optim.warmup_ratio=0",
    "--rollout.num_generations=4",
    "--rollout.prompts_per_step=4",
    "--loss.updates_per_rollout=1",    # the paper's (B.2)
    "--vp.hard_mode=absolute",
    "--vp.hard_threshold=2.21",        # the paper's bar (rewards here top out at 4, as there)
]


# RL's clips: RL_CLIPS = optim.rl_steps x rollout.prompts_per_step, so each prompt is a clip
# seen once; the generator seed is RL_SEED_OFFSET + the run's seed (the SFT runs use the run's
# seed, the held-out check data.heldout_seed=1000: three disjoint sets for seeds below 500).
RL_CLIPS = 160
RL_SEED_OFFSET = 500


@dataclass(frozen=True)
class Arm:
    label: str
    overrides: tuple[str, ...] | None   # None: no RL run (the control)


ARMS = {
    "sft": Arm("SFT only (control)", None),
    "gspo": Arm("plain GSPO", ("--vp.selector=none", "--loss.sd_alpha=0")),
    "gspo+vp+sd": Arm("GSPO + VP (gating) + SD", ("--vp.selector=gating", "--loss.sd_alpha=0.1")),
    "gspo+vp+sd/max": Arm("GSPO + VP + SD, spatial max", ("--vp.selector=gating", "--loss.sd_alpha=0.1",
                                                           "--reward.spatial_mode=max")),
}
DEFAULT_ARMS = ("sft", "gspo", "gspo+vp+sd")
COMPONENTS = ("accuracy", "format", "temporal", "spatial", "total")

# Two-sided 95% Student t quantiles by degrees of freedom (1..10); beyond, 1.96 is close.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228}


def ci95(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% interval over ``values``); the half-width is nan for one value."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, math.nan
    return m, T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def run_dir(workdir: Path, seed: int, arm: str) -> Path:
    return workdir / f"seed{seed}" / arm.replace("/", "_")


def arm_overrides(arm: str, seed: int, workdir: Path) -> list[str]:
    """The full override list of one run: ``align`` (the alignment run), ``sft`` (the SFT cold
    start from it, which all RL arms start from) or an RL arm."""
    common = [f"--seed={seed}", f"--output_dir={run_dir(workdir, seed, arm)}", *TASK]
    if arm == "align":
        return common + ALIGN
    if arm == "sft":
        return common + SFT + [f"--model.path={run_dir(workdir, seed, 'align')}"]
    clips = [f"--data.synthetic_seed={RL_SEED_OFFSET + seed}", f"--data.synthetic_samples={RL_CLIPS}"]
    return common + RL + clips + [f"--model.path={run_dir(workdir, seed, 'sft')}", *ARMS[arm].overrides]


def command(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
            "-m", "visioncoach.train", *overrides]


def run_stamp(overrides: list[str]) -> dict:
    """What a reusable run must match: its overrides, when the run it starts from
    (``--model.path``) started, so a run over a base that was redone since is redone too, and
    the synthetic generator's version (a run on other clips is not this run)."""
    from visioncoach.data.synthetic import VERSION

    base = next((o.split("=", 1)[1] for o in overrides if o.startswith("--model.path=")), None)
    started = None
    if base is not None:
        try:
            started = json.loads((Path(base) / "summary.json").read_text())["segments"][-1]["started"]
        except (OSError, ValueError, KeyError, IndexError):
            pass
    return {"overrides": overrides, "base_started": started, "clips": VERSION}


def completed(out: Path, stamp: dict) -> dict | None:
    """The summary of a finished run with this stamp (``run_stamp``), else None."""
    try:
        summary = json.loads((out / "summary.json").read_text())
        same = json.loads((out / "bench_overrides.json").read_text()) == stamp
    except (OSError, ValueError):
        return None
    done = summary.get("segments") and summary["segments"][-1].get("status") == "completed"
    return summary if done and same else None


def run(arm: str, seed: int, workdir: Path, log_dir: Path) -> dict:
    """Run (or reuse) one arm for one seed; returns its summary.json."""
    overrides = arm_overrides(arm, seed, workdir)
    out = run_dir(workdir, seed, arm)
    stamp = run_stamp(overrides)
    summary = completed(out, stamp)
    if summary is not None:
        print(f"[{arm} seed {seed}] reusing {out}", flush=True)
        return summary
    if out.exists():
        shutil.rmtree(out)
    cmd = command(overrides)
    log = log_dir / f"{arm.replace('/', '_')}-seed{seed}.log"
    print(f"[{arm} seed {seed}] {shlex.join(cmd)}\n  log: {log}", flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=False).returncode
    if rc != 0:
        tail = log.read_text().splitlines()[-20:]
        raise SystemExit(f"[{arm} seed {seed}] exited with {rc}; the end of {log}:\n" + "\n".join(tail))
    (out / "bench_overrides.json").write_text(json.dumps(stamp))
    print(f"[{arm} seed {seed}] done in {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads((out / "summary.json").read_text())


def curve(out: Path) -> list[dict]:
    """The RL steps of a run's metrics.jsonl."""
    from visioncoach.trainer.metrics import read_rows

    return [r for r in read_rows(out / "metrics.jsonl", stage="rl") if "reward_total" in r]


def per_run(arm: str, seed: int, summary: dict, workdir: Path) -> dict:
    """One row: held-out after the arm (the control: after SFT), RL's per-step means, wall time."""
    held = summary["heldout"]
    if arm == "sft":
        return dict(arm=arm, seed=seed, **held["after_sft"], wall_s=summary["wall_time_s"])
    steps = curve(run_dir(workdir, seed, arm))
    n = max(1, len(steps))
    return dict(arm=arm, seed=seed, **held["after_rl"], before_total=held["before_rl"]["total"],
                wall_s=summary["wall_time_s"], steps=len(steps),
                train_first=statistics.fmean(r["reward_total"] for r in steps[:5]) if steps else None,
                train_last=statistics.fmean(r["reward_total"] for r in steps[-5:]) if steps else None,
                hard_frac=sum(r.get("hard_frac", 0.0) for r in steps) / n,
                vp_rollouts=sum(r.get("vp_rollouts", 0) for r in steps) / n,
                sd_rows=sum(r.get("sd_rows", 0) for r in steps) / n)


def aggregate(rows: list[dict], arms: list[str]) -> list[dict]:
    """Per arm: mean and 95% half-width over seeds, and the paired difference to the control."""
    control = {r["seed"]: r for r in rows if r["arm"] == "sft"}
    out = []
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        if not mine:
            continue
        a = {"arm": arm, "label": ARMS[arm].label, "seeds": len(mine)}
        for k in COMPONENTS:
            a[k], a[f"{k}_ci"] = ci95([r[k] for r in mine])
        diffs = [r["total"] - control[r["seed"]]["total"] for r in mine if r["seed"] in control]
        if arm != "sft" and diffs:
            a["vs_sft"], a["vs_sft_ci"] = ci95(diffs)
        for k in ("hard_frac", "vp_rollouts", "sd_rows", "wall_s"):
            vals = [r[k] for r in mine if r.get(k) is not None]
            a[k] = statistics.fmean(vals) if vals else None
        out.append(a)
    return out


def pm(key: str, fmt: str = ".3f"):
    def cell(a: dict) -> str:
        m, h = a.get(key), a.get(f"{key}_ci")
        if m is None:
            return "-"
        return f"{m:{fmt}}" if h is None or math.isnan(h) else f"{m:{fmt}} ± {h:{fmt}}"
    return cell


def plot(rows: list[dict], arms: list[str], agg: list[dict], workdir: Path, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install -e .[bench])", file=sys.stderr)
        return False
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    for arm in arms:
        if ARMS[arm].overrides is None:
            continue
        curves = [[r["reward_total"] for r in curve(run_dir(workdir, row["seed"], arm))]
                  for row in rows if row["arm"] == arm]
        if not curves:
            continue
        n = min(map(len, curves))
        smooth = [_moving_mean(c[:n], 5) for c in curves]
        mean = [statistics.fmean(c[i] for c in smooth) for i in range(n)]
        lo = [min(c[i] for c in smooth) for i in range(n)]
        hi = [max(c[i] for c in smooth) for i in range(n)]
        steps = list(range(1, n + 1))
        ax.plot(steps, mean, label=ARMS[arm].label, color=_color(arm))
        ax.fill_between(steps, lo, hi, alpha=0.2, color=_color(arm))
    ax.set_xlabel("RL step")
    ax.set_ylabel("training reward (raw rollouts, 5-step mean)")
    ax.set_title(f"training reward: mean over seeds, band = min..max of {len({r['seed'] for r in rows})} seeds")
    ax.legend(fontsize=8)
    # The paired difference is the benchmark's question (same SFT checkpoint per seed); the
    # arms' own intervals also carry how differently the seeds' SFT runs ended.
    rl_agg = [a for a in agg if a.get("vs_sft") is not None]
    control = {r["seed"]: r["total"] for r in rows if r["arm"] == "sft"}
    for i, a in enumerate(rl_agg):
        h = a["vs_sft_ci"]
        bx.bar(i, a["vs_sft"], yerr=0 if math.isnan(h) else h, capsize=4, color=_color(a["arm"]), alpha=0.7)
        diffs = [r["total"] - control[r["seed"]] for r in rows if r["arm"] == a["arm"] and r["seed"] in control]
        bx.plot([i] * len(diffs), diffs, "k.", markersize=8)
    bx.axhline(0, color="gray", linewidth=0.8)
    bx.set_xticks(range(len(rl_agg)), [a["label"] for a in rl_agg], rotation=15, ha="right", fontsize=8)
    bx.set_ylabel("held-out total reward - control (greedy, no VP)")
    bx.set_title("after RL minus the same seed's SFT control\n(dots: seeds; bar: mean, 95% CI)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
    return True


def _color(arm: str) -> str:
    """One colour per arm in both panels."""
    return f"C{list(ARMS).index(arm)}"


def _moving_mean(xs: list[float], k: int) -> list[float]:
    return [statistics.fmean(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                    help=f"comma-separated, of {', '.join(ARMS)} (the control 'sft' is always run)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workdir", type=Path, default=Path("runs/learning"))
    ap.add_argument("--results", type=Path, default=RESULTS, help="CSV and PNG folder")
    ap.add_argument("--fresh", action="store_true", help="delete --workdir first")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    ap.add_argument("--no-csv", action="store_true", help="print and plot only (e.g. to redraw)")
    args = ap.parse_args()
    arms = ["sft"] + [a for a in args.arms.split(",") if a and a != "sft"]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"--arms: unknown arm(s) {unknown}; expected some of {list(ARMS)}")
    if args.dry_run:
        for seed in args.seeds:
            for arm in ["align", *arms]:
                print(shlex.join(command(arm_overrides(arm, seed, args.workdir))))
        return
    if args.fresh and args.workdir.exists():
        shutil.rmtree(args.workdir)
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = []
    for seed in args.seeds:
        run("align", seed, args.workdir, args.workdir)
        for arm in arms:
            rows.append(per_run(arm, seed, run(arm, seed, args.workdir, args.workdir), args.workdir))
    wall = time.perf_counter() - t0

    print_table(rows, ["arm", "seed", ("accuracy", "acc", ".3f"), ("format", "fmt", ".3f"),
                       ("temporal", "tmp", ".3f"), ("spatial", "spa", ".3f"), ("total", "total", ".3f"),
                       ("train_first", "train first5", ".3f"), ("train_last", "train last5", ".3f"),
                       ("hard_frac", "hard", ".2f"), ("vp_rollouts", "VP groups/step", ".2f"),
                       ("sd_rows", "SD rows/step", ".2f"), ("wall_s", "wall s", ".0f")],
                title="per run: held-out mean reward after the arm (greedy, no VP); RL per-step means")
    agg = aggregate(rows, arms)
    print_table(agg, ["label", "seeds", (pm("accuracy"), "accuracy"), (pm("format"), "format"),
                      (pm("temporal"), "temporal"), (pm("spatial"), "spatial"), (pm("total"), "total"),
                      (pm("vs_sft"), "total - control (paired)"), ("hard_frac", "hard", ".2f"),
                      ("vp_rollouts", "VP groups/step", ".2f"), ("sd_rows", "SD rows/step", ".2f"),
                      ("wall_s", "wall s", ".0f")],
                title=f"held-out reward after RL, mean ± 95% CI over seeds {args.seeds} "
                      f"(this invocation: {wall / 60:.1f} min; reused runs cost nothing, their own times are in 'wall s')")

    results = []
    for r in rows:
        case = f"arm={r['arm']};seed={r['seed']}"
        results += [Result(case, r["arm"], f"heldout_{k}", r[k], "reward") for k in COMPONENTS]
        results += [Result(case, r["arm"], k, r[k], unit) for k, unit in
                    (("hard_frac", "fraction"), ("vp_rollouts", "groups/step"), ("sd_rows", "rows/step"),
                     ("wall_s", "s")) if r.get(k) is not None]
        if ARMS[r["arm"]].overrides is not None:
            for m in curve(run_dir(args.workdir, r["seed"], r["arm"])):
                results.append(Result(f"{case};step={m['step']}", r["arm"], "train_reward_total",
                                      m["reward_total"], "reward"))
    for a in agg:
        for k in (*COMPONENTS, "vs_sft"):
            if a.get(k) is not None:
                results.append(Result(f"arm={a['arm']};seeds={a['seeds']}", a["arm"], f"heldout_{k}_mean",
                                      a[k], "reward"))
                if not math.isnan(a[f"{k}_ci"]):
                    results.append(Result(f"arm={a['arm']};seeds={a['seeds']}", a["arm"],
                                          f"heldout_{k}_ci95", a[f"{k}_ci"], "reward"))
    if not args.no_csv:
        write_results("learning", results, directory=args.results)
    args.results.mkdir(parents=True, exist_ok=True)
    plot(rows, arms, agg, args.workdir, args.results / "learning.png")


if __name__ == "__main__":
    main()
