"""Rewards (paper section 3.4, appendix D.2): hand-written cases from the equations, the
batched path against the reference on generated outputs, bad input, record validation."""

import copy
import math
import os
from collections import OrderedDict
from types import MappingProxyType

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import visioncoach.config
from visioncoach.rewards import (TASKS, RewardConfig, accuracy_reward, box_iou, format_reward,
                                 identity_match, score, score_reference, segment_iou, sigma_at,
                                 spatial_reward, temporal_reward)
from visioncoach.grounding import _order_box, first_box, first_segment, parse_texts
from visioncoach.rewards import batched
from visioncoach.rewards.records import convert, convert_many
from visioncoach.rewards.reference import rouge

TS = "temporal-spatial free-form QA"
KEYS = ("accuracy", "format", "temporal", "spatial", "total")
N_EXAMPLES = int(os.environ.get("VISIONCOACH_HYPOTHESIS_EXAMPLES", "150"))


def rec(task=TS, answer="a dog", frame=(100, 100), **kw):
    return {"task": task, "answer": answer, "frame_size": list(frame), **kw}


def claim(name, boxes, t):
    return f"<obj>{name}</obj>" + "".join(f"<box>{list(b)}</box>" for b in boxes) + f" at <t>{t}</t>s "


def out(think, answer="A"):
    return f"<think>{think}</think><answer>{answer}</answer>"


def scored(texts, samples, cfg=RewardConfig(), progress=0.0):
    """score() after checking it equals score_reference()."""
    fast = score(texts, samples, cfg, progress)
    ref = score_reference(texts, samples, cfg, progress)
    for k in KEYS:
        assert fast[k].shape == (len(texts),) and fast[k].dtype == torch.float32
        torch.testing.assert_close(fast[k], ref[k], atol=1e-6, rtol=0, msg=k)
    return fast


def test_reward_config_is_the_config_class():
    assert RewardConfig is visioncoach.config.RewardConfig


# ---------------------------------------------------------------------------------------
# IoU, sigma schedule, identity
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("a, b, iou", [
    ((0, 0, 10, 10), (0, 0, 10, 10), 1.0),
    ((0, 0, 10, 10), (0, 0, 5, 10), 0.5),
    ((0, 0, 10, 10), (5, 0, 15, 10), 1 / 3),
    ((0, 0, 10, 10), (10, 0, 20, 10), 0.0),             # touching: no +1 pixel
    ((0, 0, 10, 10), (20, 20, 30, 30), 0.0),
    ((10, 10, 0, 0), (0, 0, 10, 10), 1.0),               # reversed corners swapped
    ((5, 5, 5, 5), (5, 5, 5, 5), 0.0),                   # zero area
    ((0, 0, 0, 10), (0, 0, 10, 10), 0.0),
])
def test_box_iou(a, b, iou):
    assert box_iou(a, b) == pytest.approx(iou)
    assert box_iou(b, a) == pytest.approx(iou)


@pytest.mark.parametrize("a, b, iou", [
    ((0, 2), (0, 2), 1.0), ((0, 2), (1, 3), 1 / 3), ((0, 2), (2, 4), 0.0), ((4, 2), (2, 4), 1.0),
    ((1, 1), (1, 1), 0.0), ((0, 4), (1, 2), 0.25),
])
def test_segment_iou(a, b, iou):
    assert segment_iou(a, b) == pytest.approx(iou)


@pytest.mark.parametrize("progress, sigma, expected", [
    (0.0, None, 4.0), (0.5, None, 2.0), (0.74, None, 4 * 0.26), (0.75, None, 1.0), (1.0, None, 1.0),
    (0.0, 2.5, 2.5), (0.9, 0.5, 0.5),
])
def test_sigma_schedule(progress, sigma, expected):
    assert sigma_at(progress, sigma) == pytest.approx(expected)


@pytest.mark.parametrize("pred, gt, soft, exact", [
    ("dog", "dog", True, True),
    ("  Red   CAR ", "red car", True, True),
    ("car", "red car", True, False),          # pred inside gt
    ("red car door", "red car", True, False),  # gt inside pred
    ("bus", "red car", False, False),
    ("", "dog", False, False), ("dog", " ", False, False),
    ("ÉCLAIR", "éclair", True, True),
])
def test_identity_match(pred, gt, soft, exact):
    assert identity_match(pred, gt, "soft") is soft
    assert identity_match(pred, gt, "exact") is exact
    assert identity_match(pred, gt, "none") is True


# ---------------------------------------------------------------------------------------
# Accuracy
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("answer, expected", [
    ("A", 1), ("A.", 1), ("(A)", 1), ("[A]", 1), ("a. the red car", 1), (" A: yes", 1), ("A\n", 1),
    ("B", 0), ("Answer: A", 0), ("AB", 0), ("", 0), ("the answer is A", 0),
])
@pytest.mark.parametrize("task, gt", [("General video QA MCQ", "A. a red car"),
                                      ("temporal QA (MCQ)", "A\n[3.0, 5.0]")])
def test_mcq_accuracy(answer, expected, task, gt):
    sample = rec(task, gt)
    assert accuracy_reward(out("x", answer), sample) == expected
    assert scored([out("x", answer)], [sample])["accuracy"].item() == expected


def test_free_form_accuracy_is_mean_rouge_with_stemming():
    sample = rec("General video QA Free-form", "run cat")
    assert accuracy_reward(out("x", "running cats"), sample) == pytest.approx(1.0)   # Porter stems
    assert accuracy_reward(out("x", "zebra"), sample) == 0.0
    text = out("x", "the cat is running fast")
    assert accuracy_reward(text, sample) == pytest.approx(rouge("the cat is running fast", "run cat"))
    ts = rec(TS, "The man picks up the red cup.")
    assert accuracy_reward(out("x", "The man picks up the red cup."), ts) == pytest.approx(1.0)
    assert accuracy_reward("<think>x</think>", ts) == 0.0     # no answer block


def test_temporal_qa_accuracy():
    sample = rec("temporal QA", "[3, 5]")
    assert accuracy_reward(out("x", "[5, 3]"), sample) == pytest.approx(1.0)       # swapped ends
    assert accuracy_reward(out("x", "<t>3</t>s to <t>4</t>s"), sample) == pytest.approx(0.5)
    assert accuracy_reward(out("x", "[4, 6] then [3, 5]"), sample) == pytest.approx(1 / 3)  # first one
    assert accuracy_reward(out("x", "soon"), sample) == 0.0
    several = rec("temporal QA", "[0, 2]", segments=[[0, 2], [5, 3]])
    assert accuracy_reward(out("x", "[3, 4]"), several) == pytest.approx(0.5)       # best segment
    assert scored([out("x", "[3, 4]")], [several])["accuracy"].item() == pytest.approx(0.5)


def test_visual_qa_accuracy_converts_image_pixels_to_frame_pixels():
    sample = rec("visual QA", "<box>[20, 10, 100, 60]</box>", frame=(100, 50), image_size=[200, 100])
    assert accuracy_reward(out("x", "[10, 5, 50, 30]"), sample) == pytest.approx(1.0)
    assert accuracy_reward(out("x", "<box>[10, 5, 30, 30]</box>"), sample) == pytest.approx(0.5)
    normalized = rec("visual QA", "[0.1, 0.1, 0.5, 0.6]", frame=(100, 50))
    assert accuracy_reward(out("x", "[50, 30, 10, 5]"), normalized) == pytest.approx(1.0)
    no_box = rec("visual QA", "the left one")
    assert accuracy_reward(out("x", "[10, 5, 50, 30]"), no_box) == 0.0
    scored([out("x", "[10, 5, 30, 30]"), out("x", "[1, 2]")], [sample, normalized])


# ---------------------------------------------------------------------------------------
# Format
# ---------------------------------------------------------------------------------------

GOOD_CLAIM = claim("dog", [(10, 10, 50, 50)], 2.0)


@pytest.mark.parametrize("text, ts, other", [
    (out(f"The {GOOD_CLAIM} runs."), 1, 1),
    (f"\n <think>{GOOD_CLAIM}</think>\n<answer>A</answer>\n", 1, 1),
    (out("no grounding at all"), 0, 1),             # temporal-spatial needs a complete claim
    (out("only <obj>dog</obj> and <t>3</t>s"), 0, 1),
    (out(f"{GOOD_CLAIM} x <box>[1, 2, 3]</box>"), 0, 0),
    (out(f"{GOOD_CLAIM} <obj>a<box>[1,2,3,4]</box></obj>"), 0, 0),   # nested
    (out(f"{GOOD_CLAIM} </t>"), 0, 0),                                 # stray closing tag
    (out(f"{GOOD_CLAIM} <t>1e3</t>"), 0, 0),
    (out(f"{GOOD_CLAIM} <obj> </obj>"), 0, 0),
    (out(f"{GOOD_CLAIM} <t>4"), 0, 0),
    (out(GOOD_CLAIM, " "), 0, 0),                                      # empty answer
    (out(GOOD_CLAIM) + "trailing", 0, 0),
    (out(GOOD_CLAIM) + out(GOOD_CLAIM), 0, 0),
    (f"<answer>A</answer><think>{GOOD_CLAIM}</think>", 0, 0),
    (f"<think>{GOOD_CLAIM}</think>", 0, 0),
    ("", 0, 0),
])
def test_format_reward(text, ts, other):
    assert format_reward(text, rec(TS)) == ts
    assert format_reward(text, rec("General video QA MCQ", "A")) == other
    r = scored([text, text], [rec(TS), rec("General video QA MCQ", "A")])
    assert r["format"].tolist() == [ts, other]


# ---------------------------------------------------------------------------------------
# Temporal (eqs. 5-6)
# ---------------------------------------------------------------------------------------

def test_temporal_reward_cases():
    kf = rec(key_frames=[{"idx": 0, "time": 2.0}])
    assert temporal_reward(out("<t>2</t>s"), kf, 1.0) == 1.0
    assert temporal_reward(out("<t>3</t>s"), kf, 1.0) == pytest.approx(math.exp(-0.5))
    assert temporal_reward(out("<t>4</t>s"), kf, 2.0) == pytest.approx(math.exp(-0.5))
    # Mean over every predicted time, in claims and prose.
    text = out(claim("dog", [(0, 0, 1, 1)], 2.0) + " and at <t>3</t>s")
    assert temporal_reward(text, kf, 1.0) == pytest.approx((1 + math.exp(-0.5)) / 2)
    # Closed intervals; distances are to key-frame times and segment endpoints.
    seg = rec(key_frames=[{"idx": 0, "time": 0.0}], segments=[[4.0, 6.0]])
    for t in ("4", "5", "6"):
        assert temporal_reward(out(f"<t>{t}</t>"), seg, 1.0) == 1.0
    assert temporal_reward(out("<t>7</t>"), seg, 1.0) == pytest.approx(math.exp(-0.5))
    assert temporal_reward(out("<t>2.5</t>"), seg, 1.0) == pytest.approx(math.exp(-1.5 ** 2 / 2))
    assert temporal_reward(out("<t>1</t>"), seg, 1.0) == pytest.approx(math.exp(-0.5))
    scored([out("<t>7</t> <t>4</t>"), out("<t>2.5</t>")], [seg, seg], RewardConfig(sigma=1.0))


def test_temporal_reward_zero_without_prediction_or_ground_truth():
    kf = rec(key_frames=[{"idx": 0, "time": 2.0}])
    assert temporal_reward(out("no times"), kf, 1.0) == 0.0
    assert temporal_reward(out("<t>x</t>"), kf, 1.0) == 0.0
    assert temporal_reward("<think>x</think><answer><t>2</t></answer>", kf, 1.0) == 0.0   # answer only
    assert temporal_reward("<answer>A</answer> <t>2</t>", kf, 1.0) == 0.0                 # no think
    assert temporal_reward(out("<t>2</t>"), rec("General video QA MCQ", "A"), 1.0) == 0.0


def test_temporal_qa_segment_comes_from_answer_when_no_segments():
    assert temporal_reward(out("<t>4</t>"), rec("temporal QA", "[3, 5]"), 1.0) == 1.0
    assert temporal_reward(out("<t>6</t>"), rec("temporal QA (MCQ)", "C\n[3, 5]"), 1.0) == \
        pytest.approx(math.exp(-0.5))
    # Other tasks do not read their answer as a segment.
    assert temporal_reward(out("<t>4</t>"), rec("General video QA Free-form", "[3, 5]"), 1.0) == 0.0


def test_sigma_schedule_reaches_the_temporal_reward():
    kf = rec(key_frames=[{"idx": 0, "time": 2.0}])
    text = [out("<t>4</t>")]
    early = scored(text, [kf], RewardConfig(), progress=0.0)["temporal"].item()
    late = scored(text, [kf], RewardConfig(), progress=0.8)["temporal"].item()
    assert early == pytest.approx(math.exp(-4 / 32), abs=1e-6)   # sigma = 4
    assert late == pytest.approx(math.exp(-4 / 2), abs=1e-6)     # sigma = 1


# ---------------------------------------------------------------------------------------
# Spatial (eqs. 7-8, 13-15)
# ---------------------------------------------------------------------------------------

DOG = (10, 10, 50, 50)          # pixels of a 100 x 100 frame
CAT = (60, 60, 90, 90)


def scene(objects, time=2.0, **kw):
    """A record with one key frame at ``time`` holding ``objects`` {name: [pixel boxes]}."""
    items = {name: [[v / 100 for v in b] for b in boxes] for name, boxes in objects.items()}
    return rec(key_frames=[{"idx": 7, "time": time}], key_items={"7": items}, **kw)


def spatial_all(text, sample, tau=1.0, identity="soft"):
    values = {m: spatial_reward(text, sample, tau, m, identity) for m in ("object_aware", "max", "avg")}
    for m, v in values.items():
        cfg = RewardConfig(tau=tau, spatial_mode=m, identity=identity)
        assert scored([text], [sample], cfg)["spatial"].item() == pytest.approx(v, abs=1e-6)
    return values["object_aware"], values["max"], values["avg"]


def test_spatial_perfect_claim():
    assert spatial_all(out(claim("dog", [DOG], 2.0)), scene({"dog": [DOG]})) == (1, 1, 1)


def test_spatial_wrong_name_perfect_box():
    # Identity matters only in the object-aware reward.
    assert spatial_all(out(claim("cat", [DOG], 2.0)), scene({"dog": [DOG]})) == (0, 1, 1)


def test_spatial_two_objects_claim_covers_one():
    oa, mx, avg = spatial_all(out(claim("dog", [DOG], 2.0)), scene({"dog": [DOG], "cat": [CAT]}))
    assert (oa, mx) == (1, 1) and avg == pytest.approx(0.5)


def test_spatial_multi_box_claim():
    # Object-aware takes, per matched object, the max over all the claim's boxes; max and avg
    # score a claim by its single best box.
    text = out(claim("animal", [DOG, CAT], 2.0))
    oa, mx, avg = spatial_all(text, scene({"dog": [DOG], "cat": [CAT]}), identity="none")
    assert (oa, mx) == (1, 1) and avg == pytest.approx(0.5)


def test_spatial_partial_iou_and_several_gt_boxes_per_object():
    sample = scene({"dog": [CAT, DOG]})
    assert spatial_all(out(claim("dog", [(10, 10, 30, 50)], 2.0)), sample) == pytest.approx((0.5,) * 3)


def test_spatial_matched_objects_are_averaged():
    sample = scene({"red car": [DOG], "blue car": [CAT]})
    oa, mx, avg = spatial_all(out(claim("car", [DOG], 2.0)), sample)
    assert oa == pytest.approx(0.5) and mx == 1 and avg == pytest.approx(0.5)
    assert spatial_all(out(claim("red car", [DOG], 2.0)), sample)[0] == 1


def test_spatial_temporal_gate_is_closed():
    sample = scene({"dog": [DOG]})
    assert spatial_all(out(claim("dog", [DOG], 3.0)), sample) == (1, 1, 1)        # dt = tau
    assert spatial_all(out(claim("dog", [DOG], 1.0)), sample) == (1, 1, 1)
    assert spatial_all(out(claim("dog", [DOG], 3.01)), sample) == (0, 0, 0)
    assert spatial_all(out(claim("dog", [DOG], 2.0)), sample, tau=0.0) == (1, 1, 1)
    assert spatial_all(out(claim("dog", [DOG], 2.5)), sample, tau=0.0) == (0, 0, 0)


def test_spatial_object_aware_divides_by_valid_claims_others_by_all():
    sample = scene({"dog": [DOG]})
    text = out(claim("dog", [DOG], 2.0) + claim("dog", [DOG], 9.0) + claim("cat", [DOG], 2.0))
    oa, mx, avg = spatial_all(text, sample)
    assert oa == 1 and mx == pytest.approx(2 / 3) and avg == pytest.approx(2 / 3)


def test_spatial_nearest_key_frame_ties_go_to_earlier_frame():
    # Listed late-first: "earlier" is by time, not by list position.
    sample = rec(key_frames=[{"idx": 2, "time": 3.0}, {"idx": 1, "time": 1.0}],
                 key_items={"1": {"dog": [[0.1, 0.1, 0.5, 0.5]]}, "2": {"dog": [[0.6, 0.6, 0.9, 0.9]]}})
    assert spatial_all(out(claim("dog", [DOG], 2.0)), sample) == (1, 1, 1)
    assert spatial_all(out(claim("dog", [CAT], 2.0)), sample) == (0, 0, 0)
    assert spatial_all(out(claim("dog", [CAT], 2.01)), sample) == (1, 1, 1)


def test_spatial_only_frames_with_key_items_are_candidates():
    sample = rec(key_frames=[{"idx": 0, "time": 2.0}, {"idx": 1, "time": 5.0}],
                 key_items={"1": {"dog": [[0.1, 0.1, 0.5, 0.5]]}, "9": {"dog": [[0, 0, 1, 1]]}})
    assert spatial_all(out(claim("dog", [DOG], 2.2)), sample, tau=1.0) == (0, 0, 0)
    assert spatial_all(out(claim("dog", [DOG], 2.2)), sample, tau=3.0) == (1, 1, 1)


@pytest.mark.parametrize("name, soft, exact, none", [
    ("Car", 1, 0, 1), ("  RED   car ", 1, 1, 1), ("red car door", 1, 0, 1), ("bus", 0, 0, 1),
])
def test_spatial_identity_modes(name, soft, exact, none):
    sample = scene({"red car": [DOG]})
    text = out(claim(name, [DOG], 2.0))
    got = [spatial_all(text, sample, identity=i)[0] for i in ("soft", "exact", "none")]
    assert got == [soft, exact, none]


def test_spatial_zero_without_ground_truth_or_claims():
    text = out(claim("dog", [DOG], 2.0))
    assert spatial_all(text, rec(key_frames=[{"idx": 0, "time": 2.0}])) == (0, 0, 0)
    assert spatial_all(text, rec(key_items={"0": {"dog": [[0, 0, 1, 1]]}})) == (0, 0, 0)  # no time
    assert spatial_all(text, scene({"dog": []})) == (0, 0, 0)   # an object with no box
    assert spatial_all(out("<t>2</t> no claims"), scene({"dog": [DOG]})) == (0, 0, 0)
    assert spatial_all(f"<think>{claim('dog', [DOG], 2.0)}", scene({"dog": [DOG]})) == (0, 0, 0)


def test_components_are_independent_of_format():
    # Malformed elsewhere (stray tag, no answer): the claim still earns its rewards.
    sample = scene({"dog": [DOG]})
    r = scored([f"<think>{claim('dog', [DOG], 2.0)} </obj></think> trailing"], [sample])
    assert r["format"].item() == 0 and r["accuracy"].item() == 0
    assert r["spatial"].item() == 1 and r["temporal"].item() == 1


def test_score_total_and_record_reuse(monkeypatch):
    calls = []
    real = batched.convert_many
    monkeypatch.setattr(batched, "convert_many", lambda s, i: calls.extend(i) or real(s, i))
    a, b = scene({"dog": [DOG]}, answer="a dog runs"), scene({"cat": [CAT]}, answer="a cat")
    texts = [out(claim("dog", [DOG], 2.0), "a dog runs"), out("x"), out(claim("cat", [CAT], 2.5), "cat"),
             out(claim("dog", [DOG], 4.0), "dog")]
    r = scored(texts, [a, a, b, a])
    assert calls == [0, 2]
    torch.testing.assert_close(r["total"], r["accuracy"] + r["format"] + r["temporal"] + r["spatial"])
    assert r["total"][0].item() == pytest.approx(4.0)


# ---------------------------------------------------------------------------------------
# Record validation
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, field", [
    ({"task": None}, "task"),
    ({"task": "video QA"}, "task"),
    ({"answer": None}, "answer"),
    ({"answer": 3}, "answer"),
    ({"frame_size": None}, "frame_size"),
    ({"frame_size": [0, 10]}, "frame_size"),
    ({"frame_size": [10]}, "frame_size"),
    ({"frame_size": [10, float("nan")]}, "frame_size"),
    ({"frame_size": [True, 10]}, "frame_size"),
    ({"image_size": "big"}, "image_size"),
    ({"key_frames": {"idx": 0}}, "key_frames"),
    ({"key_frames": [{"idx": 0, "time": 1.0}, {"idx": 1, "time": "2s"}]}, "key_frames[1].time"),
    ({"key_frames": [{"idx": 0.5, "time": 1.0}]}, "key_frames[0].idx"),
    ({"key_frames": [{"time": 1.0}]}, "key_frames[0]"),
    ({"key_items": [1]}, "key_items"),
    ({"key_items": {"0": {"dog": [[0, 0, 1]]}}}, "key_items['0']['dog']"),
    ({"key_items": {"0": {"dog": [[0, 0, 1, "1"]]}}}, "key_items['0']['dog']"),
    ({"key_items": {"0": {"dog": [[0, 0, 1, 10 ** 400]]}}}, "key_items['0']['dog']"),
    ({"key_items": {"0": [[0, 0, 1, 1]]}}, "key_items['0']"),
    ({"segments": [[1, 2], [3]]}, "segments[1]"),
    ({"segments": "[1, 2]"}, "segments"),
])
def test_record_validation_names_field_and_index(change, field):
    bad = rec(**{k: v for k, v in change.items()})
    for k, v in change.items():
        if v is None:
            del bad[k]
    samples = [rec(), rec(), rec(), bad]
    for fn in (score, score_reference):
        with pytest.raises(ValueError) as err:
            fn([out("x")] * 4, samples, RewardConfig())
        msg = str(err.value)
        assert msg.startswith("sample 3:") and repr(field).strip("'") in msg, msg


def test_bad_arguments():
    with pytest.raises(ValueError, match="2 texts but 1 samples"):
        score(["a", "b"], [rec()], RewardConfig())
    with pytest.raises(ValueError, match="sample 0: must be a dict"):
        score(["a"], ["not a record"], RewardConfig())
    with pytest.raises(ValueError, match="spatial_mode"):
        score(["a"], [rec()], RewardConfig(spatial_mode="sum"))
    with pytest.raises(ValueError, match="identity"):
        score(["a"], [rec()], RewardConfig(identity="fuzzy"))
    with pytest.raises(ValueError, match="sigma"):
        score(["a"], [rec()], RewardConfig(sigma=0.0))
    empty = score([], [], RewardConfig())
    assert all(empty[k].shape == (0,) for k in KEYS)


# ---------------------------------------------------------------------------------------
# Generated cases: batched == reference, in range, never raises
# ---------------------------------------------------------------------------------------

NAMES = ["person", "red car", "car", "Dog", "dog", "the man", "man", "cup", "猫", "Ball "]
TIMES = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 7.25, 10.0]
PIECES = ["<think>", "</think>", "<answer>", "</answer>", "<obj>", "</obj>", "<box>", "</box>",
          "<t>", "</t>", "[", "]", ",", " at ", "s", "nan", "1e5", "9" * 50, "<", "\n", "é"]

coord = st.one_of(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 1.0]),
                  st.floats(0, 1).map(lambda x: round(x, 3)))
# Mostly proper boxes (x1 < x2, y1 < y2), sometimes anything (reversed, zero area).
norm_box = st.one_of(
    st.builds(lambda x, y, w, h: [x, y, round(x + w, 3), round(y + h, 3)],
              coord.map(lambda v: round(0.7 * v, 3)), coord.map(lambda v: round(0.7 * v, 3)),
              st.sampled_from([0.05, 0.1, 0.2, 0.3]), st.sampled_from([0.05, 0.1, 0.2, 0.3])),
    st.lists(coord, min_size=4, max_size=4))
time_value = st.one_of(st.sampled_from(TIMES), st.floats(-2, 30).map(lambda x: round(x, 2)))


@st.composite
def records(draw):
    task = draw(st.sampled_from(TASKS))
    w, h = draw(st.sampled_from([28, 100, 336, 640])), draw(st.sampled_from([28, 100, 252, 480]))
    sample = {"task": task, "frame_size": [w, h]}
    frames = [{"idx": 3 * i, "time": t} for i, t in enumerate(draw(st.lists(time_value, max_size=4)))]
    if frames or draw(st.booleans()):
        sample["key_frames"] = frames
    items = {}
    for f in frames + [{"idx": 99}]:
        if draw(st.booleans()):
            objects = {}
            for name in draw(st.lists(st.sampled_from(NAMES), max_size=3)):
                objects[name] = draw(st.lists(norm_box, max_size=2))
            items[str(f["idx"])] = objects
    if items:
        sample["key_items"] = items
    if draw(st.integers(0, 3)) == 0:
        sample["segments"] = draw(st.lists(st.lists(time_value, min_size=2, max_size=2), max_size=2))
    s, e = draw(time_value), draw(time_value)
    letter = draw(st.sampled_from("ABCD"))
    if task == "visual QA":
        if draw(st.booleans()):
            iw, ih = draw(st.sampled_from([64, 200, 1280])), draw(st.sampled_from([64, 100, 720]))
            sample["image_size"] = [iw, ih]
            box = [round(draw(coord) * v) for v in (iw, ih, iw, ih)]
        else:
            box = [draw(coord) for _ in range(4)]
        sample["answer"] = draw(st.sampled_from(["<box>{}</box>", "{}", "none"])).format(box)
    elif task == "temporal QA":
        sample["answer"] = f"[{s}, {e}]"
    elif task == "temporal QA (MCQ)":
        sample["answer"] = f"{letter}\n[{s}, {e}]"
    elif task == "General video QA MCQ":
        sample["answer"] = draw(st.sampled_from([letter, f"{letter}. the red car", "x"]))
    else:
        sample["answer"] = draw(st.sampled_from(["the man picks up a red cup", "a dog runs", "cars"]))
    return sample


def _fmt(v):
    return repr(round(v, 2)) if isinstance(v, float) else str(v)


@st.composite
def outputs(draw, sample):
    w, h = sample["frame_size"]
    gt_boxes = [[b[0] * w, b[1] * h, b[2] * w, b[3] * h]
                for objs in (sample.get("key_items") or {}).values() for bs in objs.values() for b in bs]
    gt_names = [n for objs in (sample.get("key_items") or {}).values() for n in objs] or NAMES
    gt_times = [f["time"] for f in sample.get("key_frames") or []] or [2.0]
    # Claims close to the ground truth, so the rewards' non-zero branches are exercised.
    box = st.one_of(
        st.sampled_from(gt_boxes) if gt_boxes else st.nothing(),
        st.builds(lambda b, d: [v + d for v in b], st.sampled_from(gt_boxes), st.sampled_from([-3, 2.5, 8]))
        if gt_boxes else st.nothing(),
        st.lists(st.integers(-10, 700), min_size=4, max_size=4),
        st.lists(st.sampled_from([0.0, 10.5, 100.0, 250.25]), min_size=4, max_size=4),
        st.lists(st.integers(0, 99), min_size=3, max_size=5),
    )
    near = st.builds(lambda t, d: t + d, st.sampled_from(gt_times),
                     st.sampled_from([0.0, 0.5, -0.5, 1.0, -1.0, 1.5, 4.0]))
    when = st.one_of(near, time_value)
    parts = []
    for kind in draw(st.lists(st.sampled_from(["claim", "claim", "prose", "time"]), max_size=5)):
        if kind == "claim":
            boxes = draw(st.lists(box, min_size=1, max_size=3))
            sep = draw(st.sampled_from(["", " ", "\n"]))
            name = draw(st.one_of(st.sampled_from(gt_names), st.sampled_from(NAMES)))
            parts.append(f"<obj>{name}</obj>" + sep.join(
                f"<box>[{', '.join(_fmt(v) for v in b)}]</box>" for b in boxes)
                + draw(st.sampled_from(["at", " at ", "\nat "])) + f"<t>{_fmt(draw(when))}</t>"
                + draw(st.sampled_from(["s ", " ", ". "])))
        elif kind == "time":
            parts.append(f"around <t>{_fmt(draw(when))}</t>s ")
        else:
            parts.append(draw(st.sampled_from(["We see the scene. ", "then ", "the dog moves "])))
    seg = f"[{_fmt(draw(when))}, {_fmt(draw(when))}]"
    answer = draw(st.sampled_from([
        sample["answer"], "A", "(B)", "c. dog", "Answer: A", seg,
        f"<t>{_fmt(draw(when))}</t>s to <t>{_fmt(draw(when))}</t>s",
        f"<box>[{', '.join(_fmt(v) for v in draw(box))}]</box>", "a red cup", ""]))
    text = (draw(st.sampled_from(["", " ", "\n"])) + f"<think>{''.join(parts)}</think>"
            + draw(st.sampled_from(["", "\n"])) + f"<answer>{answer}</answer>")
    mutations = st.lists(st.tuples(
        st.sampled_from(["delete", "duplicate", "insert"]), st.integers(0, 10 ** 6),
        st.integers(0, 10 ** 6), st.one_of(st.sampled_from(PIECES), st.text(max_size=3))),
        min_size=1, max_size=3)
    for op, i, j, piece in draw(st.one_of(st.just([]), mutations)):
        a, b = sorted((i % (len(text) + 1), j % (len(text) + 1)))
        b = min(b, a + 30)
        if op == "delete":
            text = text[:a] + text[b:]
        elif op == "duplicate":
            text = text[:b] + text[a:b] + text[b:]
        else:
            text = text[:a] + piece + text[a:]
    return text


@st.composite
def batches(draw):
    texts, samples = [], []
    for sample in draw(st.lists(records(), min_size=1, max_size=3)):
        for _ in range(draw(st.integers(1, 4))):
            texts.append(draw(outputs(sample)))
            samples.append(sample)
    identity = draw(st.sampled_from(["soft", "exact", "none"]))
    sigma = draw(st.sampled_from([None, 0.5, 1.0, 3.0]))
    tau = draw(st.sampled_from([0.0, 0.5, 1.0, 2.5]))
    progress = draw(st.sampled_from([0.0, 0.3, 0.75, 1.0]))
    return texts, samples, identity, sigma, tau, progress


def check_in_range(r, n):
    for k in KEYS:
        assert r[k].shape == (n,) and r[k].dtype == torch.float32 and torch.isfinite(r[k]).all()
    for k in ("accuracy", "format", "temporal", "spatial"):
        assert ((r[k] >= 0) & (r[k] <= 1)).all(), (k, r[k])


@settings(max_examples=N_EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batches())
def test_batched_equals_reference_on_generated_outputs(batch):
    texts, samples, identity, sigma, tau, progress = batch
    for mode in ("object_aware", "max", "avg"):
        cfg = RewardConfig(sigma=sigma, tau=tau, spatial_mode=mode, identity=identity)
        r = scored(texts, samples, cfg, progress)
        check_in_range(r, len(texts))


@settings(max_examples=40, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batches())
def test_kernel_backend_equals_tensor_path_on_generated_outputs(batch):
    # The Triton kernels (interpreted here, as on CUDA by default) inside score(): float32
    # against the float64 tensor path; the generator's times and boxes sit on exact dt == tau
    # and interval-end ties, which float32 differences of float32 inputs keep exact.
    texts, samples, identity, sigma, tau, progress = batch
    for mode in ("object_aware", "max", "avg"):
        cfg = RewardConfig(sigma=sigma, tau=tau, spatial_mode=mode, identity=identity)
        fast = score(texts, samples, cfg, progress, backend="triton")
        ref = score(texts, samples, cfg, progress, backend="torch")
        for k in KEYS:
            torch.testing.assert_close(fast[k], ref[k], atol=2e-6, rtol=0, msg=k)


@settings(max_examples=max(N_EXAMPLES // 3, 10), deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batches())
def test_batched_equals_reference_without_the_native_reward_code(batch):
    # An extension built before csrc/rewards.cpp and csrc/gt_pack.cpp: the Python and tensor
    # paths (ground truth, temporal, spatial, ROUGE counting) take over, with the same results.
    from visioncoach.rewards import rouge as rouge_module

    texts, samples, identity, sigma, tau, progress = batch
    saved = batched._NATIVE_REWARDS, batched._pack_native, rouge_module._native_op
    batched._NATIVE_REWARDS, batched._pack_native, rouge_module._native_op = False, None, None
    try:
        for mode in ("object_aware", "max", "avg"):
            scored(texts, samples, RewardConfig(sigma=sigma, tau=tau, spatial_mode=mode, identity=identity),
                   progress)
    finally:
        batched._NATIVE_REWARDS, batched._pack_native, rouge_module._native_op = saved


@pytest.mark.skipif(not batched._NATIVE_REWARDS, reason="visioncoach._C lacks the reward loops")
@settings(max_examples=N_EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batches())
def test_native_cpu_loops_equal_tensor_path_on_generated_outputs(batch):
    # csrc/rewards.cpp's loops (the CPU default) against the tensor-op path they replace:
    # the same float64 arithmetic, so equal up to exp's last bit and the order of small sums.
    texts, samples, identity, sigma, tau, progress = batch
    records, index = batched.convert_records(samples)
    cb = parse_texts(texts, "native").claims
    gt = batched.ground_truth(records)
    rollout_record = torch.tensor(index, dtype=torch.int64)
    s = sigma_at(progress, sigma)
    fast = batched.temporal_rewards(cb, gt, rollout_record, s)
    slow = batched.temporal_rewards(cb, gt, rollout_record, s, native=False)
    torch.testing.assert_close(fast, slow, atol=1e-12, rtol=0)
    for mode in ("object_aware", "max", "avg"):
        fast = batched.spatial_rewards(cb, gt, rollout_record, tau, mode, identity, native_identity=True)
        slow = batched.spatial_rewards(cb, gt, rollout_record, tau, mode, identity, native_identity=True,
                                       native=False)
        torch.testing.assert_close(fast, slow, atol=1e-12, rtol=0, msg=mode)


@pytest.mark.skipif(not batched._NATIVE_REWARDS, reason="visioncoach._C lacks the reward loops")
def test_native_cpu_loops_are_what_score_runs_and_check_their_input(monkeypatch):
    calls = []
    for name in ("temporal_reward_cpu", "spatial_reward_cpu"):
        real = getattr(torch.ops.visioncoach, name)
        monkeypatch.setattr(batched.torch.ops.visioncoach, name,
                            lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a), raising=False)
    scored([out(claim("dog", [DOG], 2.0))], [scene({"dog": [DOG]})])
    assert calls == ["temporal_reward_cpu", "spatial_reward_cpu"]
    monkeypatch.undo()
    one = torch.zeros(1)
    with pytest.raises(RuntimeError, match="rollout_record holds 5"):
        torch.ops.visioncoach.temporal_reward_cpu(
            one, torch.zeros(1, dtype=torch.int64), torch.tensor([5]), torch.zeros(1, 1),
            torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, 1, 2), torch.ones(1, 1, dtype=torch.bool), 1, 1.0)
    with pytest.raises(RuntimeError, match="times must be Float"):
        torch.ops.visioncoach.temporal_reward_cpu(
            one.double(), torch.zeros(1, dtype=torch.int64), torch.tensor([0]), torch.zeros(1, 1),
            torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, 1, 2), torch.ones(1, 1, dtype=torch.bool), 1, 1.0)


# Run in a child process: with an extension that lacks these checks the calls read far out
# of bounds, which would take the whole test session down instead of failing this test.
_SPATIAL_BAD_FRAME_OF = """
import torch, visioncoach.ops
i = torch.int64
box = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
def call(frame_of):
    return torch.ops.visioncoach.spatial_reward_cpu(
        torch.zeros(1), torch.zeros(1, dtype=i), torch.zeros(1, dtype=i), box, torch.ones(1, dtype=i),
        torch.zeros(1, dtype=i), frame_of, torch.zeros(1), box, torch.zeros(1, 1, dtype=i),
        torch.zeros(1, 1, dtype=i), torch.ones(1, dtype=i), torch.ones(1, 1, dtype=torch.bool), 1, 1.0, 0)
print(call(torch.zeros(1, 1, dtype=i)).tolist())
for frame_of in (torch.tensor([[1 << 40]]), torch.zeros(1, 0, dtype=i)):
    try:
        call(frame_of)
    except RuntimeError as exc:
        print(str(exc).splitlines()[0])
"""


@pytest.mark.skipif(not batched._NATIVE_REWARDS, reason="visioncoach._C lacks the reward loops")
def test_native_spatial_loop_checks_every_frame_index():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _SPATIAL_BAD_FRAME_OF], check=False, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "[1.0]"
    assert "frame_of holds 1099511627776, outside [0, 1)" in lines[1]
    assert "frame_of has no key-frame slot" in lines[2]


def test_convert_many_does_not_warn_where_convert_raises():
    # A box coordinate times the frame width overflows float64: validate's ValueError, and no
    # numpy overflow warning on the way (which -W error would raise in its place).
    import warnings

    sample = rec("visual QA", "x", frame=(1e30, 10), key_frames=[{"idx": 0, "time": 1}],
                 key_items={"0": {"dog": [[1e300, 0, 1, 1]]}})
    with pytest.raises(ValueError) as want:
        convert(sample, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError) as got:
            convert_many([sample], [7])
    assert str(got.value) == str(want.value)


def _set_first(sample, field, fn):
    """Apply fn to the first box / key frame / segment list of ``sample`` where it has one."""
    if field == "box":
        for objects in (sample.get("key_items") or {}).values():
            for boxes in objects.values():
                if boxes:
                    boxes[0] = fn(boxes[0])
                    return
    elif field == "frame" and sample.get("key_frames"):
        sample["key_frames"][0] = fn(dict(sample["key_frames"][0]))
    elif field == "segments" and sample.get("segments"):
        sample["segments"] = fn(sample["segments"])
    elif field in ("frame_size", "image_size", "key_items", "key_frames", "task", "answer"):
        sample[field] = fn(sample.get(field))


# Forms convert takes (subclasses, tuples, big ints, -0.0) and forms it rejects, each in the
# place it can go: convert_many must agree on every one (same Record, or the same error).
MUTATIONS = [
    ("frame_size", lambda v: [True, v[1]]), ("frame_size", lambda v: [np.float64(v[0]), v[1]]),
    ("frame_size", lambda v: (float(v[0]), v[1])), ("frame_size", lambda v: [10 ** 400, v[1]]),
    ("frame_size", lambda v: [v[0], float("nan")]), ("frame_size", lambda v: [v[0], -1]),
    ("frame_size", lambda v: [v[0], 1e39]), ("frame_size", lambda v: [2 ** 60 + 1, v[1]]),
    ("image_size", lambda v: [0, 5]), ("image_size", lambda v: [np.int64(640), 480]),
    ("image_size", lambda v: None), ("task", lambda v: "video QA"), ("answer", lambda v: 3),
    ("frame", lambda f: {**f, "time": np.float32(1.5)}), ("frame", lambda f: {**f, "time": True}),
    ("frame", lambda f: {**f, "time": "2"}), ("frame", lambda f: {**f, "time": float("inf")}),
    ("frame", lambda f: {**f, "time": 1e39}), ("frame", lambda f: {**f, "time": 10 ** 400}),
    ("frame", lambda f: {**f, "time": 2 ** 70 + 1}), ("frame", lambda f: {**f, "time": -0.0}),
    ("frame", lambda f: {**f, "idx": True}), ("frame", lambda f: {**f, "idx": np.int64(0)}),
    ("frame", lambda f: {"idx": f["idx"]}), ("frame", lambda f: MappingProxyType(f)),
    ("frame", lambda f: OrderedDict(f)),
    ("box", lambda b: [np.float64(b[0]), *b[1:]]), ("box", lambda b: [True, *b[1:]]),
    ("box", lambda b: [1e308, *b[1:]]), ("box", lambda b: [-0.0, *b[1:]]),
    ("box", lambda b: [10 ** 400, *b[1:]]), ("box", lambda b: ["1", *b[1:]]),
    ("box", lambda b: tuple(b)), ("box", lambda b: b[:3]), ("box", lambda b: [2 ** 60 + 1, *b[1:]]),
    ("box", lambda b: [b[2], b[3], b[0], b[1]]), ("box", lambda b: [float("nan"), *b[1:]]),
    ("key_items", lambda v: OrderedDict(v or {})), ("key_items", lambda v: [1]),
    ("key_items", lambda v: {**(v or {}), "0": {"dog": []}}),
    ("key_items", lambda v: {**(v or {}), 0: {"dog": [[0, 0, 1, 1]]}}),
    ("key_items", lambda v: {**(v or {}), "99": {"dog": [[0, 0, 1, 1e39]]}}),
    ("key_frames", lambda v: tuple(v or ())), ("key_frames", lambda v: {"idx": 0}),
    ("segments", lambda v: [[1, True]]), ("segments", lambda v: [(np.float64(1), 2)]),
    ("segments", lambda v: tuple(map(tuple, v))), ("segments", lambda v: [[5, 1]]),
    ("segments", lambda v: [[1, 2, 3]]), ("segments", lambda v: [[1e39, 2]]),
]


@settings(max_examples=N_EXAMPLES * 2, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(records(), min_size=1, max_size=4), st.lists(
    st.tuples(st.integers(0, 3), st.sampled_from(range(len(MUTATIONS)))), max_size=2))
def test_convert_many_equals_convert_on_generated_records(samples, mutations):
    samples = copy.deepcopy(samples)
    for which, m in mutations:
        field, fn = MUTATIONS[m]
        _set_first(samples[which % len(samples)], field, fn)
    indices = [3 * i + 1 for i in range(len(samples))]
    try:
        expected = [convert(s, i) for s, i in zip(samples, indices)]
    except ValueError as exc:
        with pytest.raises(ValueError) as got:
            convert_many(samples, indices)
        assert str(got.value) == str(exc)
        return
    got = convert_many(samples, indices)
    # repr too: it tells -0.0 from 0.0, which == does not
    assert got == expected and repr(got) == repr(expected)


def test_convert_many_takes_the_batch_path_on_plain_records(monkeypatch):
    from visioncoach.rewards import records as records_module

    samples = [scene({"dog": [DOG], "cat": [CAT, DOG]}, segments=[[3, 1]]), rec("visual QA", "[1, 2, 3, 4]"),
               rec("temporal QA", "[4, 2.5]", key_frames=[{"idx": 1, "time": 2}])]
    expected = [convert(s, i) for i, s in enumerate(samples)]
    monkeypatch.setattr(records_module, "convert", lambda s, i: pytest.fail("fell back to convert"))
    assert convert_many(samples, [0, 1, 2]) == expected


# Numbers as answers write them, and ones float32 cannot hold (the match is then skipped).
ANSWER_NUMBERS = ["1", "2.5", "-3", ".5", "7.", "+4", "0", "250.25", "1" + "0" * 39, "-9" * 20,
                  "9" * 400, "0." + "0" * 60 + "1"]
answer_number = st.sampled_from(ANSWER_NUMBERS)
answer_part = st.one_of(
    st.lists(answer_number, min_size=1, max_size=5).map(lambda v: "[" + ", ".join(v) + "]"),
    st.tuples(answer_number, answer_number).map(lambda v: f"<t>{v[0]}</t>s to <t>{v[1]}</t>s"),
    st.lists(answer_number, min_size=4, max_size=4).map(lambda v: "<box>[" + ",".join(v) + "]</box>"),
    st.sampled_from(["A", " ", "\n", "x, ", "[", "]", "[1,", "The answer is "]))


@settings(max_examples=N_EXAMPLES * 2, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(answer_part, max_size=6).map("".join), max_size=6))
def test_batched_answer_numbers_equal_first_box_and_first_segment(answers):
    # r_acc reads every answer's first box / segment in one pass; the reference functions
    # read one answer at a time (first valid match; one whose numbers overflow float32 skipped).
    boxes = batched._first_numbers(batched._BOX_IN_TEXT, answers, 4)
    segments = batched._first_numbers(batched._SEGMENT_IN_TEXT, answers, 2)
    for a, box, seg in zip(answers, boxes, segments):
        assert (box and _order_box(*box)) == first_box(a), a
        assert (seg and tuple(sorted(seg))) == first_segment(a), a


def _assert_same_ground_truth(a, b):
    for k, v in vars(a).items():
        w = getattr(b, k)
        if isinstance(v, torch.Tensor):
            assert v.dtype == w.dtype and v.shape == w.shape and torch.equal(v, w), (k, v, w)
        else:
            assert v == w, k


@pytest.mark.skipif(batched._pack_native is None, reason="visioncoach._C lacks pack_ground_truth")
@settings(max_examples=N_EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(records(), max_size=5))
def test_native_ground_truth_packing_equals_python(samples):
    recs = [convert(s, i) for i, s in enumerate(samples)]
    _assert_same_ground_truth(batched.ground_truth(recs), batched._ground_truth_python(recs))


@pytest.mark.skipif(batched._pack_native is None, reason="visioncoach._C lacks pack_ground_truth")
def test_native_ground_truth_packing_is_used_and_falls_back(monkeypatch):
    from visioncoach.rewards.records import KeyFrame, Record

    kf = KeyFrame(2, ["Dog ", "dog", "cat"], [[(1, 2, 3, 4)], [[5.5, 6, 7, 8], (0, 0, 1, 1)], []])
    odd = Record("visual QA", "x", (10.0, 10.0), gt_times=[1, 2.5], segments=[[1, 2]], frames=[kf])
    recs = [odd, convert(scene({"dog": [DOG], "cat": [CAT, DOG]}), 0), odd]
    calls = []
    real = batched._pack_native
    monkeypatch.setattr(batched, "_pack_native", lambda *a: calls.append(1) or real(*a))
    _assert_same_ground_truth(batched.ground_truth(recs), batched._ground_truth_python(recs))
    assert calls == [1]
    # Layouts the walk refuses: the Python packing decides (the same result, or its error).
    for bad in (Record("visual QA", "x", (1.0, 1.0), segments=[(1.0, 2.0, 3.0, 4.0)]),
                Record("visual QA", "x", (1.0, 1.0), frames=[KeyFrame(1.0, ["a"], [[(1, 2, 3)]])]),
                Record("visual QA", "x", (1.0, 1.0), gt_times=["1"])):
        try:
            want = batched._ground_truth_python([bad])
        except Exception as exc:  # noqa: BLE001 - whatever the Python packing raises
            with pytest.raises(type(exc)):
                batched.ground_truth([bad])
        else:
            _assert_same_ground_truth(batched.ground_truth([bad]), want)


def test_converted_records_are_used_as_is(monkeypatch):
    from visioncoach.rewards import convert

    a, b = scene({"dog": [DOG]}, answer="a dog runs"), scene({"cat": [CAT]}, answer="a cat")
    texts = [out(claim("dog", [DOG], 2.0), "a dog runs"), out("x"), out(claim("cat", [CAT], 2.5), "cat")]
    expected = score(texts, [a, a, b], RewardConfig())
    ra, rb = convert(a, 0), convert(b, 1)
    monkeypatch.setattr(batched, "convert_many", lambda s, i: pytest.fail("a Record was converted again"))
    got = score(texts, [ra, ra, rb], RewardConfig())
    for k in KEYS:
        torch.testing.assert_close(got[k], expected[k], atol=0, rtol=0, msg=k)


def test_generated_cases_reach_every_branch():
    # Guard against a generator that only ever produces zeros.
    seen = {k: 0 for k in KEYS}

    @settings(max_examples=300, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(batches())
    def collect(batch):
        texts, samples, identity, sigma, tau, progress = batch
        r = score(texts, samples, RewardConfig(sigma=sigma, tau=tau, identity=identity), progress)
        for k in KEYS:
            seen[k] += int((r[k] > 0).sum())

    collect()
    assert all(v > 0 for v in seen.values()), seen


def _garbage():
    n = 100_000
    yield ""
    yield "<think>" + "<obj>" * (n // 5) + "</think><answer>A</answer>"
    yield "<think>" + "<obj>dog</obj><box>[10,10,50,50]</box>at<t>2</t>" * (n // 48) + "</think><answer>A</answer>"
    yield "<think><obj>dog</obj>" + "<box>[10,10,50,50]</box>" * (n // 24) + "at<t>2</t></think><answer>[1, 2]</answer>"
    yield ("<think><obj>dog</obj><box>[0,0," + "9" * 400 + ",1]</box>at<t>" + "9" * 308 + "</t>"
           "<obj>dog</obj><box>[0,0,1e308,5]</box>at<t>inf</t><obj>dog</obj><box>[-nan,0,1,1]</box>at<t>2</t>"
           "<obj>dog</obj><box>[0,0,300000000000000000000000000000000000000,50]</box>at<t>2</t>"
           "<obj>dog</obj><box>[-300000000000000000000000000000000000000,0,"
           "300000000000000000000000000000000000000,0]</box>at<t>2</t>"
           "</think><answer>[" + "9" * 400 + ", 1]</answer>")
    yield "<think><obj>dog</obj><box>[50, 50, 10, 10]</box>at<t>2</t></think><answer>[1,2,3]</answer>"
    yield "<think><obj>猫 🐈</obj><box>[10,10,50,50]</box>at<t>2</t></think><answer>Ａ</answer>"
    yield "<think><think><obj><box><t></t></box></obj></answer>" * 50
    yield "[" * n
    yield "x" * n


@pytest.mark.parametrize("task", TASKS)
def test_bad_input_gives_finite_rewards(task):
    sample = scene({"dog": [DOG], "猫": [CAT]}, task=task, answer="A\n[1, 2]", segments=[[1.0, 3.0]])
    texts = list(_garbage())
    for mode in ("object_aware", "max", "avg"):
        r = score(texts, [sample] * len(texts), RewardConfig(spatial_mode=mode))
        check_in_range(r, len(texts))
    # The reference agrees on the short ones (it is plain, not fast).
    short = [t for t in texts if len(t) < 5000]
    scored(short, [sample] * len(short))


SOUP = PIECES + ["<obj>dog</obj>", "<box>[1, 2, 30, 40]</box>", "<t>2</t>", "<t>2.5</t>s", " at ",
                 "<obj> </obj>", "<box>[1,2,3]</box>", "A", "x", " ", "\t"]


@settings(max_examples=N_EXAMPLES * 2, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(SOUP), max_size=25).map("".join),
       st.lists(st.sampled_from(SOUP), max_size=12).map("".join), st.sampled_from(TASKS))
def test_format_agrees_with_reference_on_tag_soup(think, answer, task):
    # The batched format comes from the parser's error list; the reference checks the
    # grammar independently. Wrapping the soup in blocks makes format = 1 reachable.
    sample = rec(task, "A")
    for text in (think + answer, f"<think>{think}</think><answer>{answer}</answer>"):
        r = scored([text], [sample])
        assert r["format"].item() == format_reward(text, sample)
