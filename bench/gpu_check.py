"""The GPU check kit (``make gpu-check``): what a machine with one NVIDIA GPU has to confirm, in
at most 8 minutes, written to one Markdown and one JSON report (README "GPU work" has the
JSON schema).

Steps, in order, each in its own process group with its own time limit (``PLAN``); a step
that fails, raises or runs past its limit is recorded (a timed-out step keeps the numbers it
had saved) and the kit goes on with the next:

  1. gpu_tests  every ``gpu``-marked test (``pytest -m gpu``)
  2. kernels    Triton kernels vs the PyTorch reference and Liger-Kernel, GB/s vs peak
                (bench/gpu_check_kernels.py)
  3. train      rollout + RL steps of a random-weight Qwen2.5-VL-7B truncated to 2 + 2 layers,
                CUDA-graph decode off and on, through ``torchrun -m visioncoach.train``
                (bench/gpu_check_train.py)
  4. video      DALI (NVDEC) decode vs PyAV, then VP rendering on the GPU vs the CPU reference
                (bench/gpu_check_video.py)

Without CUDA (or with ``--no-gpu``) every step is ``skipped`` with the reason, and its
CPU-safe part runs instead, as the step's ``dry_run`` (imports and entry points it needs, its
case plan, the truncated-7B model on the meta device, the CPU reference side of the video
step). No number measured there is a GPU number, and none is reported as one.

Exit code: with a GPU, 0 when every step passed, else 1; without one, 0 unless a CPU-safe
check failed (1: the kit itself would break on a GPU machine).

    bash scripts/gpu_check.sh [--out DIR] [--steps kernels,video] [--budget-s 480] [--no-gpu] [--plan]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# The step modules and bench/_common.py import by name, with or without PYTHONSAFEPATH.
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import gpu_check_report as report  # noqa: E402

BUDGET_S = 480            # the bound for the whole kit: 8 minutes
DRY_RUN_LIMIT_S = 90      # a CPU-safe part on a slow shared machine
MIN_STEP_S = 10           # less time than this left: the step is skipped, not started
KILL_GRACE_S = 5          # SIGTERM, then SIGKILL after this long


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    limit_s: float
    needs_gpu: bool = True
    # None: this file's worker for ``name`` (``--worker name``); else the command to run.
    argv: tuple[str, ...] | None = None


# The limits add up to 455 s: with start-up and the environment the kit stays under BUDGET_S.
PLAN = (
    Step("gpu_tests", "every gpu-marked test (pytest -m gpu)", 90),
    Step("kernels", "kernel benchmarks (triton.testing.do_bench): GB/s vs peak, vs reference and "
                    "Liger-Kernel", 110),
    Step("train", "rollout + RL step, Qwen2.5-VL-7B shapes truncated to 2+2 layers, CUDA-graph "
                  "decode off/on", 210),
    Step("video", "DALI decode vs PyAV, VP render on GPU vs the CPU reference", 45),
)


# ------------------------------------------------------------------------------ worker side

class StepContext:
    """What a step's worker gets: where to write, and ``save()`` to publish its numbers so far
    (a step killed at its limit keeps what it had saved)."""

    def __init__(self, name: str, result: Path, out_dir: Path, dry_run: bool):
        self.name, self.result, self.out_dir, self.dry_run = name, result, out_dir, dry_run
        self.numbers: dict = {}

    def save(self, status: str = "running", reason: str | None = None) -> None:
        tmp = self.result.with_suffix(".tmp")
        tmp.write_text(json.dumps({"status": status, "reason": reason, "numbers": self.numbers},
                                  default=str, allow_nan=False))
        tmp.replace(self.result)


def _step_module(name: str):
    import importlib

    return importlib.import_module({"gpu_tests": "gpu_check", "kernels": "gpu_check_kernels",
                                    "train": "gpu_check_train", "video": "gpu_check_video"}[name])


def worker(name: str, result: Path, out_dir: Path, dry_run: bool) -> int:
    """Run one step here (a child of the kit). ``run(ctx)`` / ``dry_run(ctx)`` of the step's
    module return (status, reason); an exception is a failed step (traceback in the log)."""
    ctx = StepContext(name, result, out_dir, dry_run)
    mod = sys.modules[__name__] if name == "gpu_tests" else _step_module(name)
    fn = getattr(mod, "dry_run_gpu_tests" if name == "gpu_tests" and dry_run else
                 "run_gpu_tests" if name == "gpu_tests" else "dry_run" if dry_run else "run")
    try:
        status, reason = fn(ctx)
    except Exception as exc:
        traceback.print_exc()
        ctx.save("failed", f"{type(exc).__name__}: {exc}".strip()[:500])
        return 1
    ctx.save(status, reason)
    return 0 if status != "failed" else 1


# Step 1 lives here: it is one pytest call and the parse of its JUnit XML.

def _pytest_argv(*extra: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:randomly", "-p", "no:cacheprovider",
            *extra]


def _child_env() -> dict:
    # PYTHONSAFEPATH: only the installed package is imported, never the checkout's kernels/.
    return {**os.environ, "PYTHONSAFEPATH": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_gpu_tests(ctx: StepContext) -> tuple[str, str | None]:
    xml = ctx.out_dir / "gpu_tests.junit.xml"
    # -v: a test that hangs until the limit is the last one named in the log.
    rc = subprocess.call(_pytest_argv("-v", f"--junitxml={xml}"), cwd=ROOT, env=_child_env())
    if not xml.is_file():
        return "failed", f"pytest exited {rc} without a JUnit report"
    ctx.numbers = junit_counts(xml)
    ctx.numbers["pytest_exit_code"] = rc
    n = ctx.numbers
    if n["collected"] == 0:
        return "failed", "no gpu-marked test was collected"
    if n["failed"] or n["errors"] or rc not in (0, 5):
        return "failed", f"{n['failed']} failed, {n['errors']} errors of {n['collected']} (pytest exit {rc})"
    return "passed", None


def junit_counts(xml: Path) -> dict:
    """Counts and failures from pytest's JUnit XML."""
    import xml.etree.ElementTree as ET

    out = {"collected": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    for case in ET.parse(xml).getroot().iter("testcase"):
        out["collected"] += 1
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = [c.tag for c in case]
        bad = next((c for c in case if c.tag in ("failure", "error")), None)
        if bad is not None:
            out["failed" if bad.tag == "failure" else "errors"] += 1
            out["failures"].append({"test": test, "message": (bad.get("message") or "")[:300]})
        elif "skipped" in kinds:
            out["skipped"] += 1
        else:
            out["passed"] += 1
    return out


def dry_run_gpu_tests(ctx: StepContext) -> tuple[str, str | None]:
    """Collect (not run) the gpu-marked tests: the selection the GPU run will make."""
    res = subprocess.run(_pytest_argv("--collect-only", "-q"), cwd=ROOT, env=_child_env(),
                         capture_output=True, text=True)
    tests = [ln for ln in res.stdout.splitlines() if "::" in ln]
    ctx.numbers = {"collected": len(tests), "tests": tests}
    if res.returncode != 0 or not tests:
        print(res.stdout[-3000:], res.stderr[-3000:], sep="\n")
        return "failed", f"pytest --collect-only -m gpu exited {res.returncode} with {len(tests)} tests"
    return "passed", None


# ------------------------------------------------------------------------------ kit side

class Kit:
    """Runs a plan against one deadline and rewrites both reports after every step."""

    def __init__(self, out_dir: Path, cuda: bool, no_cuda_reason: str | None, budget_s: float,
                 machine: dict, command: str):
        self.out_dir, self.cuda, self.no_cuda_reason = out_dir, cuda, no_cuda_reason
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s
        self.report = {"schema": report.SCHEMA, "created": _now(), "command": command,
                       "mode": "gpu" if cuda else "cpu-only", "budget_s": budget_s, "wall_s": 0.0,
                       "exit_code": None, "machine": machine, "plan": [], "steps": []}
        (out_dir / "logs").mkdir(parents=True, exist_ok=True)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, steps) -> dict:
        self.report["plan"] = [{"name": s.name, "title": s.title, "limit_s": s.limit_s,
                                "needs_gpu": s.needs_gpu} for s in steps]
        for step in steps:
            self.report["steps"].append(self.run_step(step))
            self.write()
        self.report["exit_code"] = exit_code(self.report)
        self.write()
        return self.report

    def run_step(self, step: Step) -> dict:
        rec = {"name": step.name, "title": step.title, "limit_s": step.limit_s,
               "needs_gpu": step.needs_gpu, "status": None, "reason": None, "duration_s": 0.0,
               "numbers": {}, "dry_run": None, "log": None, "log_tail": ""}
        print(f"== {step.name}: {step.title} (limit {step.limit_s:.0f} s)", flush=True)
        if step.needs_gpu and not self.cuda:
            rec.update(status="skipped", reason=self.no_cuda_reason)
            if step.argv is None:
                rec["dry_run"] = self.execute(step, DRY_RUN_LIMIT_S, dry=True)
        else:
            rec.update(self.execute(step, step.limit_s, dry=False))
        print(f"   {rec['status']}" + (f": {rec['reason']}" if rec["reason"] else "")
              + (f" (dry run: {rec['dry_run']['status']})" if rec["dry_run"] else ""), flush=True)
        return rec

    def execute(self, step: Step, limit_s: float, dry: bool) -> dict:
        """Run ``step`` in a new process group; kill the group at its limit (or the kit's)."""
        left = self.remaining()
        limit = min(limit_s, left)
        tag = f"{step.name}{'.dry_run' if dry else ''}"
        log_path = self.out_dir / "logs" / f"{tag}.log"
        out = {"status": None, "reason": None, "duration_s": 0.0, "numbers": {},
               "log": str(log_path.relative_to(self.out_dir)), "log_tail": ""}
        if left < min(MIN_STEP_S, limit_s):
            out.update(status="skipped", reason=f"the kit's {self.report['budget_s']:.0f} s budget "
                                                 f"was spent ({max(left, 0):.0f} s left)")
            return out
        result = self.out_dir / "logs" / f"{tag}.result.json"
        result.unlink(missing_ok=True)
        argv = list(step.argv) if step.argv else [
            sys.executable, str(Path(__file__).resolve()), "--worker", step.name,
            "--result", str(result), "--out", str(self.out_dir)] + (["--dry-run"] if dry else [])
        # The deadline lets a step share its time between its parts (step 3's two runs).
        env = {**_child_env(), "GPU_CHECK_RESULT": str(result), "PYTHONUNBUFFERED": "1",
               "GPU_CHECK_DEADLINE": str(time.time() + limit)}
        t0 = time.monotonic()
        with log_path.open("w") as log:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            timed_out = False
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                timed_out = True
                rc = _kill_group(proc)
            except BaseException:
                # Ctrl-C reaches only the kit: its steps run in sessions of their own.
                _kill_group(proc)
                raise
            finally:
                _kill_leftovers(proc)
        out["duration_s"] = round(time.monotonic() - t0, 2)
        saved = _read_json(result)
        out["numbers"] = saved.get("numbers", {})
        out["log_tail"] = _tail(log_path)
        if timed_out:
            out.update(status="timed_out", reason=f"ran past its limit of {limit:.0f} s and was "
                                                   "killed (numbers saved before that are kept)")
        elif saved.get("status") in ("passed", "failed", "skipped"):
            out.update(status=saved["status"], reason=saved.get("reason"))
            if rc != 0 and out["status"] == "passed":
                out.update(status="failed", reason=f"exited {rc} after reporting success")
        else:
            out.update(status="passed" if rc == 0 else "failed",
                       reason=None if rc == 0 else f"exited {rc}: {_last_line(out['log_tail'])}")
        return out

    def write(self) -> None:
        self.report["wall_s"] = round(time.monotonic() - self.t0, 2)
        report.write_reports(self.report, self.out_dir)


def exit_code(rep: dict) -> int:
    """GPU mode: 0 only when every step passed. CPU-only: 0 unless a CPU-safe part failed."""
    steps = rep["steps"]
    if rep["mode"] == "gpu":
        return 0 if steps and all(s["status"] == "passed" for s in steps) else 1
    bad = [s for s in steps if s["status"] in ("failed", "timed_out")
           or (s["dry_run"] and s["dry_run"]["status"] not in ("passed", "skipped"))]
    return 1 if bad else 0


def _kill_group(proc: subprocess.Popen) -> int:
    """SIGTERM to the step's process group (pytest, torchrun and their children), then
    SIGKILL if it is still there after KILL_GRACE_S."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            return proc.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


def _kill_leftovers(proc: subprocess.Popen) -> None:
    """Whatever the step left running in its group (a torchrun worker, a DataLoader worker)
    goes too, so it cannot hold the GPU during the next step."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _version(module: str) -> str | None:
    from importlib import metadata

    for dist in {"nvidia.dali": ("nvidia-dali-cuda130", "nvidia-dali-cuda120"),
                 "liger_kernel": ("liger-kernel",), "flash_attn": ("flash-attn", "flash_attn")
                 }.get(module, (module,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def machine_info() -> dict:
    """The machine as the report names it; GPU fields are null without a CUDA device."""
    import torch

    from _common import git_commit

    info = {"host": platform.node(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "commit": git_commit(ROOT) or None, "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    for mod in ("triton", "transformers", "deepspeed", "liger_kernel", "nvidia.dali", "flash_attn", "av"):
        info[mod.replace("nvidia.", "")] = _version(mod)
    info.update(gpu_name=None, gpu_count=0, gpu_memory_gib=None, compute_capability=None,
                driver=None, cuda_driver_version=None)
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            res = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = res.stdout.strip().splitlines()[0] if res.returncode == 0 and res.stdout.strip() else None
            head = subprocess.run([smi], capture_output=True, text=True, timeout=20).stdout
            if "CUDA Version:" in head:
                info["cuda_driver_version"] = head.split("CUDA Version:")[1].split()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    if torch.cuda.is_available():
        from gpu_check_kernels import peak_bandwidth

        p = torch.cuda.get_device_properties(0)
        info.update(gpu_name=p.name, gpu_count=torch.cuda.device_count(),
                    gpu_memory_gib=round(p.total_memory / 2**30, 2),
                    compute_capability=f"{p.major}.{p.minor}")
        info["peak_bandwidth"] = peak_bandwidth(p.name, p)
    return info


def select_steps(names: str | None) -> tuple[Step, ...]:
    if not names:
        return PLAN
    want = [n.strip() for n in names.split(",") if n.strip()]
    known = {s.name for s in PLAN}
    if set(want) - known:
        raise SystemExit(f"gpu_check: unknown step(s) {sorted(set(want) - known)}; steps: {[s.name for s in PLAN]}")
    return tuple(s for s in PLAN if s.name in want)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check", help="report folder")
    ap.add_argument("--steps", help="comma-separated subset of " + ",".join(s.name for s in PLAN))
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="the whole kit's time limit")
    ap.add_argument("--no-gpu", action="store_true",
                    help="behave as without CUDA: CPU-safe parts only, every GPU step skipped")
    ap.add_argument("--plan", action="store_true", help="print the step plan and exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.result, args.out, args.dry_run)
    steps = select_steps(args.steps)
    if args.plan:
        for s in steps:
            print(json.dumps(asdict(s)))
        return 0
    import torch

    if args.no_gpu:
        cuda, why = False, "no CUDA device: --no-gpu was given"
    elif not torch.cuda.is_available():
        cuda, why = False, (f"no CUDA device: torch.cuda.is_available() is False (torch "
                            f"{torch.__version__}, CUDA build {torch.version.cuda})")
    else:
        cuda, why = True, None
    args.out.mkdir(parents=True, exist_ok=True)
    kit = Kit(args.out, cuda, why, args.budget_s, machine_info(),
              " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]))
    rep = kit.run(steps)
    print(f"reports: {args.out / report.MD_NAME}, {args.out / report.JSON_NAME} "
          f"({rep['wall_s']:.0f} s, exit {rep['exit_code']})")
    return rep["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
