"""Multiple-choice accuracy overall and per category; bad predictions; option formatting."""

import json
import re

import pytest

from visioncoach.eval import mcq
from visioncoach.eval.__main__ import main as eval_main
from visioncoach.eval.common import EvalInputError

QUESTIONS = [
    {"id": "q1", "video": "v1.mp4", "question": "Color?", "options": ["A. red", "B. blue"], "answer": "A",
     "category": "perception"},
    {"id": "q2", "video": "v1.mp4", "question": "Count?", "options": ["one", "two", "three"], "answer": "C. three",
     "category": "counting"},
    {"id": "q3", "video": "v2.mp4", "question": "Where?", "options": {"A": "left", "B": "right"}, "answer": "b",
     "category": "perception"},
    {"id": "q4", "video": "v2.mp4", "question": "Why?", "options": ["A cat", "B dog"], "answer": "B",
     "category": "reasoning"},
    {"video": "v3.mp4", "question": "Who?", "options": ["(A) me", "(B) you"], "answer": "A"},   # id "4"
]


@pytest.fixture()
def gt(tmp_path):
    path = tmp_path / "mcq.jsonl"
    path.write_text("\n".join(json.dumps(q) for q in QUESTIONS) + "\n")
    return path


def test_accuracy_overall_and_per_category(gt, tmp_path):
    pred = tmp_path / "p.jsonl"
    pred.write_text("\n".join([
        json.dumps({"id": "q1", "pred": "a"}),                                        # right (case)
        json.dumps({"id": "q2", "output": "<think>...</think><answer>(C) three</answer>"}),  # right
        json.dumps({"id": "q3", "pred": "A", "output": "ignored"}),                   # wrong
        json.dumps({"id": "q4", "pred": "Answer: B"}),                                 # no letter
        json.dumps({"id": 4, "pred": "A"}),                                            # right ("4")
        json.dumps({"id": "q9", "pred": "A"}),                                         # unknown id
        "{oops",
    ]) + "\n")
    m, problems = mcq.evaluate(gt, pred)
    assert m["n"] == 5 and m["n_bad"] == 1
    assert m["acc"] == pytest.approx(60.0)
    assert m["per_category"] == {"(none)": {"acc": 100.0, "n": 1}, "counting": {"acc": 100.0, "n": 1},
                                 "perception": {"acc": 50.0, "n": 2}, "reasoning": {"acc": 0.0, "n": 1}}
    assert m["bad"] == {"no letter": 1, "unknown id": 1, "not JSON": 1}
    assert any(msg.startswith(f"{pred}:7: not JSON") for msg in problems.messages)


def test_missing_and_failed_predictions(gt, tmp_path, capsys):
    pred = tmp_path / "p.jsonl"
    pred.write_text(json.dumps({"id": "q1", "error": "DecodeError: file not found"}) + "\n"
                    + json.dumps({"id": "q2", "pred": "C"}) + "\n")
    assert eval_main(["mcq", "--pred", str(pred), "--gt", str(gt)]) == 0
    m = json.loads((tmp_path / "p.metrics.json").read_text())
    assert m["acc"] == pytest.approx(20.0) and m["n_bad"] == 4
    assert m["bad"] == {"prediction failed": 1, "no prediction": 3}
    out = capsys.readouterr().out
    assert "overall" in out and "counting" in out


def test_option_lines_and_annotation_errors(tmp_path):
    assert mcq.option_lines(["red", "B) blue", "(C) green", "A cat"]) == ["A. red", "B) blue", "(C) green", "D. A cat"]
    assert mcq.option_lines({"A": " left ", "B": "right"}) == ["A. left", "B. right"]
    items = mcq.read_items(_gt(tmp_path, QUESTIONS), need_inputs=True)
    assert items[4].id == "4" and items[1].options == ["A. one", "B. two", "C. three"]
    bad = _gt(tmp_path, [QUESTIONS[0], dict(QUESTIONS[1], answer="three")])
    with pytest.raises(EvalInputError, match=rf"{re.escape(str(bad))}:2: 'answer' must be an option letter"):
        mcq.read_items(bad)
    dup = _gt(tmp_path, [QUESTIONS[0], QUESTIONS[0]])
    with pytest.raises(EvalInputError, match="id 'q1' already used on line 1"):
        mcq.read_items(dup)
    no_video = _gt(tmp_path, [dict(QUESTIONS[0], video=None)])
    mcq.read_items(no_video)                                   # metrics need no video
    with pytest.raises(EvalInputError, match=":1: 'video' and 'question' must be strings"):
        mcq.read_items(no_video, need_inputs=True)


def _gt(tmp_path, rows):
    path = tmp_path / f"gt{len(list(tmp_path.iterdir()))}.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path
