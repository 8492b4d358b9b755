"""Charades-STA metrics: hand-computed cases, the real test split with a constant predictor
(checked against an independent numpy computation), bad prediction lines, unreadable inputs."""

import json

import re

import numpy as np
import pytest

from visioncoach.eval import charades
from visioncoach.eval.__main__ import main as eval_main
from visioncoach.eval.common import EvalInputError
from shared_data import ANNOTATIONS  # noqa: E402

ANN_DIR = ANNOTATIONS
TEST_SPLIT = ANN_DIR / "charades_sta_test.txt"
DURATIONS = ANN_DIR / "charades_sta_test_durations.json"


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture()
def small(tmp_path):
    ann = tmp_path / "ann.txt"
    ann.write_text("v1 0 10##a person opens a door.\n"
                   "v1 5 15##a person sits.\n"
                   "v2 2 4##a person laughs.\n"
                   "v3 0 30##a person runs.\n"
                   "v3 0 10##a person stops.\n"
                   "v3 0 10##a person waves.\n")
    dur = tmp_path / "dur.json"
    dur.write_text(json.dumps({"v1": 40.0, "v2": 40.0, "v3": 20.0}))
    return ann, dur


def test_hand_computed_cases(small, tmp_path):
    ann, dur = small
    pred = _write_jsonl(tmp_path / "p.jsonl", [
        {"id": 0, "vid": "v1", "pred": [0, 10]},      # IoU 1
        {"id": 1, "vid": "v1", "pred": [20, 10]},     # ends reversed: [10, 20] -> 5 / 15
        # id 2 missing -> IoU 0
        {"id": 3, "vid": "v3", "pred": [0, 20]},      # 20 / 30; clamped GT [0, 20] -> 1
        {"id": 4, "vid": "v3", "pred": [0, 5]},       # exactly 0.5: counts for R@0.5
        {"id": 5, "vid": "v3", "pred": [0, 3]},       # exactly 0.3: counts for R@0.3
    ])
    m, problems = charades.evaluate(ann, pred)
    ious = [1, 1 / 3, 0, 2 / 3, 0.5, 0.3]
    assert m["n"] == 6 and m["n_bad"] == 1
    assert m["R@0.3"] == pytest.approx(100 * 5 / 6)
    assert m["R@0.5"] == pytest.approx(100 * 3 / 6)
    assert m["R@0.7"] == pytest.approx(100 * 1 / 6)
    assert m["mIoU"] == pytest.approx(100 * sum(ious) / 6)
    assert m["bad"] == {"no prediction": 1} and "id 2 (v2): no prediction" in problems.messages[0]

    m, _ = charades.evaluate(ann, pred, dur)       # v3's first end 30 -> 20
    assert m["end_clamped"] and m["R@0.7"] == pytest.approx(100 * 2 / 6)
    assert m["mIoU"] == pytest.approx(100 * (1 + 1 / 3 + 0 + 1 + 0.5 + 0.3) / 6)


def test_bad_lines_count_as_wrong_and_are_reported(small, tmp_path):
    ann, _ = small
    pred = tmp_path / "p.jsonl"
    pred.write_bytes(b"\n".join([
        b"not json at all",
        b"[1, 2]",
        b'{"id": 0, "vid": "v1", "pred": [NaN, 3]}',
        b'{"id": 1, "vid": "WRONG", "pred": [5, 15]}',
        b'{"id": 2, "vid": "v2", "error": "DecodeError: cannot decode"}',
        b'{"id": 17, "pred": [0, 1]}',
        b'{"vid": "v3", "pred": [0, 1]}',
        b'{"id": "3", "pred": [0, 30]}',                    # a string id is the same id
        b'{"id": 4.0, "pred": [0, 10], "vid": "v3"}',      # as is an integral float
        b'{"id": 5, "pred": null, "output": "no time here"}',
        b'{"id": 5, "output": "<think>x</think><answer><t>0</t>s to <t>10</t>s</answer>"}',   # supersedes
        b"\xff\xfe not utf-8",
        b'{"id": 0, "vid": "v1", "pred": [0, 10, 20]}',   # supersedes the NaN line, still bad
    ]) + b"\n")
    m, problems = charades.evaluate(ann, pred)
    assert m["n"] == 6 and m["n_bad"] == 3                     # ids 0, 1, 2
    assert m["mIoU"] == pytest.approx(100 * 3 / 6)             # ids 3, 4, 5 have IoU 1
    assert m["bad"] == {"not JSON": 1, "not a JSON object": 1, "bad segment": 1, "vid mismatch": 1,
                        "prediction failed": 1, "unknown id": 1, "no 'id'": 1, "not UTF-8": 1}
    for line, what in [(1, "not JSON"), (2, "not an object"), (4, "'WRONG' here"), (5, "prediction failed"),
                       (6, "id '17' is not a query index"), (7, "no usable 'id'"), (12, "not UTF-8"),
                       (13, "no [start, end]")]:
        assert any(msg.startswith(f"{pred}:{line}: ") and what in msg for msg in problems.messages), line


def test_real_test_split_constant_predictor(tmp_path):
    lines = [ln for ln in TEST_SPLIT.read_text().splitlines() if ln.strip()]
    assert len(lines) == 3720
    pred = _write_jsonl(tmp_path / "p.jsonl", [{"id": i, "vid": ln.split()[0], "pred": [0.0, 10.0]}
                                                 for i, ln in enumerate(lines)])
    # Independent computation: plain string splitting and numpy, no code under test.
    vids = [ln.split("##")[0].split()[0] for ln in lines]
    s = np.array([float(ln.split("##")[0].split()[1]) for ln in lines])
    e = np.array([float(ln.split("##")[0].split()[2]) for ln in lines])
    durations = json.loads(DURATIONS.read_text())
    dur = np.array([durations[v] for v in vids])
    assert len(set(vids)) == 1334 and int((e > dur).sum()) == 562

    def expected(end):
        inter = np.clip(np.minimum(end, 10.0) - np.maximum(s, 0.0), 0, None)
        iou = inter / ((end - s) + 10.0 - inter)
        return {"R@0.3": 100 * np.mean(iou >= 0.3), "R@0.5": 100 * np.mean(iou >= 0.5),
                "R@0.7": 100 * np.mean(iou >= 0.7), "mIoU": 100 * np.mean(iou)}

    for dur_path, end in [(None, e), (DURATIONS, np.maximum(s, np.minimum(e, dur)))]:
        m, problems = charades.evaluate(TEST_SPLIT, pred, dur_path)
        assert m["n"] == 3720 and m["n_bad"] == 0 and not problems
        for k, v in expected(end).items():
            assert m[k] == pytest.approx(v, abs=1e-9), k
    assert expected(e)["mIoU"] != pytest.approx(expected(np.minimum(e, dur))["mIoU"])


def test_cli_writes_json_and_table(small, tmp_path, capsys):
    ann, dur = small
    pred = _write_jsonl(tmp_path / "run.jsonl", [{"id": 0, "vid": "v1", "pred": [0, 10]}, "garbage"])
    assert eval_main(["charades", "--pred", str(pred), "--gt", str(ann), "--durations", str(dur)]) == 0
    out = json.loads((tmp_path / "run.metrics.json").read_text())
    assert set(out) >= {"R@0.3", "R@0.5", "R@0.7", "mIoU", "n", "n_bad"}
    assert out["n"] == 6 and out["n_bad"] == 5 and out["mIoU"] == pytest.approx(100 / 6)
    captured = capsys.readouterr()
    assert "R@0.3" in captured.out and f"{pred}:2: not JSON" in captured.err
    custom = tmp_path / "sub" / "m.json"
    assert eval_main(["charades", "--pred", str(pred), "--gt", str(ann), "--out", str(custom)]) == 0
    assert json.loads(custom.read_text())["n"] == 6


def test_unreadable_inputs_name_file_and_line(small, tmp_path, capsys):
    ann, _ = small
    broken = tmp_path / "broken.txt"
    broken.write_text("v1 0 10##ok\nv1 zero 10##bad start\n")
    with pytest.raises(EvalInputError, match=rf"{re.escape(str(broken))}:2: start and end must be numbers"):
        charades.read_annotations(broken)
    broken.write_text("v1 0 10 a person without separator\n")
    with pytest.raises(EvalInputError, match=rf"{re.escape(str(broken))}:1: expected 'VID start end##query'"):
        charades.read_annotations(broken)
    bad_dur = tmp_path / "dur.json"
    bad_dur.write_text('{"v1": 10,\n "v2": }')
    with pytest.raises(EvalInputError, match=rf"{re.escape(str(bad_dur))}:2:\d+: not valid JSON"):
        charades.read_durations(bad_dur)
    bad_dur.write_text('{"v1": 10}')
    with pytest.raises(EvalInputError, match="no duration for video 'v2'"):
        charades.evaluate(ann, tmp_path / "none.jsonl", bad_dur)
    assert eval_main(["charades", "--pred", str(tmp_path / "missing.jsonl"), "--gt", str(ann)]) == 2
    assert "missing.jsonl: file not found" in capsys.readouterr().err
