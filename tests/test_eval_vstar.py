"""V-STAR metrics (Table 2 reproduced from its per-chain numbers, hand-computed items, bad
lines) and the answer judges (exact match; an OpenAI-compatible server on 127.0.0.1 with
retries and timeouts; the CLI)."""

import json
import math

import pytest

from chat_server import ChatServer
from visioncoach.eval import vstar
from visioncoach.eval.__main__ import main as eval_main
from visioncoach.eval.common import EvalInputError
from visioncoach.eval.judge import ExactMatchJudge, HttpJudge, normalize_answer, parse_score


def test_table2_visioncoach_row():
    """Paper Table 2, VisionCoach: Acc 61.1, tIoU 25.7 / 25.4, vIoU 27.2 / 5.3 -> mAM 34.3, mLGM 47.5."""
    m = vstar.summarize(0.611, {"chain1": (0.257, 0.272), "chain2": (0.254, 0.053)})
    assert round(m["mAM"], 1) == 34.3
    assert round(m["mLGM"], 1) == 47.5
    assert m["chain1"]["AM"] == pytest.approx(38.0) and m["chain2"]["AM"] == pytest.approx(30.6)


def test_other_table2_rows():
    """More rows of Table 2 (Qwen2.5-VL-7B, GPT-4o, Open-o3-video) through the same formulas."""
    for acc, t1, t2, v1, v2, mam, mlgm in [(33.5, 15.4, 13.8, 17.0, 2.5, 19.3, 22.4),
                                           (60.8, 16.7, 12.8, 6.5, 3.0, 26.8, 38.2),
                                           (60.2, 25.0, 24.5, 24.8, 5.9, 33.4, 46.0)]:
        m = vstar.summarize(acc / 100, {"chain1": (t1 / 100, v1 / 100), "chain2": (t2 / 100, v2 / 100)})
        assert abs(m["mAM"] - mam) <= 0.051 and abs(m["mLGM"] - mlgm) <= 0.051


def test_lgm_epsilon_and_domain():
    # The benchmark's formula without epsilon: log(0) for a perfect metric. With eps = 1e-6:
    assert vstar.log_geometric_mean(1.0, 1.0, 1.0) == pytest.approx(-math.log(1e-6))
    assert vstar.log_geometric_mean(0.0, 0.0, 0.0) == pytest.approx(-math.log(1 + 1e-6))
    x = (0.611, 0.257, 0.272)
    exact = -sum(math.log(1 - v) for v in x) / 3
    assert vstar.log_geometric_mean(*x) == pytest.approx(exact, rel=1e-5)
    with pytest.raises(ValueError, match="fractions, not percent"):
        vstar.log_geometric_mean(61.1, 0.2, 0.3)


GT = [
    {"vid": "a", "question": "What is held?", "answer": "a red cup", "timestamps": [2, 6],
     "bboxes": [{"timestamp": 2, "frame_index": 50, "xmin": 0, "ymin": 0, "xmax": 10, "ymax": 10},
                {"timestamp": 3, "frame_index": 75, "xmin": 0, "ymin": 0, "xmax": 10, "ymax": 10}],
     "width": 640, "height": 480, "fps": 25, "frame_count": 250, "domain": "life"},
    {"vid": "b", "question": "Who runs?", "answer": "the dog", "timestamps": [0, 4],
     "bboxes": [{"timestamp": 1, "frame_index": 25, "xmin": 5, "ymin": 5, "xmax": 15, "ymax": 15}],
     "width": 320, "height": 240, "fps": 25, "frame_count": 100, "domain": "sports"},
    {"vid": "c", "question": "What falls?", "answer": "a ball", "timestamps": [1, 2], "bboxes": [],
     "width": 320, "height": 240, "fps": 25, "frame_count": 100, "domain": "sports"},
]


@pytest.fixture()
def gt(tmp_path):
    path = tmp_path / "vstar.json"
    path.write_text(json.dumps(GT))
    return path


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_hand_computed_items_and_bad_lines(gt, tmp_path):
    pred = _write(tmp_path / "p.jsonl", [
        {"vid": "a", "answer": "A red cup.",                                   # exact judge: 3
         "chain1": {"segment": [2, 6], "boxes": {"2": [0, 0, 10, 10],          # IoU 1
                                                 "3.0": [[0, 0, 5, 10], [100, 100, 110, 110]]}},  # best 0.5
         "chain2": {"segment": [4, 8], "boxes": {}}},                          # tIoU 2 / 6
        '{"id": 1, "vid": "b", "judge_score": 2, "chain1": {"segment": [NaN, 3], "boxes": {"x": [1, 2, 3, 4]}}}',
        {"id": 7, "answer": "x"},                      # no such item
        {"vid": "zzz", "answer": "x"},                 # no such video
        "{broken",
        # item c: no prediction
    ])
    m, problems = vstar.evaluate(gt, pred, ExactMatchJudge())
    acc, t1, v1, t2, v2 = 2 / 3, 1 / 3, 0.75 / 3, (1 / 3) / 3, 0.0
    expected = vstar.summarize(acc, {"chain1": (t1, v1), "chain2": (t2, v2)})
    for key in ("acc", "mAM", "mLGM"):
        assert m[key] == pytest.approx(expected[key])
    for chain in ("chain1", "chain2"):
        for key in ("tIoU", "vIoU", "AM", "LGM"):
            assert m[chain][key] == pytest.approx(expected[chain][key])
    assert m["n"] == 3 and m["n_bad"] == 2 and m["n_judged"] == 1 and m["judge"] == "exact"
    assert m["bad"] == {"bad segment": 1, "bad boxes": 1, "unmatched line": 2, "not JSON": 1, "no prediction": 1}
    assert any(msg.startswith(f"{pred}:3: id 7 is not an item index") for msg in problems.messages)
    assert any(msg.startswith(f"{pred}:2: chain1.segment") for msg in problems.messages)


def test_visual_iou_follows_the_benchmark():
    gt_boxes = [(2.0, (0, 0, 10, 10)), (3.0, (0, 0, 10, 10))]
    assert vstar.visual_iou(gt_boxes, {}) == 0.0
    assert vstar.visual_iou([], {2.0: [(0, 0, 10, 10)]}) == 0.0          # no annotated box
    assert vstar.visual_iou(gt_boxes, {2.0005: [(0, 0, 10, 10)]}) == 0.5  # within 1 ms
    assert vstar.visual_iou(gt_boxes, {2.01: [(0, 0, 10, 10)]}) == 0.0    # another timestamp


def test_ground_truth_errors_name_item_and_field(tmp_path):
    path = tmp_path / "gt.json"
    bad = [dict(GT[0]), dict(GT[1], timestamps=[5, 1])]
    path.write_text(json.dumps(bad))
    with pytest.raises(EvalInputError, match=r"item 1 \(vid 'b'\): 'timestamps'"):
        vstar.read_ground_truth(path)
    path.write_text(json.dumps([dict(GT[0], bboxes=[{"timestamp": 1, "xmin": 0}])]))
    with pytest.raises(EvalInputError, match=r"item 0 .*bboxes\[0\]"):
        vstar.read_ground_truth(path)
    path.write_text("[\n{\"vid\": }")
    with pytest.raises(EvalInputError, match=r"gt.json:2:\d+: not valid JSON"):
        vstar.read_ground_truth(path)


def test_exact_match_judge_and_score_parsing():
    j = ExactMatchJudge()
    assert normalize_answer("  The Red, cup! ") == "red cup"
    assert j.score("q", "a red cup", "The red cup.") == (3, None)
    assert j.score("q", "a red cup", "a blue cup").score == 0
    assert j.score("q", "", "").score == 0
    assert [parse_score(s) for s in ["2", "Score: 3.", "10", "1.5", "none", " 0\n"]] == [2, 3, None, None, None, 0]


JUDGE_REPLY = ("ok", "Score: 2")


@pytest.fixture()
def server():
    s = ChatServer(default=JUDGE_REPLY)
    yield s
    s.close()


def test_http_judge_scores_retries_and_times_out(server):
    judge = HttpJudge(server.url, "judge-model", api_key="k", timeout=10, retries=1, backoff=0.01)
    assert judge.score("Q?", "a cup", "cup") == (2, None)
    path, headers, body = server.requests[-1]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer k"
    assert body["model"] == "judge-model" and body["temperature"] == 0
    assert "Ground-truth answer: a cup" in body["messages"][1]["content"]

    impatient = HttpJudge(server.url, "judge-model", timeout=0.3, retries=1, backoff=0.01)
    for action, attempts, reason in [(("status", 500), 2, "HTTP 500"), (("status", 400), 1, "HTTP 400"),
                                     (("sleep", 3.0, "Score: 2"), 2, "timed out")]:
        server.default, n0 = action, len(server.requests)
        verdict = (impatient if action[0] == "sleep" else judge).score("Q?", "a cup", "cup")
        assert verdict.score is None and reason in verdict.error, (action, verdict)
        assert len(server.requests) - n0 == attempts, action     # 400 is not retried

    closed = HttpJudge("http://127.0.0.1:9/v1", "m", timeout=0.3, retries=0)   # nothing listens
    verdict = closed.score("q", "a", "b")
    assert verdict.score is None and "127.0.0.1:9" in verdict.error


def test_cli_with_http_judge(server, gt, tmp_path, capsys):
    pred = _write(tmp_path / "p.jsonl", [
        {"id": 0, "vid": "a", "answer": "cup", "chain1": {"segment": [2, 6]}},
        {"id": 1, "vid": "b", "answer": "dog", "judge_score": 0},
        {"id": 2, "vid": "c", "answer": "ball"},
    ])
    out = tmp_path / "m.json"
    assert eval_main(["vstar", "--pred", str(pred), "--gt", str(gt), "--out", str(out), "--judge", "http",
                      "--judge-url", server.url, "--judge-model", "m", "--judge-timeout", "10",
                      "--judge-workers", "2"]) == 0
    m = json.loads(out.read_text())
    assert m["judge"] == "http" and m["n_judged"] == 2 and len(server.requests) == 2
    assert m["acc"] == pytest.approx(200 / 3)                     # two answers judged 2, one scored 0
    assert set(m) >= {"acc", "chain1", "chain2", "mAM", "mLGM"}
    assert set(m["chain1"]) == {"tIoU", "vIoU", "AM", "LGM"}
    assert m["chain1"]["tIoU"] == pytest.approx(100 / 3)
    assert "mLGM" in capsys.readouterr().out
    assert eval_main(["vstar", "--pred", str(pred), "--gt", str(gt), "--judge", "http"]) == 2
    assert "--judge-url" in capsys.readouterr().err

    server.default = ("status", 400)         # a judge that fails: wrong answers, not bad predictions
    m, _ = vstar.evaluate(gt, pred, HttpJudge(server.url, "m", retries=0))
    assert m["judge_failed"] == 2 and m["n_bad"] == 0 and m["acc"] == 0.0
    assert "HTTP 400" in capsys.readouterr().err
