"""The answer forms of the published STGR data (Open-o3-Video, VisionCoach) through the
accuracy reward: "Correct Option: B" answers and ground truths for the MCQ tasks,
"B\\n[s, e]" temporal-MCQ ground truths, "From <t>s</t>s to <t>e</t>s" temporal QA answers;
hand-written cases, the batched path against the reference, the records' ground truth, the
MCQ evaluator and predictor, and generated cases checked against the letter / segment put in."""

import contextlib
import json
import signal
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from visioncoach.eval import mcq
from visioncoach.grounding import answer_letter, first_segment, option_letter
from visioncoach.rewards import RewardConfig, accuracy_reward, convert, score, score_reference
from visioncoach.rewards.reference import segment_iou

TMCQ, MCQ, TQA = "temporal QA (MCQ)", "General video QA MCQ", "temporal QA"
KEYS = ("accuracy", "format", "temporal", "spatial", "total")
STGR_GT = "B\n[3.0, 7.0]"
OPEN_O3_GT = "From <t>3.0</t>s to <t>7.0</t>s.\nCorrect Option: B"


def rec(task, answer, **kw):
    return {"task": task, "answer": answer, "frame_size": [100, 100], **kw}


def out(answer, think="<t>4</t>s"):
    return f"<think>{think}</think><answer>{answer}</answer>"


def scored(texts, samples, cfg=RewardConfig()):
    """score() after checking it equals score_reference()."""
    fast = score(texts, samples, cfg)
    ref = score_reference(texts, samples, cfg)
    for k in KEYS:
        torch.testing.assert_close(fast[k], ref[k], atol=1e-6, rtol=0, msg=k)
    return fast


# ---------------------------------------------------------------------------------------
# The letter of an answer
# ---------------------------------------------------------------------------------------

LETTER_CASES = [
    # Open-o3-Video's temporal-MCQ answer: the letter after the marker.
    ("From <t>1</t>s to <t>2</t>s.\nCorrect Option: B", "B"),
    ("From <t>1</t>s to <t>2</t>s. Correct Option: B.", "B"),
    ("Correct Option: B", "B"), ("Correct Option:B", "B"), ("Correct Option :  (c)", "C"),
    ("correct option: [d]", "D"), ("CORRECT OPTION:\n a.", "A"), ("Correct  Option: B because", "B"),
    ("A\nCorrect Option: C", "C"),                   # the marker wins over a leading letter
    ("Correct Option: B\nCorrect Option: C", "B"),   # the first marker
    # A marker without a valid letter: no letter, not one from before the marker.
    ("Correct Option: Banana", None), ("Correct Option:", None), ("Correct Option: 7", None),
    ("A. x\nCorrect Option: none", None), ("From <t>1</t>s to <t>2</t>s.\nCorrect Option:", None),
    # No marker: option_letter's rule, unchanged.
    ("B\n[3.2, 7.5]", "B"), ("A", "A"), ("(c) dog", "C"), ("b.", "B"),
    ("Answer: A", None), ("the correct option is B", None), ("From <t>1</t>s to <t>2</t>s.", None),
    ("Correct Optıon: B", None),                     # dotless i: the marker folds ASCII only
]


def test_answer_letter():
    assert [answer_letter(t) for t, _ in LETTER_CASES] == [x for _, x in LETTER_CASES]
    # Without a marker it is option_letter.
    plain = [t for t, _ in LETTER_CASES if "orrect" not in t.lower()]
    assert [answer_letter(t) for t in plain] == [option_letter(t) for t in plain]


@contextlib.contextmanager
def time_limit(seconds):
    """Fail (instead of hanging) if the body runs longer than ``seconds``."""
    def handler(signum, frame):
        raise TimeoutError(f"took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("text", ["correct " * 20_000 + "B", "Correct" + " " * 100_000 + "option",
                                  "Correct Option:" * 10_000, "Correct Option: " + "1" * 100_000])
def test_answer_letter_on_long_input_is_linear(text):
    with time_limit(10):   # well under 1 s in practice; the alarm only turns a hang into a failure
        assert answer_letter(text) is None


# ---------------------------------------------------------------------------------------
# Accuracy reward, reference == batched
# ---------------------------------------------------------------------------------------

# (prediction, reward against a ground truth whose letter is B)
MCQ_PREDICTIONS = [
    ("From <t>3.0</t>s to <t>7.0</t>s.\nCorrect Option: B", 1.0),
    ("From <t>1</t>s to <t>2</t>s.\ncorrect option: (b)", 1.0),   # the letter, not the segment
    ("Correct Option: [B].", 1.0), ("B", 1.0), ("B\n[1, 2]", 1.0), ("(B)", 1.0),
    ("From <t>3.0</t>s to <t>7.0</t>s.\nCorrect Option: C", 0.0),
    ("B\nCorrect Option: none", 0.0), ("From <t>3.0</t>s to <t>7.0</t>s.", 0.0), ("Answer: B", 0.0),
]


@pytest.mark.parametrize("gt", [STGR_GT, OPEN_O3_GT, "B\n<t>3.0</t>s to <t>7.0</t>s"])
def test_temporal_mcq_accuracy_both_ground_truth_forms(gt):
    sample = rec(TMCQ, gt)
    texts = [out(p) for p, _ in MCQ_PREDICTIONS]
    expected = [v for _, v in MCQ_PREDICTIONS]
    assert [accuracy_reward(t, sample) for t in texts] == expected
    assert scored(texts, [sample] * len(texts))["accuracy"].tolist() == expected


@pytest.mark.parametrize("gt", ["B", "B. the red car", "Correct Option: B", "(b)"])
def test_general_mcq_accuracy_reads_correct_option(gt):
    sample = rec(MCQ, gt)
    texts = [out(p) for p, _ in MCQ_PREDICTIONS]
    expected = [v for _, v in MCQ_PREDICTIONS]
    assert scored(texts, [sample] * len(texts))["accuracy"].tolist() == expected


def test_mcq_ground_truth_without_a_letter_scores_nothing():
    for gt in ("Correct Option: none", "From <t>3.0</t>s to <t>7.0</t>s.", ""):
        sample = rec(TMCQ, gt)
        texts = [out("Correct Option: B"), out("B"), out("F"), out("C")]
        assert scored(texts, [sample] * 4)["accuracy"].tolist() == [0.0] * 4
        assert convert(sample).gt_letter is None
    # Today's rule took the first character: "F" of "From" scored this.
    assert scored([out("F")], [rec(TMCQ, OPEN_O3_GT)])["accuracy"].item() == 0.0
    assert scored([out("B")], [rec(TMCQ, OPEN_O3_GT)])["accuracy"].item() == 1.0


TQA_PREDICTIONS = [   # against ground truth [3, 7]
    ("From <t>3</t>s to <t>7</t>s.", 1.0), ("From <t>3</t>s to <t>7</t>s", 1.0),
    ("<t>3</t>s to <t>7</t>s", 1.0), ("from <t> 3.0 </t> s to <t> 7 </t> s.", 1.0),
    ("From <t>7</t>s to <t>3</t>s.", 1.0), ("From<t>3</t>s\nto\n<t>7</t>s", 1.0),
    ("[3, 7]", 1.0), (" [ 3.0 ,7 ] ", 1.0), ("From <t>3</t>s to <t>5</t>s.", 0.5),
    ("[5, 9]", 1 / 3), ("From <t>3</t>s until <t>7</t>s.", 0.0), ("From <t>3s</t> to <t>7s</t>", 0.0),
]


@pytest.mark.parametrize("gt", ["[3, 7]", "From <t>3</t>s to <t>7</t>s.", "<t>3.0</t>s to <t>7.0</t>s",
                                "[7.0, 3.0]"])
def test_temporal_qa_accuracy_on_from_and_bracket_forms(gt):
    sample = rec(TQA, gt)
    texts = [out(p) for p, _ in TQA_PREDICTIONS]
    got = scored(texts, [sample] * len(texts))["accuracy"].tolist()
    assert got == pytest.approx([v for _, v in TQA_PREDICTIONS], abs=1e-6)


# ---------------------------------------------------------------------------------------
# Records: gt_letter and the temporal-MCQ segment (the temporal reward's ground truth)
# ---------------------------------------------------------------------------------------

def test_temporal_mcq_record_letter_and_segment():
    for answer in (STGR_GT, OPEN_O3_GT, " b\n[7.0, 3.0]",
                   "From <t> 3 </t>s to <t>7</t>s\ncorrect option: (B)"):
        r = convert(rec(TMCQ, answer, key_frames=[{"idx": 0, "time": 1.0}]))
        assert (r.gt_letter, r.segments, r.gt_times) == ("B", [(3.0, 7.0)], [1.0, 3.0, 7.0]), answer
        # The segment reaches the temporal reward on both paths: 4 s lies inside [3, 7].
        text = out("Correct Option: B", think="at <t>4</t>s and <t>3.5</t>s")
        r = scored([text], [rec(TMCQ, answer)])
        assert (r["temporal"].item(), r["accuracy"].item()) == (1.0, 1.0), answer


# ---------------------------------------------------------------------------------------
# MCQ evaluation and prediction read "Correct Option:" answers
# ---------------------------------------------------------------------------------------

def test_mcq_eval_reads_correct_option_predictions(tmp_path):
    gt = tmp_path / "mcq.jsonl"
    gt.write_text("\n".join(json.dumps({"id": f"q{i}", "answer": a})
                            for i, a in enumerate(["B", "C", "A", "A"])) + "\n")
    pred = tmp_path / "p.jsonl"
    pred.write_text("\n".join(json.dumps(r) for r in [
        {"id": "q0", "output": "<think>x</think><answer>From <t>1</t>s to <t>2</t>s.\n"
                               "Correct Option: B</answer>"},                         # right
        {"id": "q1", "pred": "Correct Option: (c)"},                                  # right
        {"id": "q2", "output": "<answer>A\nCorrect Option: D</answer>"},              # wrong: D
        {"id": "q3", "pred": "A. because"},                                            # right
    ]) + "\n")
    m, _ = mcq.evaluate(gt, pred)
    assert m["acc"] == pytest.approx(75.0) and m["n_bad"] == 0


def test_predict_mcq_writes_the_correct_option_letter():
    from visioncoach import predict

    class Session:
        def generate(self, clip, text, vision):
            return "<think>x</think><answer>From <t>1</t>s to <t>2</t>s.\nCorrect Option: C</answer>", None, vision

    it = mcq.MCQItem("q1", "C", "(none)", "v.mp4", "Which?", ["A. a", "B. b", "C. c"])
    item = predict.Item("q1", "v.mp4", {"id": "q1"}, it)
    row, _ = predict.predict_mcq(Session(), SimpleNamespace(), item, None)
    assert row["pred"] == "C"


# ---------------------------------------------------------------------------------------
# Generated cases: reward == the letter / segment put in, and batched == reference
# ---------------------------------------------------------------------------------------

letter = st.sampled_from("ABCD")
seconds = st.sampled_from([0.0, 0.5, 1.0, 2.5, 3.0, 4.0, 7.25, 10.0])   # exact in float32
ws = st.sampled_from(["", " ", "  ", "\n", "\t"])


@st.composite
def segment_text(draw):
    """(a segment as the data writes it, its ordered ends)."""
    s, e = draw(seconds), draw(seconds)
    num = st.sampled_from(["{}", "{}", " {} "])
    a, b = draw(num).format(s), draw(num).format(e)
    unit = draw(st.sampled_from(["s", "", " s"]))
    text = draw(st.sampled_from([
        f"[{a}, {b}]", f"[{a},{b}]",
        f"From <t>{a}</t>{unit} to <t>{b}</t>{unit}", f"From <t>{a}</t>{unit} to <t>{b}</t>{unit}.",
        f"from <t>{a}</t>{unit}\nto <t>{b}</t>{unit}", f"<t>{a}</t>{unit} to <t>{b}</t>{unit}"]))
    return text, (min(s, e), max(s, e))


@st.composite
def letter_answer(draw):
    """(an MCQ answer, the letter it gives or None)."""
    x = draw(letter)
    shown = draw(st.sampled_from([x, x.lower()]))
    wrapped = draw(st.sampled_from(["{}", "({})", "[{}]", "{}.", "{})"])).format(shown)
    marker = draw(st.sampled_from(["Correct Option:", "correct option:", "CORRECT OPTION :",
                                   "Correct Option :"]))
    seg, _ = draw(segment_text())
    kind = draw(st.sampled_from(["open_o3", "open_o3", "stgr", "bad_marker", "no_letter"]))
    if kind == "open_o3":
        before = draw(st.sampled_from(["", seg + draw(st.sampled_from([".\n", "\n", " ", ". "])),
                                       "D\n"]))
        after = draw(st.sampled_from(["", "\n", " because", ". done"]))
        return f"{before}{marker}{draw(ws)}{wrapped}{after}", x
    if kind == "stgr":
        return f"{draw(ws)}{wrapped}{draw(st.sampled_from(['', chr(10) + seg, ' ' + seg]))}", x
    if kind == "bad_marker":
        return f"{draw(st.sampled_from(['', x + chr(10)]))}{marker}{draw(ws)}" \
               f"{draw(st.sampled_from(['', 'none', '7', 'Banana', seg]))}", None
    return draw(st.sampled_from([seg, "Answer: " + x, "the correct option is " + x])), None


@st.composite
def mcq_case(draw):
    task = draw(st.sampled_from([TMCQ, MCQ]))
    gt_text, gt_letter = draw(letter_answer().filter(lambda a: a[1] is not None))
    sample = rec(task, gt_text)
    answers = [draw(letter_answer()) for _ in range(draw(st.integers(1, 4)))]
    return sample, gt_letter, answers


@settings(max_examples=200, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(mcq_case())
def test_generated_mcq_answers_score_the_letter_put_in(case):
    sample, gt_letter, answers = case
    assert convert(sample).gt_letter == gt_letter
    texts = [out(a) for a, _ in answers]
    expected = [1.0 if x == gt_letter else 0.0 for _, x in answers]
    assert scored(texts, [sample] * len(texts))["accuracy"].tolist() == expected


@settings(max_examples=150, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(segment_text(), st.lists(segment_text(), min_size=1, max_size=4), st.sampled_from([TQA, TMCQ]))
def test_generated_segments_reach_accuracy_and_temporal_ground_truth(gt, preds, task):
    gt_text, gt_seg = gt
    answer = gt_text if task == TQA else f"C\n{gt_text}"
    sample = rec(task, answer)
    assert convert(sample).segments == [gt_seg]
    assert first_segment(gt_text) == gt_seg
    texts = [out(p, think=f"<t>{s}</t>s to <t>{e}</t>s") for p, (s, e) in preds]
    r = scored(texts, [sample] * len(texts))
    if task == TQA:
        assert r["accuracy"].tolist() == pytest.approx([segment_iou(s, gt_seg) for _, s in preds], abs=1e-6)
