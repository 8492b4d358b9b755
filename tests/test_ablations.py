"""The paper's ablations, one config switch each (README "The paper's ablations"): each switch
changes what it should and nothing else.

* ``vp.candidate_reward`` (appendix B.2 vs Algorithm 1): which prompted rollouts are candidates;
* ``vp.hard_eligible`` and ``vp.hard_mode=relative``: which prompts are hard;
* ``vp.numpro_frames`` (appendix C.1): which frames carry frame numbers;
* ``reward.components`` (Table 9): ``total`` only;
* ``loss.sd_condition`` (eq. 1): the input of the distilled rows only;
* ``predict --vp / --selector`` (Table 6): plug-and-play visual prompts at inference.
"""

import dataclasses
import json

import pytest
import torch

from visioncoach import algorithm
from visioncoach.config import ConfigError, load_config
from visioncoach.data.loader import ClipDataset, ClipSample
from visioncoach.data.stgr import load_stgr
from visioncoach.data.synthetic import generate
from visioncoach.models.tiny import build_tiny_model
from visioncoach.processor import resize_frames
from visioncoach.rewards.components import COMPONENTS, with_components
from visioncoach.rewards.records import RewardTargets, convert
from visioncoach.trainer import rl
from visioncoach.utils.dist import DistInfo
from visioncoach.vp import add_hint, render_vp_reference
from visioncoach.vp.prompting import can_render, eligible, key_frame_prompt
from fake_rewards import text_reward as fake_reward  # noqa: E402
from shared_data import VIDEOS  # noqa: E402

CPU = DistInfo(0, 1, 0, torch.device("cpu"), None)
PIXELS = (3136, 12544)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return load_stgr(generate(tmp_path_factory.mktemp("syn"), n=4, seed=5), sft=False)


@pytest.fixture(scope="module")
def clips(dataset):
    data = ClipDataset(dataset, nframes=3, backend="pyav", targets=RewardTargets(PIXELS))
    return [data[i] for i in range(len(data))]


def _cfg(**over):
    base = {"data.num_workers": 0, "data.nframes": 2, "data.max_pixels": PIXELS[1],
            "rollout.num_generations": 4, "rollout.max_new_tokens": 8, "rollout.prompts_per_step": 2,
            "vp.selector": "fixed:numpro", "vp.hard_threshold": 100, "loss.beta": 0.0,
            "optim.rl_steps": 1, "log.checkpoint_every": 100}
    return load_config([f"--{k}={v}" for k, v in {**base, **over}.items()])


def peaked_model():
    model = build_tiny_model(seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model


def _runner(dataset, tokenizer, tmp_path, **over):
    return rl.RLRunner(_cfg(**over), CPU, peaked_model(), tokenizer, dataset, tmp_path, reward_fn=fake_reward)


# ----------------------------------------------------------------------------- 1. candidates

def test_candidate_rule_on_hand_made_rewards():
    t = torch.tensor
    raw = {"accuracy": t([0.0, 0.0, 0.0, 0.0]), "format": t([1.0, 1.0, 1.0, 1.0]),
           "temporal": t([0.5, 0.5, 0.5, 0.5]), "spatial": t([0.0, 0.0, 0.0, 0.0])}
    raw["total"] = sum(raw[k] for k in COMPONENTS)
    pro = {"accuracy": t([1.0, 0.0, 0.0, 0.0]), "format": t([0.0, 1.0, 1.0, 1.0]),
           "temporal": t([0.5, 0.6, 0.4, 0.5]), "spatial": t([0.0, 0.0, 0.0, 0.1])}
    pro["total"] = sum(pro[k] for k in COMPONENTS)
    assert algorithm.candidate_score(raw, "spa_tmp_acc").tolist() == pytest.approx([1 / 6] * 4)
    mean = lambda rule: float(algorithm.candidate_score(raw, rule).mean())  # noqa: E731
    # Total: g0 ties the raw mean 1.5 (not above it); B.2's average: g0's answer makes it a candidate.
    assert algorithm.select_distill(mean("total"), pro, 2, "total") == ([1, 3], [1, 3])
    assert algorithm.select_distill(mean("spa_tmp_acc"), pro, 2, "spa_tmp_acc") == ([0, 1, 3], [0, 1])
    # The default rule keeps the old call's behaviour; an unknown rule is an error.
    assert algorithm.select_distill(mean("total"), pro, 2) == ([1, 3], [1, 3])
    with pytest.raises(ValueError, match="vp.candidate_reward"):
        algorithm.candidate_score(raw, "acc")


def test_candidate_rule_changes_only_the_candidates(dataset, tokenizer, tmp_path):
    samples = None
    runs = {}
    for rule in ("total", "spa_tmp_acc"):
        runner = _runner(dataset, tokenizer, tmp_path / rule, **{"vp.candidate_reward": rule})
        samples = samples or [runner.clips[i] for i in range(3)]
        runs[rule] = runner.collect(samples, progress=0.0)
    a, b = runs["total"], runs["spa_tmp_acc"]
    for x, y in zip(a, b):
        assert torch.equal(x.raw.rollout.tokens, y.raw.rollout.tokens)
        assert (x.hard, x.eligible, x.vp_type) == (y.hard, y.eligible, y.vp_type) and x.hard
        assert torch.equal(x.prompted.rollout.tokens, y.prompted.rollout.tokens)
        assert all(torch.equal(x.prompted.rewards[k], y.prompted.rewards[k]) for k in x.prompted.rewards)
        for res, rule in ((x, "total"), (y, "spa_tmp_acc")):
            raw_mean = float(algorithm.candidate_score(res.raw.rewards, rule).mean())
            assert (res.candidates, res.distill) == algorithm.select_distill(raw_mean, res.prompted.rewards, 2, rule)
    assert [r.candidates for r in a] != [r.candidates for r in b], "the case should tell the rules apart"


# ----------------------------------------------------------------------------- 2. eligibility, relative bar

def _record(task, answer, key=True, boxes=True, segments=None):
    rec = {"task": task, "answer": answer, "frame_size": [56, 56]}
    if key:
        rec["key_frames"] = [{"idx": 3, "time": 1.0}]
        rec["key_items"] = {"3": {"cup": [[0.1, 0.1, 0.5, 0.5]]}} if boxes else {}
    if segments:
        rec["segments"] = segments
    return convert(rec)


def _sample(record, key=True):
    """A hand-made ClipSample: 3 frames at 0, 1, 2 s, the middle one a key frame."""
    return ClipSample(0, {"question": "q", "task": record.task}, torch.zeros(3, 56, 56, 3, dtype=torch.uint8),
                      torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64),
                      torch.tensor([False, key, False]), 2.0, record)


def test_attainable_reward_and_the_relative_bar():
    mcq = _record("General video QA MCQ", "B", key=False)
    tqa = _record("temporal QA", "[1, 3]", key=False)
    stq = _record("temporal-spatial free-form QA", "a cup")
    assert [algorithm.attainable_reward(r) for r in (mcq, tqa, stq)] == [2.0, 3.0, 4.0]
    assert algorithm.attainable_reward(stq, ["accuracy", "format", "temporal"]) == 3.0
    assert algorithm.attainable_reward(mcq, ["spatial"]) == 0.0
    means, hist = [1.2, 1.2, 2.0], [0.0]
    att = [algorithm.attainable_reward(r) for r in (mcq, tqa, stq)]
    # The paper's absolute 2.21 marks every MCQ hard; 0.5525 of the attainable maximum does not.
    assert algorithm.hard_flags("absolute", 2.21, means, hist, [True] * 3, att) == [True, True, True]
    assert algorithm.hard_flags("relative", 0.5525, means, hist, [True] * 3, att) == [False, True, True]
    assert algorithm.hard_flags("relative", 0.5525, means, hist, [True, False, True], att) == [False, False, True]
    assert algorithm.hard_threshold("relative", 0.5, [], attainable=4.0) == 2.0


def test_can_render_by_the_table_needs():
    boxed, unboxed = _record("temporal-spatial free-form QA", "x"), _record("temporal-spatial free-form QA", "x", boxes=False)
    cases = {"boxed": _sample(boxed), "no boxes": _sample(unboxed), "no key frame": _sample(boxed, key=False)}
    expect = {  # type: (boxed, no boxes, no key frame), key frames only / every frame numbered
        "darken": ((True, False, False), (True, False, False)),
        "circle": ((True, False, False), (True, False, False)),
        "numpro": ((True, True, False), (True, True, True)),
        "raw": ((True, True, True), (True, True, True)),
        "api_prompt": ((True, True, False), (True, True, False)),
    }
    for vp, (key_only, all_frames) in expect.items():
        for flag, want in ((False, key_only), (True, all_frames)):
            got = tuple(can_render(vp, s.times, s.is_key, s.reward_record, all_frames=flag) for s in cases.values())
            assert got == want, (vp, flag)
    assert eligible(cases["no boxes"], ["darken", "numpro"]) and not eligible(cases["no key frame"], ["darken", "numpro"])
    assert eligible(cases["no key frame"], ["darken", "numpro"], all_frames=True)


def test_chooser_may_pick():
    from visioncoach.config import VPConfig

    def chooser(sel, **kw):
        return rl.build_chooser(VPConfig(selector=sel, **kw), 0, 0, torch.device("cpu"), have_heatmaps=False)

    assert chooser("fixed:darken").may_pick == ["darken"]
    assert chooser("gating").may_pick == ["numpro", "darken"]
    assert chooser("random").may_pick == ["circle", "darken", "numpro", "raw"]        # no CLIP: no api_prompt
    assert chooser("none", types=["circle", "darken"]).may_pick == ["circle", "darken"]


def _results(samples, means):
    out = []
    for s, m in zip(samples, means):
        rewards = {k: torch.full((4,), m / 4) for k in COMPONENTS}
        rewards["total"] = torch.full((4,), float(m))
        group = rl.Group(None, None, [], rewards)
        out.append(rl.PromptResult(s, group, algorithm.group_advantages(rewards["total"])))
    return out


def test_eligibility_and_relative_mode_change_only_the_hard_flags(dataset, tokenizer, tmp_path):
    st, mcq = _record("temporal-spatial free-form QA", "a cup"), _record("General video QA MCQ", "B")
    samples = [_sample(st), _sample(_record("temporal-spatial free-form QA", "x", boxes=False)),
               _sample(st, key=False), _sample(mcq)]
    means = [1.7, 1.7, 1.7, 1.7]

    def flags(**over):
        runner = _runner(dataset, tokenizer, tmp_path / "x", **over)
        res = _results(samples, means)
        runner.mark_hard(res)
        m = runner.step_metrics(res)
        return [r.eligible for r in res], [r.hard for r in res], m["eligible_frac"], m["hard_frac"]

    # fixed:darken can be drawn on a sample with key-frame boxes only (samples 0 and 3).
    assert flags(**{"vp.selector": "fixed:darken"}) == ([True, False, False, True], [True, False, False, True], 0.5, 0.5)
    assert flags(**{"vp.selector": "fixed:darken", "vp.hard_eligible": "all"}) == ([True] * 4, [True] * 4, 1.0, 1.0)
    # numpro on every frame can be drawn on any sample; on key frames, not on sample 2.
    assert flags(**{"vp.numpro_frames": "all"})[0] == [True] * 4
    assert flags(**{"vp.numpro_frames": "key"})[0] == [True, True, False, True]
    # relative: 1.7 is below 0.5525 x 4 (times and boxes) but not 0.5525 x 3 (sample 1: no boxes).
    rel = {"vp.hard_mode": "relative", "vp.hard_threshold": 0.5525, "vp.numpro_frames": "all"}
    assert flags(**rel)[1] == [True, False, True, True]
    assert flags(**rel, **{"reward.components": "accuracy,format,temporal"})[1] == [False, False, False, False]


# ----------------------------------------------------------------------------- 3. numpro frames

def test_numpro_on_every_frame_or_key_frames_only(clips):
    s = next(c for c in clips if c.is_key.any() and not c.is_key.all())
    frames = resize_frames(s.frames, *PIXELS)
    args = (frames, s.times, s.is_key, s.reward_record, "numpro")
    key_only = key_frame_prompt(*args, darken_factor=0.3)
    every = key_frame_prompt(*args, darken_factor=0.3, all_frames=True)
    changed = lambda out: [not torch.equal(out[i], frames[i]) for i in range(len(frames))]  # noqa: E731
    assert changed(key_only) == s.is_key.tolist()
    assert changed(every) == [True] * len(frames)
    # Same numbers either way: each frame's 1-based position in the prompt ("Frame i at T s").
    n = torch.arange(1, len(frames) + 1)
    assert torch.equal(every, render_vp_reference(frames, "numpro", frame_index=n))
    assert torch.equal(key_only[s.is_key], every[s.is_key])
    # Other types ignore the switch.
    for vp in ("darken", "circle", "raw"):
        assert torch.equal(key_frame_prompt(*args[:4], vp, darken_factor=0.3),
                           key_frame_prompt(*args[:4], vp, darken_factor=0.3, all_frames=True))


# ----------------------------------------------------------------------------- 4. reward components

def test_components_change_total_and_nothing_else():
    texts, recs = ["<think>a</think>", "abcdef", "<answer>B</answer>"], [None] * 3
    full = fake_reward(texts, recs, None)
    assert with_components(fake_reward, list(COMPONENTS)) is fake_reward          # all four: reward.fn's total
    for subset in (["format"], ["format", "temporal", "spatial"], ["accuracy", "spatial"]):
        fn = with_components(fake_reward, subset)
        out = fn(texts, recs, None)
        assert all(torch.equal(out[k], full[k]) for k in COMPONENTS)            # still computed and logged
        torch.testing.assert_close(out["total"], sum(full[k] for k in subset))
        assert with_components(fn, subset)(texts, recs, None)["total"].tolist() == out["total"].tolist()
    with pytest.raises(ConfigError, match="reward.components"):
        load_config(["--reward.components=format,answer"])
    with pytest.raises(ConfigError, match="reward.components"):
        load_config(["--reward.components=[]"])


def test_the_rl_runner_optimises_the_enabled_sum(dataset, tokenizer, tmp_path):
    runner = _runner(dataset, tokenizer, tmp_path, **{"reward.components": "format,temporal"})
    out = runner.reward_fn(["abc", "abcd"], [None, None], runner.cfg.reward)
    assert out["total"].tolist() == (out["format"] + out["temporal"]).tolist()


# ----------------------------------------------------------------------------- 5. SD conditioning

def test_sd_condition_changes_only_the_distilled_rows_input(dataset, tokenizer, tmp_path):
    runner = _runner(dataset, tokenizer, tmp_path, **{"vp.candidate_reward": "total"})
    results = runner.collect([runner.clips[i] for i in range(2)], progress=0.0)
    assert any(r.distill for r in results), "the case should exercise distillation"
    rows = {}
    for cond in ("prompted", "raw"):
        runner.cfg.loss.sd_condition = cond
        rows[cond] = runner.loss_rows(results)
    (gp, *wp), (gr, *wr) = rows["prompted"], rows["raw"]
    assert all(torch.equal(a, b) for a, b in zip(wp, wr))                     # advantages and weights
    distilled = [r for r in results if r.distill]
    assert len(gp) == len(gr) == len(results) + len(distilled)
    for i, (a, b) in enumerate(zip(gp, gr)):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
        assert torch.equal(a.old_logp, b.old_logp)
        if i < len(results):
            assert a.group is b.group is results[i].raw
        else:
            r = distilled[i - len(results)]
            assert a.group is r.prompted and b.group is r.raw
    adv, gw, sw = wp
    zero = torch.zeros_like(sw)
    loss_p = runner.loss(gp, adv, gw, sw, None, None)[0]
    loss_r = runner.loss(gr, adv, gw, sw, None, None)[0]
    assert not torch.equal(loss_p, loss_r)                                    # the NLL's condition moved
    torch.testing.assert_close(runner.loss(gp, adv, gw, zero, None, None)[0],  # GSPO part unchanged
                               runner.loss(gr, adv, gw, zero, None, None)[0])
    with pytest.raises(ConfigError, match="loss.sd_condition"):
        load_config(["--loss.sd_condition=both"])


def test_defaults_follow_the_paper():
    cfg = load_config([])
    assert cfg.vp.candidate_reward == "spa_tmp_acc"      # appendix B.2
    assert cfg.vp.numpro_frames == "all"                 # appendix C.1
    assert cfg.loss.sd_condition == "prompted"           # eq. 1
    assert cfg.reward.components == list(COMPONENTS)     # eq. 4
    assert cfg.vp.hard_mode in ("absolute",) and cfg.vp.hard_eligible == "promptable"
    with pytest.raises(ConfigError, match="vp.hard_threshold"):
        load_config(["--vp.hard_mode=relative", "--vp.hard_threshold=2.21"])


# ----------------------------------------------------------------------------- 6. plug-and-play predict

FAST = ["--nframes", "2", "--max-pixels", "3136", "--max-new-tokens", "6", "--device", "cpu", "--workers", "1"]
VSTAR = [{"vid": "cup", "question": "What does the hand hold?", "answer": "a dark cup", "timestamps": [1.0, 3.0],
          "bboxes": [{"timestamp": 1, "xmin": 250, "ymin": 100, "xmax": 400, "ymax": 420},
                     {"timestamp": 2, "xmin": 240, "ymin": 90, "xmax": 390, "ymax": 410}],
          "width": 640, "height": 480}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    from visioncoach.models.tiny import build_processor

    path = tmp_path_factory.mktemp("tiny_ckpt")
    build_tiny_model(seed=0).save_pretrained(path)
    build_processor(tokenizer, max_pixels=3136).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def session(checkpoint):
    from visioncoach.rollout.session import load_session

    return load_session(checkpoint, device="cpu", nframes=2, max_pixels=3136, max_new_tokens=6)


@pytest.fixture()
def predict_main(monkeypatch, checkpoint, session):
    """``predict.main`` with the module's loaded model (the options of each call applied)."""
    from visioncoach import predict

    monkeypatch.setattr(predict, "load_session", lambda path, **kw: dataclasses.replace(
        session, **{k: v for k, v in kw.items() if k not in ("device", "dtype", "attn") and v is not None}))
    return predict.main


def _charades(tmp_path):
    ann = tmp_path / "ann.txt"
    ann.write_text("cup 1.0 3.5##a hand holds a cup.\ncup 2.0 6.0##the cup turns.\n")
    return ann


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_predict_numpro_numbers_every_frame_and_appends_the_hint(session, tmp_path):
    from visioncoach import predict
    from visioncoach.selector.plug import PlugAndPlay

    item = predict.charades_items(_charades(tmp_path), predict.VideoFinder(VIDEOS))[0]
    clip = session.decode(item.video)
    frames = resize_frames(clip.frames, session.min_pixels, session.max_pixels)
    pclip, pitem, fields = PlugAndPlay("numpro").prepare(session, item, clip)
    assert fields == {"vp": "numpro", "vp_requested": "numpro"} and pitem.vp == "numpro"
    assert torch.equal(pclip.frames, render_vp_reference(frames, "numpro", frame_index=torch.arange(1, len(frames) + 1)))
    q = 'Find the moment'
    assert predict._hinted(pitem, q) == add_hint(q, "numpro") != q and predict._hinted(item, q) == q
    # Key frames only: Charades gives none, so nothing is drawn and the input is the raw one.
    pclip, pitem, fields = PlugAndPlay("numpro", numpro_frames="key").prepare(session, item, clip)
    assert pclip is clip and pitem.vp is None and fields["vp"] == "raw" and "key frames" in fields["vp_note"]


def test_predict_vp_lines_and_box_fallback(predict_main, checkpoint, tmp_path, capsys):
    ann = _charades(tmp_path)
    base = ["--bench", "charades", "--model", str(checkpoint), "--videos", str(VIDEOS), "--ann", str(ann)] + FAST
    assert predict_main(base + ["--out", str(tmp_path / "raw.jsonl")]) == 0
    assert predict_main(base + ["--out", str(tmp_path / "num.jsonl"), "--vp", "numpro"]) == 0
    assert predict_main(base + ["--out", str(tmp_path / "dark.jsonl"), "--vp", "darken"]) == 0
    raw, num, dark = (_lines(tmp_path / f) for f in ("raw.jsonl", "num.jsonl", "dark.jsonl"))
    assert all("vp" not in r for r in raw)
    assert [(r["vp"], r["vp_requested"]) for r in num] == [("numpro", "numpro")] * 2
    # darken needs boxes Charades does not have: raw input, so the very same outputs.
    assert [(r["vp"], r["vp_requested"]) for r in dark] == [("raw", "darken")] * 2
    assert all("key frames" in r["vp_note"] for r in dark)
    assert [r["output"] for r in dark] == [r["output"] for r in raw]
    assert "fell back to raw: 2 x darken needs key frames" in capsys.readouterr().out
    assert predict_main(base + ["--out", str(tmp_path / "x.jsonl"), "--vp", "nope"]) == 2
    assert "unknown visual prompt type" in capsys.readouterr().err
    assert predict_main(base + ["--out", str(tmp_path / "x.jsonl"), "--vp", "api_prompt"]) == 2
    assert "--clip-path" in capsys.readouterr().err


def test_predict_vstar_darkens_the_annotated_key_frames(predict_main, session, checkpoint, tmp_path):
    from visioncoach import predict
    from visioncoach.selector.plug import PlugAndPlay

    gt = tmp_path / "vstar.json"
    gt.write_text(json.dumps(VSTAR))
    item = predict.vstar_items(gt, predict.VideoFinder(VIDEOS))[0]
    clip = session.decode(item.video)
    pclip, pitem, fields = PlugAndPlay("darken").prepare(session, item, clip)
    assert fields == {"vp": "darken", "vp_requested": "darken"} and pitem.vp == "darken"
    keyed = session.decode(item.video, (1.0, 2.0))
    frames = resize_frames(keyed.frames, session.min_pixels, session.max_pixels)
    assert int(keyed.is_key.sum()) == 2 and torch.equal(pclip.is_key, keyed.is_key)
    for i, k in enumerate(keyed.is_key.tolist()):
        assert torch.equal(pclip.frames[i], frames[i]) != k          # only the key frames are darkened
    out = tmp_path / "v.jsonl"
    assert predict_main(["--bench", "vstar", "--model", str(checkpoint), "--videos", str(VIDEOS), "--ann", str(gt),
                         "--out", str(out), "--vp", "darken"] + FAST) == 0
    [rec] = _lines(out)
    assert rec["vp"] == "darken" and set(rec["outputs"]) == {"what", "when1", "where1", "where2", "when2"}


def test_predict_with_a_selector(predict_main, checkpoint, tmp_path, monkeypatch):
    import visioncoach.selector.model as selector_model

    seen = []

    class FakeSelector:
        def __init__(self, path, device):
            self.labels = iter(["numpro", "api_prompt"])

        def predict(self, batch):
            seen.extend(batch)
            return [next(self.labels) for _ in batch]

    monkeypatch.setattr(selector_model, "Selector", FakeSelector)
    out = tmp_path / "sel.jsonl"
    assert predict_main(["--bench", "charades", "--model", str(checkpoint), "--videos", str(VIDEOS),
                         "--ann", str(_charades(tmp_path)), "--out", str(out), "--selector", str(tmp_path)] + FAST) == 0
    a, b = _lines(out)
    assert (a["vp"], a["vp_requested"]) == ("numpro", "numpro")
    assert (b["vp"], b["vp_requested"]) == ("raw", "api_prompt") and "--clip-path" in b["vp_note"]
    assert [x["question"] for x in seen] == ["a hand holds a cup.", "the cup turns."]
    assert all(x["frames"].shape[0] == 2 for x in seen)                      # no key frames: all frames
