"""Kill, resume, share a folder (issue #14 items 4-7): one live run per output folder (a stale
lock taken over), workers that end with their launcher, a DeepSpeed checkpoint resumed under
another engine and process count, no leftovers and one metrics row per step after a SIGKILL,
a summary over every segment, and checkpoints that are loaded as data, never as code."""

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from visioncoach import train
from visioncoach.trainer import checkpoint as ckpt_mod
from visioncoach.utils.runlock import host_tag, pid_alive

PY = sys.executable
ENV = dict(os.environ, PYTHONSAFEPATH="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One synthetic dataset (and held-out set) for the module's runs."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def no_model(monkeypatch):
    import visioncoach.models.policy as policy

    monkeypatch.setattr(policy, "build_policy", lambda *a, **k: pytest.fail("model built despite a start-up error"))


def _dead_pid() -> int:
    p = subprocess.Popen([PY, "-c", "pass"])
    p.wait()
    return p.pid


def _sft_args(run, *extra):
    return ["--stage=sft", "--data.num_workers=0", "--data.nframes=2", "--rollout.max_new_tokens=4",
            f"--output_dir={run}", "--log.progress=false", "--log.keep_checkpoints=0", *extra]


# -- item 4: one run per folder --------------------------------------------------------------
HOLDER = """
import sys, time
from visioncoach.utils.runlock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_run_on_a_live_folder_is_refused_before_any_model(tmp_path, no_model, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen([PY, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert train.main(_sft_args(run)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error:" in err and "in use by another training run" in err, err
        assert f"pid {holder.pid} on {socket.gethostname()}" in err
    finally:
        holder.kill()
        holder.wait()
    # Nor when the file names a live process on this host without holding the lock (a file
    # system without flock), or a process on another host (its pid cannot be checked).
    for owner in ({"pid": os.getpid(), "host": socket.gethostname(), "started": "x"},
                  {"pid": 1234, "host": "elsewhere.example", "started": "x"}):
        (run / "run.lock").write_text(json.dumps(owner))
        assert train.main(_sft_args(run)) == 2
        err = capsys.readouterr().err
        assert "error:" in err and str(owner["pid"]) in err and owner["host"] in err, err


def test_a_stale_lock_is_taken_over_with_a_warning_and_released_at_exit(tmp_path, monkeypatch, caplog):
    import visioncoach.models.policy as policy

    run = tmp_path / "run"
    run.mkdir()
    dead = _dead_pid()
    (run / "run.lock").write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": "then"}))
    seen = {}

    def stop(*a, **k):     # the model build, reached: note who holds the folder, then stop
        seen["owner"] = json.loads((run / "run.lock").read_text())
        raise KeyboardInterrupt

    monkeypatch.setattr(policy, "build_policy", stop)
    monkeypatch.setenv("VISIONCOACH_CACHE", str(tmp_path / "cache"))
    caplog.set_level(logging.WARNING)
    with pytest.raises(KeyboardInterrupt):
        train.main(_sft_args(run))
    assert seen["owner"]["pid"] == os.getpid() and seen["owner"]["host"] == socket.gethostname()
    assert f"took over a stale lock of pid {dead}" in caplog.text
    assert not (run / "run.lock").exists()          # released when the run ended


CHILD = """
import sys, time
from pathlib import Path
from visioncoach.utils.runlock import exit_with_launcher
exit_with_launcher(0.1)
Path(sys.argv[1]).write_text("ready")
time.sleep(600)
"""
LAUNCHER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], start_new_session=True)
print(child.pid, flush=True)
time.sleep(600)
"""


def test_a_worker_exits_when_its_launcher_is_killed(tmp_path):
    """As under torchrun: the worker in a session of its own survives a kill of the launcher's
    process group, unless it watches its launcher."""
    ready = tmp_path / "ready"
    launcher = subprocess.Popen([PY, "-c", LAUNCHER, CHILD, str(ready)], stdout=subprocess.PIPE, text=True,
                                env=ENV, start_new_session=True)
    child = int(launcher.stdout.readline())
    try:
        for _ in range(600):
            if ready.exists() or not pid_alive(child):
                break
            time.sleep(0.1)
        assert ready.exists(), "the worker did not start its launcher watch"
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
        for _ in range(300):
            if not pid_alive(child):
                break
            time.sleep(0.1)
        assert not pid_alive(child), "the worker outlived its launcher"
    finally:
        if pid_alive(child):
            os.kill(child, signal.SIGKILL)


def test_torchrun_workers_watch_their_launcher(tmp_path, monkeypatch):
    from visioncoach.config import load_config
    from visioncoach.trainer import runfolder
    from visioncoach.utils.dist import DistInfo

    calls = []
    monkeypatch.setattr(runfolder, "exit_with_launcher", lambda: calls.append(1))
    info = DistInfo(0, 1, 0, torch.device("cpu"), None)
    cfg = load_config([f"--output_dir={tmp_path}"])
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    runfolder.claim_run_folder(cfg, info).release()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    runfolder.claim_run_folder(cfg, info).release()
    assert calls == [1]


# -- item 6: leftovers, metrics rows, summary --------------------------------------------------
def test_sigkill_then_resume_leaves_no_leftovers_one_row_per_step_and_a_whole_summary(tmp_path, cache,
                                                                                      monkeypatch):
    run = tmp_path / "run"
    env = dict(ENV, VISIONCOACH_CACHE=str(cache))
    args = _sft_args(run, "--optim.sft_steps=8", "--log.checkpoint_every=2")
    proc = subprocess.Popen([PY, "-m", "visioncoach.train", *args], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, latest = run / "metrics.jsonl", run / "checkpoints" / "sft" / "latest"
    try:
        while proc.poll() is None:
            rows = metrics.read_text().count("\n") if metrics.exists() else 0
            if rows >= 3 and latest.exists():
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    first = json.loads(metrics.read_text().splitlines()[0])
    stage = run / "checkpoints" / "sft"
    # What a kill mid-save leaves (whether or not this one did): work folders of a dead writer,
    # one of a writer that named nobody, a pointer's temp file, DeepSpeed's staging.
    dead = _dead_pid()
    leftovers = [stage / f".step-00000006.{dead}.{host_tag()}.x1y2", stage / ".step-00000008.abc123",
                 stage / f".deepspeed-00000006.{dead}.{host_tag()}"]
    for d in leftovers:
        (d / "model").mkdir(parents=True)
    (stage / ".latest.zz9.tmp").write_text("step-0000000")
    (run / ".summary.json.q1.tmp").write_text("{")
    monkeypatch.setenv("VISIONCOACH_CACHE", str(cache))
    assert train.main([*args, "--log.resume=auto"]) == 0
    hidden = [p.name for p in stage.iterdir() if p.name.startswith(".")] + [p.name for p in run.glob(".*")]
    assert hidden == [], hidden
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [(m["stage"], m["step"]) for m in rows] == [("sft", s) for s in range(1, 9)]
    assert rows[0] == first                       # the killed segment's rows before its checkpoint stay
    summary = json.loads((run / "summary.json").read_text())
    assert [s["status"] for s in summary["segments"]] == ["interrupted", "completed"], summary["segments"]
    assert summary["resumes"] == 1 and summary["sft"]["steps"] == 8
    assert summary["sft"]["loss_first"] == first["loss"]      # 8 steps: windows of 1, from segment 1
    assert summary["sft"]["loss_last"] == rows[-1]["loss"]
    assert "heldout_format_before_sft" in summary and "heldout_format_after_sft" in summary
    assert summary["wall_time_s"] >= summary["segments"][1]["wall_time_s"] > 0
    assert not (run / "run.lock").exists()


def test_a_save_killed_while_replacing_a_checkpoint_is_undone(tmp_path):
    stage = tmp_path / "sft"
    (stage / ".step-00000004.old").mkdir(parents=True)       # step-00000004 moved aside, not replaced
    (stage / ".step-00000004.old" / "trainer_state.json").write_text("{}")
    (stage / ".step-00000002.old").mkdir()                   # replaced: the old copy is garbage
    (stage / "step-00000002").mkdir()
    live = stage / f".step-00000006.{os.getpid()}.{host_tag()}.abc"    # a live writer's: kept
    live.mkdir()
    ckpt_mod.clean_stale_temps(stage)
    assert sorted(p.name for p in stage.iterdir()) == sorted(["step-00000002", "step-00000004", live.name])
    assert (stage / "step-00000004" / "trainer_state.json").is_file()


# -- item 7: checkpoints are data --------------------------------------------------------------
class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, no_model, capsys):
    from visioncoach.models.tiny import build_tiny_model
    from visioncoach.trainer.sft import SFTRunner
    from visioncoach.utils.dist import DistInfo
    from visioncoach.config import load_config

    marker = tmp_path / "pwned"
    cfg = load_config(["--data.num_workers=0", "--data.nframes=2", "--optim.sft_steps=1", "--stage=sft",
                       "--data.synthetic_samples=2"])
    from visioncoach.data.stgr import load_stgr
    from visioncoach.data.synthetic import generate

    data = load_stgr(generate(tmp_path / "syn", n=2, seed=5), sft=True)
    from visioncoach.models.tokenizer import qwen25_tokenizer

    info = DistInfo(0, 1, 0, torch.device("cpu"), None)
    runner = SFTRunner(cfg, info, build_tiny_model(seed=0), qwen25_tokenizer(), data, tmp_path / "run")
    ckpt = runner.save()
    # A clean checkpoint loads with weights_only=True (the RNG state is tensors and plain data).
    assert runner.maybe_resume(str(ckpt)) and runner.step == 0
    # A checkpoint of a stage the run does not run: one line too, not a traceback after the build.
    assert train.main(_sft_args(tmp_path / "run", "--stage=rl", f"--log.resume={ckpt}")) == 2
    assert "is from stage 'sft', and stage=rl does not run it" in capsys.readouterr().err
    blob = torch.load(ckpt / "trainer.pt", weights_only=True)
    blob["rng"] = _RunsCode(marker)
    torch.save(blob, ckpt / "trainer.pt")
    with pytest.raises(ckpt_mod.CheckpointError, match=r"trainer\.pt: refused to load.*GLOBAL posix\.mkdir"):
        runner.maybe_resume(str(ckpt))
    assert not marker.exists()
    # The trainer says so in one line, before any model is built.
    assert train.main(_sft_args(tmp_path / "run", f"--log.resume={ckpt}")) == 2
    err = capsys.readouterr().err
    assert err.startswith("visioncoach.train: error:") and err.count("\n") == 1 and "refused to load" in err
    assert not marker.exists()
    # DeepSpeed's partition files go through the same check.
    shutil.copy(ckpt / "trainer.pt", tmp_path / "evil.pt")
    torch.save({"x": torch.zeros(1)}, ckpt / "trainer.pt")
    (ckpt / "deepspeed" / "state").mkdir(parents=True)
    shutil.move(tmp_path / "evil.pt", ckpt / "deepspeed" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(ckpt_mod.CheckpointError, match="zero_pp_rank_0.*refused to load"):
        ckpt_mod.verify_checkpoint(ckpt)
    assert not marker.exists()


# -- item 5: another engine, ZeRO stage or process count ----------------------------------------
def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _back_to_step_2(src, dst):
    """``src`` as if killed just after its step-2 checkpoint."""
    shutil.copytree(src, dst)
    for p in (dst / "checkpoints" / "sft").glob("step-*"):
        if p.name != "step-00000002":
            shutil.rmtree(p)
    (dst / "checkpoints" / "sft" / "latest").write_text("step-00000002\n")


@pytest.mark.dist
def test_a_two_process_zero2_checkpoint_resumes_on_one_process_and_under_ddp(tmp_path, cache, monkeypatch):
    torchrun = Path(PY).with_name("torchrun")
    env = dict(ENV, VISIONCOACH_CACHE=str(cache))
    args = _sft_args(tmp_path / "zero2", "--optim.sft_steps=4", "--log.checkpoint_every=2")

    def launch(nproc, run, *extra):
        cmd = [str(torchrun), "--standalone", f"--nproc_per_node={nproc}", "-m", "visioncoach.train",
               *[a for a in args if not a.startswith("--output_dir")], f"--output_dir={run}", *extra]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        return res.stdout

    launch(2, tmp_path / "zero2", "--dist.engine=deepspeed", "--dist.zero_stage=2")
    straight = _rows(tmp_path / "zero2")
    step2 = tmp_path / "zero2" / "checkpoints" / "sft" / "step-00000002"
    assert json.loads((step2 / "trainer_state.json").read_text())["layout"] == {
        "engine": "deepspeed", "zero_stage": 2, "world_size": 2}

    # The partitions consolidate to exactly the weights of the checkpoint's model/ copy.
    from safetensors.torch import load_file

    from visioncoach.trainer import reshard

    full = reshard.read_full_state(step2, [])
    saved = load_file(step2 / "model" / "model.safetensors")
    assert full.step == 2 and len(full.moments) == len(full.masters) > 0
    for name, value in full.masters.items():     # the file has transformers' checkpoint keys
        key = name.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        assert torch.equal(saved[key], value), name

    # One process, plain AdamW: resumes where it stopped, one row per step.
    _back_to_step_2(tmp_path / "zero2", tmp_path / "one")
    monkeypatch.setenv("VISIONCOACH_CACHE", str(cache))
    assert train.main([*_sft_args(tmp_path / "one", "--optim.sft_steps=4", "--log.checkpoint_every=2"),
                       "--log.resume=auto"]) == 0
    rows = _rows(tmp_path / "one")
    assert [m["step"] for m in rows] == [1, 2, 3, 4] and rows[:2] == straight[:2]
    last = json.loads((tmp_path / "one" / "checkpoints" / "sft" / "step-00000004" / "trainer_state.json").read_text())
    assert last["layout"] == {"engine": "plain", "zero_stage": None, "world_size": 1}

    # Same data on two processes without DeepSpeed: the re-mapped weights and AdamW moments
    # continue the run exactly as DeepSpeed did (step 4's loss follows step 3's update).
    _back_to_step_2(tmp_path / "zero2", tmp_path / "ddp")
    out = launch(2, tmp_path / "ddp", "--dist.engine=ddp", "--log.resume=auto")
    assert "written by DeepSpeed ZeRO-2 on 2 processes, with plain AdamW on 2 processes" in out
    assert [m["loss"] for m in _rows(tmp_path / "ddp")] == [m["loss"] for m in straight]
