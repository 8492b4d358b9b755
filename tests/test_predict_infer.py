"""``visioncoach.predict`` and ``visioncoach.infer`` end to end with the tiny Qwen2.5-VL on
cup.mp4 (a saved checkpoint folder, as a user would pass it), resuming, failures recorded,
the predictions read back by the evaluator, and the contact sheet's boxes where the claims
put them."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visioncoach import predict
from visioncoach.eval.__main__ import main as eval_main
from visioncoach.grounding import Claim, parse
from visioncoach.infer import write_grounding
from visioncoach.utils.contact_sheet import draw_contact_sheet
from visioncoach.infer import main as infer_main
from visioncoach.predict import charades_items, claim_boxes_by_second, predict_charades, VideoFinder
from visioncoach.rollout import session as session_mod
from visioncoach.rollout.session import load_session
from visioncoach.predict import main as predict_main
from shared_data import VIDEOS  # noqa: E402

FAST = ["--nframes", "2", "--max-pixels", "3136", "--max-new-tokens", "6", "--device", "cpu", "--workers", "1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    from visioncoach.models.tiny import build_processor, build_tiny_model

    path = tmp_path_factory.mktemp("tiny_ckpt")
    build_tiny_model(seed=0).save_pretrained(path)
    build_processor(tokenizer, max_pixels=3136).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(checkpoint):
    """The checkpoint loaded once through the real loader (folder -> model + processor)."""
    session = load_session(checkpoint, device="cpu")
    assert session.eos_token_ids and session.model.training is False
    return session


@pytest.fixture(autouse=True)
def reuse_loaded_model(monkeypatch, checkpoint, loaded):
    """Every ``main`` in this module gets the module's loaded model (with its own options)
    instead of reading the 80 MB checkpoint again: ~3 s saved per call on a 2-core machine."""
    real = session_mod.load_session

    def cached(path, *, device="auto", dtype="auto", attn="auto", **options):
        if Path(path) != checkpoint or device != "cpu":
            return real(path, device=device, dtype=dtype, attn=attn, **options)
        return dataclasses.replace(loaded, **{k: v for k, v in options.items() if v is not None})

    monkeypatch.setattr(predict, "load_session", cached)      # predict's own reference
    monkeypatch.setattr(session_mod, "load_session", cached)  # infer and the judge import it lazily


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_predict_charades_resumes_and_records_failures(checkpoint, tmp_path, capsys):
    ann = tmp_path / "ann.txt"
    ann.write_text("cup 1.0 3.5##a hand holds a cup.\ncup 2.0 6.0##the cup turns.\nnothere 0 1##a missing video.\n")
    out = tmp_path / "pred.jsonl"
    args = ["--bench", "charades", "--model", str(checkpoint), "--videos", str(VIDEOS), "--ann", str(ann),
            "--out", str(out)] + FAST
    assert predict_main(args) == 0
    recs = _lines(out)
    assert [r["id"] for r in recs] == [0, 1, 2]
    for r in recs[:2]:
        assert r["vid"] == "cup" and isinstance(r["output"], str) and "error" not in r
        assert r["pred"] is None or (len(r["pred"]) == 2 and r["pred"][0] <= r["pred"][1])
    assert recs[2]["vid"] == "nothere" and "file not found" in recs[2]["error"]

    # The second query reused the first one's visual features: same text as a fresh run.
    session = predict.load_session(checkpoint, device="cpu", nframes=2, max_pixels=3136, max_new_tokens=6)
    item = charades_items(ann, VideoFinder(VIDEOS))[1]
    fresh, _ = predict_charades(session, session.decode(item.video), item, None)
    assert fresh == recs[1]

    assert predict_main(args) == 0                          # only the failed id is tried again
    assert [r["id"] for r in _lines(out)] == [0, 1, 2, 2]
    with out.open("ab") as f:                               # a run killed mid-line
        f.write(b'{"id": 0, "vid": "cu')
    assert predict_main(args) == 0
    assert [r["id"] for r in _lines(out)] == [0, 1, 2, 2, 2]
    assert "half-written last line" in capsys.readouterr().err

    metrics = tmp_path / "m.json"
    assert eval_main(["charades", "--pred", str(out), "--gt", str(ann), "--out", str(metrics)]) == 0
    m = json.loads(metrics.read_text())
    assert m["n"] == 3 and m["bad"]["prediction failed"] == 1 and m["n_bad"] >= 1


def test_predict_vstar_and_mcq(checkpoint, tmp_path):
    gt = tmp_path / "vstar.json"
    gt.write_text(json.dumps([{
        "vid": "cup", "question": "What does the hand hold?", "answer": "a dark cup", "timestamps": [1.0, 3.0],
        "temporal_question": "When is the cup turned?", "spatial_question": "Where is the cup?",
        "bboxes": [{"timestamp": 1, "frame_index": 27, "xmin": 250, "ymin": 100, "xmax": 400, "ymax": 420},
                   {"timestamp": 2, "frame_index": 54, "xmin": 240, "ymin": 90, "xmax": 390, "ymax": 410}],
        "width": 640, "height": 480, "fps": 26.8, "frame_count": 217, "domain": "life"}]))
    out = tmp_path / "vstar.jsonl"
    assert predict_main(["--bench", "vstar", "--model", str(checkpoint), "--videos", str(VIDEOS),
                         "--ann", str(gt), "--out", str(out)] + FAST) == 0
    [rec] = _lines(out)
    assert rec["id"] == 0 and rec["vid"] == "cup" and isinstance(rec["answer"], str)
    assert set(rec["outputs"]) == {"what", "when1", "where1", "where2", "when2"}
    for chain in ("chain1", "chain2"):
        assert isinstance(rec[chain]["boxes"], dict)
        assert rec[chain]["segment"] is None or len(rec[chain]["segment"]) == 2
    assert len(rec["frame_size"]) == 2
    assert eval_main(["vstar", "--pred", str(out), "--gt", str(gt), "--out", str(tmp_path / "v.json")]) == 0
    assert json.loads((tmp_path / "v.json").read_text())["n"] == 1

    ann = tmp_path / "mcq.jsonl"
    ann.write_text(json.dumps({"id": "q1", "video": "cup.mp4", "question": "What is held?",
                               "options": ["a cup", "a ball"], "answer": "A", "category": "objects"}) + "\n")
    out = tmp_path / "mcq_pred.jsonl"
    assert predict_main(["--bench", "mcq", "--model", str(checkpoint), "--videos", str(VIDEOS),
                         "--ann", str(ann), "--out", str(out)] + FAST) == 0
    [rec] = _lines(out)
    assert rec["id"] == "q1" and (rec["pred"] is None or rec["pred"] in "AB") and isinstance(rec["output"], str)
    assert eval_main(["mcq", "--pred", str(out), "--gt", str(ann), "--out", str(tmp_path / "q.json")]) == 0


def test_predict_input_errors(checkpoint, tmp_path, capsys):
    ann = tmp_path / "ann.txt"
    ann.write_text("cup 1.0##no end\n")
    args = ["--bench", "charades", "--model", str(checkpoint), "--videos", str(VIDEOS), "--ann", str(ann),
            "--out", str(tmp_path / "p.jsonl")]
    assert predict_main(args) == 2
    assert f"{ann}:1: expected 'VID start end##query'" in capsys.readouterr().err
    ann.write_text("cup 1.0 2.0##ok\n")
    assert predict_main(args[:3] + [str(tmp_path / "no_model")] + args[4:]) == 2
    assert "not a local checkpoint folder" in capsys.readouterr().err


def test_claim_boxes_by_second():
    claims = [Claim("cup", [(10, 10, 20, 20)], 1.4), Claim("cup", [(0, 0, 56, 42)], 1.6),
              Claim("hand", [(28, 21, 56, 42), (0, 0, 28, 21)], 2.0)]
    boxes = claim_boxes_by_second(claims, (56, 42), (640, 480))
    s = 640 / 56
    assert boxes == {"1": [[round(10 * s, 1), round(10 * s, 1), round(20 * s, 1), round(20 * s, 1)]],
                     "2": [[0.0, 0.0, 640.0, 480.0], [320.0, 240.0, 640.0, 480.0], [0.0, 0.0, 320.0, 240.0]]}


def test_infer_end_to_end(checkpoint, tmp_path, capsys):
    out = tmp_path / "infer"
    assert infer_main(["--model", str(checkpoint), "--video", str(VIDEOS / "cup.mp4"), "--question",
                       "What does the hand hold?", "--out", str(out), "--nframes", "3", "--max-pixels", "3136",
                       "--max-new-tokens", "6", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "Reasoning:" in printed and "Answer:" in printed
    with Image.open(out / "cup_grounding.png") as im:
        im.verify()
    with Image.open(out / "cup_grounding.png") as im:
        assert im.mode == "RGB" and im.width > 3 * 100
    doc = json.loads((out / "cup_grounding.json").read_text())
    assert len(doc["frames"]) == 3 and doc["video_size"] == [640, 480] and isinstance(doc["claims"], list)
    assert doc["question"] == "What does the hand hold?"


GRAY = 128
TEXT = ("<think>See <obj>ball</obj><box>[2, 3, 20, 25]</box> at <t>1.2</t>s, then <obj>Ball</obj>"
        "<box>[22, 5, 38, 28]</box> at <t>1.4</t>s, and <obj>box</obj><box>[5, 5, 30, 20]</box> at <t>0</t>s."
        "</think><answer>a ball</answer>")


def test_contact_sheet_boxes_land_where_claims_put_them(tmp_path):
    """Uniform gray 80x60 frames; the model saw them at 40x30 (boxes in those pixels)."""
    frames = np.full((3, 60, 80, 3), GRAY, np.uint8)
    times = [0.0, 1.0, 2.0]
    frame_size = (40, 30)
    doc = write_grounding(tmp_path, "gray", TEXT, frames, times, frame_size)
    sheet = draw_contact_sheet(frames, times, parse(TEXT).claims, frame_size)
    with Image.open(doc["files"]["contact_sheet"]) as im:
        img = np.asarray(im.convert("RGB")).astype(int)
    assert np.array_equal(img, np.asarray(sheet.image))

    def px(x, y):
        return tuple(img[y, x])

    for t in sheet.tiles:                       # frames are pasted where the tiles say
        assert px(t.x + t.width - 1, t.y + t.height - 1) == (GRAY,) * 3 and px(t.x - 1, t.y + 5) != (GRAY,) * 3
    ball, box = sheet.colors["ball"], sheet.colors["box"]
    assert ball != box
    assert [c["frame_index"] for c in doc["claims"]] == [1, 1, 0]
    assert doc["claims"][2]["boxes_video"] == [[10.0, 10.0, 60.0, 40.0]]

    def check(tile, b, color):
        sx, sy = tile.width / frame_size[0], tile.height / frame_size[1]
        x1, y1, x2, y2 = (round(tile.x + b[0] * sx), round(tile.y + b[1] * sy),
                          round(tile.x + b[2] * sx), round(tile.y + b[3] * sy))
        ym, xm = (y1 + y2) // 2, (x1 + x2) // 2
        for x, y in [(x1, ym), (x1 + 2, ym), (x2, ym), (x2 - 2, ym), (xm, y2), (xm, y2 - 2), (x2 - 3, y1)]:
            assert px(x, y) == color, (x, y)      # the 3-pixel outline, drawn inward
        for x, y in [(x1 - 1, ym), (x1 + 3, ym), (x2 + 1, ym), (xm, ym), (xm, y2 + 1)]:
            assert px(x, y) == (GRAY,) * 3, (x, y)
        return x1, ym

    t0, t1, t2 = sheet.tiles
    left_edge = check(t1, (2, 3, 20, 25), ball)
    check(t1, (22, 5, 38, 28), ball)            # "Ball" is the same object: same colour
    check(t0, (5, 5, 30, 20), box)
    for other in (t0, t2):                      # the ball claims are on frame 1 only
        assert px(other.x + left_edge[0] - t1.x, other.y + left_edge[1] - t1.y) == (GRAY,) * 3
    assert not (img[t2.y:t2.y + t2.height, t2.x:t2.x + t2.width] != GRAY).any()


def test_local_model_judge(checkpoint):
    from visioncoach.eval.judge import LocalModelJudge

    judge = LocalModelJudge(str(checkpoint), device="cpu", max_new_tokens=4)
    verdict = judge.score("What is held?", "a cup", "a cup")
    assert verdict.score in (0, 1, 2, 3) or (verdict.score is None and "no 0-3 score" in verdict.error)


def test_session_pixel_bounds_default_to_the_checkpoints(checkpoint):
    """The tiny checkpoint's processor was saved with max_pixels 3136: a session given no
    bounds preprocesses as trained; given ones win."""
    from visioncoach.rollout.session import load_session as real_load

    assert real_load(checkpoint, device="cpu").max_pixels == 3136
    assert real_load(checkpoint, device="cpu", max_pixels=12544).max_pixels == 12544
