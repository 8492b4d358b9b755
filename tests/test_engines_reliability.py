"""The engines under the conditions a long run meets: LoRA on every engine, steps where no rank
has a usable sample (skipped: no optimizer or schedule step), ZeRO-3 with a rank whose samples
all fail (stand-ins keep the parameter gathers in step), DeepSpeed resume, and the ZeRO-3
reference policy held as partitions."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from visioncoach import train
from visioncoach.config import load_config
from visioncoach.data.stgr import load_stgr
from visioncoach.data.synthetic import generate
from visioncoach.models.tiny import build_tiny_model
from visioncoach.trainer.rl import RLRunner
from visioncoach.trainer.sft import SFTRunner
from visioncoach.utils.dist import DistInfo
from fake_rewards import text_reward as _fake_reward  # noqa: E402

CPU = DistInfo(0, 1, 0, torch.device("cpu"), None)
HERE = Path(__file__).resolve().parent
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _data(root: Path, n: int, broken: set[int]) -> Path:
    """Synthetic records whose videos ``broken`` are not videos (they fail to decode)."""
    path = generate(root, n=n, seed=5)
    for i in broken:
        (root / "videos" / f"{i:05d}.mp4").write_bytes(b"\x00" * 500)
    return path


def _cfg(**over):
    base = {"data.num_workers": 0, "data.nframes": 2, "data.max_pixels": 12544, "data.shuffle": "false",
            "optim.sft_steps": 3, "optim.rl_steps": 3, "log.checkpoint_every": 100,
            "rollout.num_generations": 2, "rollout.max_new_tokens": 4, "vp.selector": "none"}
    return load_config([f"--{k}={v}" for k, v in {**base, **over}.items()])


def _adam_steps(runner) -> set[int]:
    return {int(s["step"]) for s in runner.optimizer.state.values()}


def _check_skipped(history: list[dict], runner, mu: int = 1) -> None:
    """Step 2 (every sample failed) is skipped: loss null with the reason, counted, and neither
    AdamW nor the schedule moved (3 steps of ``mu`` updates, 2 of them run); the steps around
    it trained."""
    assert [m["step"] for m in history] == [1, 2, 3]
    m = history[1]
    assert m["loss"] is None and m["skipped"] == "no usable sample" and m["empty_steps"] == 1, m
    assert history[0]["loss"] is not None and history[2]["loss"] is not None
    assert runner.empty_steps == 1 and runner.step == 3
    assert _adam_steps(runner) == {2 * mu} and runner.scheduler.last_epoch == 2 * mu
    if mu == 1:   # step 3 ran with the rate step 2 would have used: the schedule did not advance
        assert history[2]["lr"] == history[1]["lr"] != history[0]["lr"]


@pytest.fixture(scope="module")
def one_bad_batch(tmp_path_factory):
    """4 records; the second (step 2 of a 1-sample-per-step run) has a broken video."""
    return _data(tmp_path_factory.mktemp("bad1"), 4, {1})


def test_sft_step_without_a_usable_sample_is_skipped(one_bad_batch, tokenizer, tmp_path):
    runner = SFTRunner(_cfg(), CPU, build_tiny_model(seed=0), tokenizer, load_stgr(one_bad_batch, sft=True),
                       tmp_path)
    _check_skipped(runner.run(), runner)


def test_rl_step_without_a_usable_sample_is_skipped(one_bad_batch, tokenizer, tmp_path):
    runner = RLRunner(_cfg(**{"loss.updates_per_rollout": 2}), CPU, build_tiny_model(seed=0), tokenizer,
                      load_stgr(one_bad_batch, sft=False), tmp_path, reward_fn=_fake_reward)
    history = runner.run()
    _check_skipped(history, runner, mu=2)
    assert "reward_total" not in history[1]
    # The run's summary averages the two steps that rolled out, not a zero for the skipped one.
    summary = train.rl_summary(history, runner.step)
    assert summary["reward"]["total"]["first"] == round(history[0]["reward_total"], 4)
    assert summary["reward"]["total"]["last"] == round(history[2]["reward_total"], 4)


# ---------------------------------------------------------------------------- 2 processes
def _torchrun(tmp_path, args, timeout=600):
    env = dict(os.environ, PYTHONSAFEPATH="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               VISIONCOACH_CACHE=str(tmp_path / "cache"))
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


def _train(tmp_path, engine, zero, *extra):
    res = _torchrun(tmp_path, ["-m", "visioncoach.train", f"--output_dir={tmp_path / 'run'}",
                               f"--dist.engine={engine}", f"--dist.zero_stage={zero}",
                               "--log.progress=false", "--dist.timeout_s=60", *extra])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    return res.stdout + res.stderr, metrics, summary


ENGINES = [("ddp", 0), ("deepspeed", 2), ("deepspeed", 3)]


@pytest.mark.dist
@pytest.mark.parametrize("engine, zero", ENGINES)
def test_lora_sft_then_rl_on_every_engine(tmp_path, engine, zero):
    out, metrics, summary = _train(tmp_path, engine, zero, "--model.lora.enabled=true",
                                   "--data.synthetic_samples=8", "--optim.sft_steps=2",
                                   "--optim.rl_steps=2", "--log.checkpoint_every=2",
                                   "--rollout.max_new_tokens=8")
    assert "+ LoRA r=16" in out and (f"DeepSpeed ZeRO-{zero} engine" in out) == (engine == "deepspeed")
    assert [(m["stage"], m["step"]) for m in metrics] == [("sft", 1), ("sft", 2), ("rl", 1), ("rl", 2)]
    assert all(m["loss"] is not None for m in metrics)
    sft = [m["loss"] for m in metrics if m["stage"] == "sft"]
    assert sft[0] != sft[1]                                   # the adapters trained
    # The policy moved away from its base (the reference: adapters disabled).
    assert all(m["kl_mean"] > 0 for m in metrics if m["stage"] == "rl")
    assert summary["ranks_identical_after_training"] is True
    # The adapters are saved whole (gathered under ZeRO-3), and they trained (lora_B starts at 0).
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "run" / "checkpoints" / "rl" / "step-00000002" / "model" / "adapter_model.safetensors")
    assert saved and all(t.dim() == 2 and 16 in t.shape and t.numel() > 16 for t in saved.values())
    assert any(float(t.abs().sum()) > 0 for k, t in saved.items() if "lora_B" in k)


@pytest.mark.dist
@pytest.mark.parametrize("engine, zero", ENGINES)
def test_one_rank_without_samples_and_a_step_without_any(tmp_path, engine, zero):
    """Rank 1's records all point to broken videos (records 1, 3, 5, 7 with 2 ranks and no
    shuffle); rank 0's second one is broken too. Step 2 has no usable sample anywhere: skipped
    on both ranks. Steps 1 and 3 train on rank 0's sample, rank 1 joining with weight 0 (under
    ZeRO-3 through a stand-in sample, so that both ranks gather the same modules)."""
    data = _data(tmp_path / "data", 8, {1, 2, 3, 5, 7})
    out, metrics, summary = _train(tmp_path, engine, zero, f"--data.dataset={data}", "--data.shuffle=false",
                                   "--optim.sft_steps=3", "--optim.rl_steps=3", "--log.checkpoint_every=100",
                                   "--rollout.max_new_tokens=8", "--loss.updates_per_rollout=1")
    for stage in ("sft", "rl"):
        ms = [m for m in metrics if m["stage"] == stage]
        assert [m["step"] for m in ms] == [1, 2, 3]
        assert ms[1]["loss"] is None and ms[1]["skipped"] == "no usable sample", ms[1]
        assert ms[0]["loss"] is not None and ms[2]["loss"] is not None
        assert ms[2]["lr"] == ms[1]["lr"] != ms[0]["lr"]       # the schedule did not advance
        assert summary[stage]["empty_steps"] == 1
    assert summary["sft"]["steps"] == 3 and summary["rl"]["steps"] == 3
    assert summary["ranks_identical_after_training"] is True
    assert ("[rank1]" in out and "running stand-in" in out) == (zero == 3)


@pytest.fixture(scope="module")
def engine_data(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("engine-data"), n=6, seed=5)


@pytest.mark.dist
@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_resume_continues_exactly(tmp_path, engine_data, zero):
    """SFT and RL: 3 steps straight vs 2 steps, stop, resume on a fresh model: same weights
    (``tests/engine_worker.py resume``)."""
    res = _torchrun(tmp_path, [str(HERE / "engine_worker.py"), "resume", str(engine_data), str(tmp_path), str(zero)])
    assert res.returncode == 0 and "OK resume" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.dist
def test_zero3_reference_is_partitioned_and_gives_the_replicas_logprobs(tmp_path, engine_data):
    res = _torchrun(tmp_path, [str(HERE / "engine_worker.py"), "reference", str(engine_data), str(tmp_path)])
    assert res.returncode == 0 and "OK reference" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((tmp_path / "reference.json").read_text())
    # Each rank holds about half of the reference (a replica is all of it on every rank).
    assert all(held < 0.51 * report["total"] for held in report["held"]), report
    assert report["max_abs_diff"] <= 1e-5
