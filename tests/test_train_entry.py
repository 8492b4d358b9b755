"""`torchrun -m visioncoach.train`: config errors before any model is built, and the start-up."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from visioncoach import train


def test_config_error_exits_before_model_build(capsys, monkeypatch):
    import visioncoach.models.policy as policy

    def boom(*a, **k):
        raise AssertionError("model built despite a config error")

    monkeypatch.setattr(policy, "build_policy", boom)
    assert train.main(["--optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "'optim.lrr'" in err and "did you mean 'optim.lr'" in err
    assert train.main(["--rollout.top_p=1.5"]) == 2
    assert "'rollout.top_p'" in capsys.readouterr().err


def test_print_config(capsys):
    assert train.main(["--print-config", "--optim.lr=3e-5"]) == 0
    dumped = yaml.safe_load(capsys.readouterr().out)
    assert dumped["optim"]["lr"] == 3e-5 and dumped["stage"] == "sft+rl"


@pytest.mark.dist
def test_torchrun_two_processes_start_up(tmp_path):
    env = dict(os.environ, PYTHONSAFEPATH="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               VISIONCOACH_CACHE=str(tmp_path / "cache"))
    torchrun = Path(sys.executable).with_name("torchrun")
    t0 = time.time()
    res = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "visioncoach.train",
         f"--output_dir={tmp_path / 'run'}", "--optim.sft_steps=3", "--log.checkpoint_every=2"],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "world size 2, backend gloo" in out
    assert "'ranks_identical': True" in out
    assert "attention=sdpa" in out  # no flash-attn on CPU: the fallback is logged
    # The synthetic dataset was generated (by rank 0 only) and its first sample went through
    # decode -> model inputs -> forward/backward.
    assert "64 records" in out and "'sample': 'synthetic-00000'" in out
    assert "'frame_size': (112, 84)" in out
    assert len(list((tmp_path / "cache").glob("synthetic-*"))) == 1
    # SFT ran under DDP on both ranks: metrics for 3 steps, checkpoints at 2 and 3, a summary.
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert (tmp_path / "run" / "checkpoints" / "sft" / "latest").read_text().strip() == "step-00000003"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["sft"]["steps"] == 3
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["output_dir"] == str(tmp_path / "run")
    assert time.time() - t0 < 600
