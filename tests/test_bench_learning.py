"""bench/bench_learning.py's fixed parts: the ``color`` task is deterministic and answerable
from the frames, the held-out evaluation is deterministic, and each arm's config resolves to
what the arm says (only the arm's own keys differ between arms)."""

import importlib.util
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from visioncoach import config as config_lib
from visioncoach.data import synthetic
from visioncoach.data.synthetic import COLOR_OPTIONS, COLORS, HEIGHT, SHAPES, WIDTH, generate

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))   # the script imports bench/_common.py as a bench script does
_spec = importlib.util.spec_from_file_location("bench_learning", BENCH / "bench_learning.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_learning"] = bench   # its dataclasses look their module up
_spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def color_set(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("color"), n=8, seed=3, tasks="color")


def test_color_task_records_are_deterministic_and_per_sample(color_set, tmp_path):
    again = json.loads(generate(tmp_path / "a", n=8, seed=3, tasks="color").read_text())
    assert json.loads(color_set.read_text()) == again
    # Sample i does not depend on n; another seed gives other clips.
    assert json.loads(generate(tmp_path / "b", n=3, seed=3, tasks="color").read_text()) == again[:3]
    other = json.loads(generate(tmp_path / "c", n=8, seed=4, tasks="color").read_text())
    assert [r["reasoning_process"] for r in other] != [r["reasoning_process"] for r in again]


def test_color_task_answer_is_what_the_frames_show(color_set):
    """The answer letter names the colour found inside the annotated box of the decoded key
    frame, and the reference reasoning scores full marks on every reward component."""
    import av

    from visioncoach.rewards import RewardConfig, score

    records = json.loads(color_set.read_text())
    letters = [r["answer"] for r in records]
    assert set(letters) <= set("ABCD") and len(set(letters)) > 1
    for r in records:
        (kf, _), name = r["key_frames"], None
        with av.open(str(color_set.parent / r["video_path"])) as c:
            frame = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)][kf["idx"]]
        (name, [[x1, y1, x2, y2]]), = r["key_items"][str(kf["idx"])].items()
        cx, cy = int((x1 + x2) / 2 * WIDTH), int((y1 + y2) / 2 * HEIGHT)
        seen = torch.tensor(frame[cy, cx].astype(float))
        nearest = min(COLORS, key=lambda c: float((seen - torch.tensor(COLORS[c], dtype=float)).norm()))
        assert nearest == COLOR_OPTIONS["ABCD".index(r["answer"])], r["id"]
        # The claim names the shape only: the answer is the one target token the colour decides.
        assert name in SHAPES and f"<obj>{name}</obj>" in r["reasoning_process"], r["id"]
        assert not any(c in r["reasoning_process"] for c in COLOR_OPTIONS), r["id"]
        assert r["question"].endswith("A. red B. green C. blue D. yellow")
    # The loader adds the model's frame size; 112 x 84 fits the pixel budget unresized.
    records = [{**r, "frame_size": [WIDTH, HEIGHT]} for r in records]
    rewards = score([r["reasoning_process"] for r in records], records, RewardConfig(), progress=1.0)
    for k in ("accuracy", "format", "temporal"):
        assert torch.equal(rewards[k], torch.ones(len(records))), k
    assert bool((rewards["spatial"] > 0.99).all()), rewards["spatial"]


def test_unknown_task_set_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="synthetic task set 'colour'"):
        generate(tmp_path, n=1, tasks="colour")


def _resolved(arm: str, seed: int = 0) -> dict:
    overrides = bench.arm_overrides(arm, seed, Path("/tmp/learning"))
    return asdict(config_lib.load_config(overrides))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_each_arm_resolves_to_what_it_says():
    sft, gspo = _flat(_resolved("sft")), _flat(_resolved("gspo"))
    vp, vp_max = _flat(_resolved("gspo+vp+sd")), _flat(_resolved("gspo+vp+sd/max"))
    align = _flat(_resolved("align"))
    assert sft["stage"] == "sft" and sft["data.synthetic_tasks"] == "color"
    # The alignment run, then the cold start from it: both SFT, the answer weighted (the
    # alignment almost only on it), and the cold start starts from the alignment.
    assert align["stage"] == "sft" and align["model.path"] == ""
    assert align["loss.sft_answer_weight"] == 1000 and sft["loss.sft_answer_weight"] == 20
    assert sft["model.path"] == "/tmp/learning/seed0/align"
    assert gspo["stage"] == vp["stage"] == "rl"
    assert gspo["model.path"] == vp["model.path"] == "/tmp/learning/seed0/sft"   # one SFT checkpoint
    assert (gspo["vp.selector"], gspo["loss.sd_alpha"]) == ("none", 0.0)
    assert (vp["vp.selector"], vp["loss.sd_alpha"]) == ("gating", 0.1)
    assert vp["reward.spatial_mode"] == "object_aware" and vp_max["reward.spatial_mode"] == "max"
    # Nothing but the arm's own keys (and where it writes) differs between the RL arms.
    differ = {k for k in gspo if gspo[k] != vp[k]}
    assert differ == {"vp.selector", "loss.sd_alpha", "output_dir"}, differ
    assert {k for k in vp if vp[k] != vp_max[k]} == {"reward.spatial_mode", "output_dir"}
    # The same held-out clips for every seed, and seeds change the seeds only.
    other = _flat(_resolved("gspo", seed=2))
    assert {k for k in gspo if gspo[k] != other[k]} == {"seed", "output_dir", "model.path",
                                                       "data.synthetic_seed"}
    assert other["data.heldout_seed"] == gspo["data.heldout_seed"] >= 0
    # RL trains on clips neither SFT run nor the held-out check uses, one epoch of them.
    for seed in (0, 2):
        rl, cold, first = (config_lib.load_config(bench.arm_overrides(a, seed, Path("/w")))
                           for a in ("gspo", "sft", "align"))
        clips = [config_lib.synthetic_seed(c) for c in (rl, cold, first)]
        assert clips[1] == clips[2] == seed and clips[0] not in (seed, config_lib.heldout_seed(rl))
        assert config_lib.heldout_seed(cold) == config_lib.heldout_seed(rl) != seed
        assert rl.data.synthetic_samples == rl.optim.rl_steps * rl.rollout.prompts_per_step
        assert cold.data.synthetic_samples == first.data.synthetic_samples == 64


def test_confidence_interval_is_the_student_t_one():
    mean, half = bench.ci95([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert math.isnan(bench.ci95([5.0])[1])


def test_aggregate_pairs_each_arm_with_its_seeds_control():
    rows = [dict(arm="sft", seed=s, **{k: 1.0 + s for k in bench.COMPONENTS}) for s in range(3)]
    rows += [dict(arm="gspo", seed=s, **{k: 1.5 + s for k in bench.COMPONENTS}) for s in range(3)]
    agg = {a["arm"]: a for a in bench.aggregate(rows, ["sft", "gspo"])}
    # Across seeds the totals spread widely; paired with the same seed's control they do not.
    assert agg["gspo"]["total_ci"] > 1.0
    assert agg["gspo"]["vs_sft"] == pytest.approx(0.5) and agg["gspo"]["vs_sft_ci"] == 0.0


@pytest.mark.slow
def test_heldout_evaluation_is_deterministic(tmp_path, monkeypatch):
    """Two evaluations of one model give the same numbers (greedy, fixed clips)."""
    from visioncoach import train
    from visioncoach.models.policy import build_policy
    from visioncoach.rewards import score
    from visioncoach.utils.dist import DistInfo

    monkeypatch.setenv("VISIONCOACH_CACHE", str(tmp_path))
    cfg = config_lib.load_config(["--data.synthetic_tasks=color", "--data.heldout_samples=3",
                                  "--data.heldout_seed=5", "--rollout.max_new_tokens=6"])  # tiny.yaml
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    held = train._heldout_set(cfg, dist)
    assert [s.record["id"] for s in held] == [f"synthetic-color-{i:05d}" for i in range(3)]
    model, processor, _ = build_policy(cfg.model, cfg.data, dist.device, seed=0)
    first = train.heldout_rewards(model, processor.tokenizer, held, cfg, score)
    assert set(first) == {"accuracy", "format", "temporal", "spatial", "total"}
    assert train.heldout_rewards(model, processor.tokenizer, held, cfg, score) == first
    assert model.training   # put back as it was


def test_a_run_is_reused_only_over_the_same_base(tmp_path, monkeypatch):
    """A finished run is reused when its overrides match, the run it starts from has not
    been redone since and the synthetic clips are the same version; redoing the base (a new
    start time) makes it stale."""
    base, out = tmp_path / "base", tmp_path / "out"
    for d in (base, out):
        d.mkdir()

    def finish(d: Path, started: str) -> None:
        (d / "summary.json").write_text(json.dumps(
            {"segments": [{"started": started, "status": "completed"}]}))

    finish(base, "2026-12-06T10:00:00+00:00")
    overrides = ["--seed=0", f"--model.path={base}"]
    stamp = bench.run_stamp(overrides)
    assert stamp == {"overrides": overrides, "base_started": "2026-12-06T10:00:00+00:00",
                     "clips": synthetic.VERSION}
    finish(out, "2026-12-06T10:05:00+00:00")
    (out / "bench_overrides.json").write_text(json.dumps(stamp))
    assert bench.completed(out, bench.run_stamp(overrides)) is not None
    assert bench.completed(out, bench.run_stamp(["--seed=1", f"--model.path={base}"])) is None
    monkeypatch.setattr(synthetic, "VERSION", synthetic.VERSION + 1)  # the clips changed
    assert bench.completed(out, bench.run_stamp(overrides)) is None
    monkeypatch.undo()
    finish(base, "2026-12-06T11:00:00+00:00")            # the base was redone
    assert bench.completed(out, bench.run_stamp(overrides)) is None
    # A run without a base, and a base that is not there (yet): None for the base.
    assert bench.run_stamp(["--seed=0"])["base_started"] is None
    assert bench.run_stamp([f"--model.path={tmp_path / 'missing'}"])["base_started"] is None
