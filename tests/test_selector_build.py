"""VP-Selector pseudo-label construction (visioncoach.selector.build / scoring / frames):
the whole pipeline on synthetic records with a deterministic fake reasoner, resume, and the
scoring rules it rests on."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from visioncoach.vp import vp_types

VP_TYPES = vp_types()
from visioncoach.data import synthetic
from visioncoach.data.stgr import load_stgr
from visioncoach.selector.build import BuildOptions, read_done, run_build
from visioncoach.selector.frames import contact_sheet, resolve_vp_types
from visioncoach.selector.templates import key_object_prompt, option_letters, proxy_reasoner_prompt
from visioncoach.selector.reasoners import ReasonerRequest, ReasonerUnavailable
from visioncoach.selector.scoring import (SIM_JACCARD_MAX, SIM_SUBSTRING, derive_label,
                                          object_similarity, parse_key_objects, score_reply)

WRONG = {"temporal-spatial free-form QA": "Bananas are yellow.", "General video QA Free-form": "Nothing.",
         "temporal QA": "[100.0, 101.0]", "visual QA": "[0, 0, 5, 5]"}


def _correct(rec):
    if rec["task"] in ("General video QA MCQ", "temporal QA (MCQ)"):
        return rec["answer"][0]
    if rec["task"] == "visual QA":        # image pixels -> the 0-999 space reasoners answer in
        w, h = rec["image_size"]
        x1, y1, x2, y2 = json.loads(rec["answer"])
        return str([round(x1 / w * 999), round(y1 / h * 999), round(x2 / w * 999), round(y2 / h * 999)])
    return rec["answer"]


def _wrong(rec):
    if rec["task"] in ("General video QA MCQ", "temporal QA (MCQ)"):
        return "C" if rec["answer"][0] != "C" else "A"
    return WRONG[rec["task"]]


class FakeReasoner:
    """Answers from the record, as ``plan[id][vp]`` says: ``good`` (right answer, exact boxes
    and names), ``poor`` (right answer, boxes shifted by half their width, names with their
    words reversed), ``wrong`` (wrong answer, exact grounding), ``malformed``, ``down``."""

    def __init__(self, name, records, plan, extracted=None):
        self.name, self.plan, self.extracted = name, plan, extracted or {}
        self.records = {r["id"]: r for r in records}
        self.calls = Counter()
        self.images = {}

    def complete(self, req):
        rid = req.meta["id"]
        if req.meta["purpose"] == "key_objects":
            assert "[Question]" in req.prompt and not req.images
            names = self.extracted[rid]
            return json.dumps({"primary": names[0], "secondary": names[1:],
                               "used_object": {"primary": "no", "secondary": ["no"] * (len(names) - 1)}})
        vp = req.meta["vp_type"]
        self.calls[(rid, vp)] += 1
        self.images[(rid, vp)] = np.stack(req.images)
        mode = self.plan.get(rid, {}).get(vp, "poor")
        if mode == "down":
            raise ReasonerUnavailable(f"{self.name} is down")
        if mode == "malformed":
            return "Sure! I think the answer is B."
        rec = self.records[rid]
        claims = []
        for kf in rec["key_frames"]:
            for name, boxes in rec["key_items"][str(kf["idx"])].items():
                x1, y1, x2, y2 = boxes[0]
                if mode == "poor":
                    x1, x2 = x1 + (x2 - x1) / 2, x2 + (x2 - x1) / 2
                    name = " ".join(reversed(name.split()))
                box = [round(v * 999) for v in (x1, y1, x2, y2)]
                claims.append(f"<obj>{name}</obj><box>{box}</box>at<t>{kf['time']}</t>s")
        answer = _wrong(rec) if mode == "wrong" else _correct(rec)
        return "```json\n" + json.dumps({"reasoning": "I see " + " and ".join(claims) + ".",
                                         "answer": answer}) + "\n```"


# Expected labels over VP_TYPES = (api_prompt, circle, darken, numpro, raw); unplanned = poor.
PLAN_A = {
    "synthetic-00000": {"darken": "good"},                                   # -> darken
    "synthetic-00001": {"circle": "good", "darken": "wrong", "api_prompt": "wrong"},
    "synthetic-00003": {"numpro": "good"},                                   # no key objects
    "synthetic-00005": {"circle": "good", "darken": "good"},
}
PLAN_B = {
    # circle wrong for B, darken/api wrong for A: numpro and raw tie (both poor) -> numpro
    "synthetic-00001": {"circle": "wrong"},
    "synthetic-00002": {vp: "wrong" for vp in VP_TYPES},                     # -> dropped
    "synthetic-00003": {"numpro": "good"},
    "synthetic-00004": {vp: "malformed" for vp in ("api_prompt", "circle", "darken", "numpro")},
    "synthetic-00005": {"circle": "good"},                                   # darken poor for B
}
EXPECTED = {"synthetic-00000": "darken", "synthetic-00001": "numpro", "synthetic-00002": None,
            "synthetic-00003": "numpro", "synthetic-00004": "raw", "synthetic-00005": "circle"}


@pytest.fixture(scope="module")
def dataset_path(tmp_path_factory):
    src = synthetic.ensure_synthetic(n=6, seed=0, cache=tmp_path_factory.mktemp("cache"))
    records = json.loads(src.read_text())
    records[3]["key_items"] = {}            # no key objects: Figure 10 extraction is used
    path = src.parent / "stgr-selector.json"
    path.write_text(json.dumps(records))
    return path, json.loads(src.read_text())


def _heatmap(frames, question):
    return torch.full((frames.shape[0], 4, 4), 0.8)


def _reasoners(originals, plan_b=PLAN_B):
    extracted = {"synthetic-00003": list(originals[3]["key_items"][str(originals[3]["key_frames"][0]["idx"])])}
    return (FakeReasoner("A", originals, PLAN_A, extracted), FakeReasoner("B", originals, plan_b))


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_build_pipeline_labels_and_resume(dataset_path, tmp_path):
    path, originals = dataset_path
    ds = load_stgr(path)
    out = tmp_path / "labels.jsonl"
    opts = BuildOptions(vp_types=list(VP_TYPES), workers=2, progress=False)
    # Run 1: three samples; B is down for sample 1, which is then not written.
    plan_down = {**PLAN_B, "synthetic-00001": {"circle": "down"}}
    a, b = _reasoners(originals, plan_down)
    stats = run_build(ds, [a, b], out, opts, key_object_reasoner=a, heatmap_fn=_heatmap, limit=3)
    assert stats.failed == 1 and stats.labelled + stats.dropped == 2
    assert {x["id"] for x in _lines(out)} == {"synthetic-00000", "synthetic-00002"}
    # A crash mid-write leaves a partial last line: the next run cuts it off and resumes.
    with open(out, "a") as f:
        f.write('{"id": "synthetic-00004", "scores": {"ci')
    assert read_done(out) == {"synthetic-00000", "synthetic-00002"}
    a, b = _reasoners(originals)
    stats = run_build(ds, [a, b], out, opts, key_object_reasoner=a, heatmap_fn=_heatmap)
    assert stats.already_done == 2 and stats.failed == 0
    assert not any(rid in ("synthetic-00000", "synthetic-00002") for rid, _ in a.calls)  # not redone
    lines = _lines(out)
    assert sorted(x["id"] for x in lines) == sorted(EXPECTED)
    got = {x["id"]: x["label"] for x in lines}
    assert got == EXPECTED
    assert stats.malformed_replies == 4 and stats.dropped == 0 and stats.key_objects_extracted == 1
    meta = json.loads((tmp_path / "labels.jsonl.meta.json").read_text())
    assert meta["counts"]["dropped"] == 1 and meta["counts"]["labelled"] == 5
    assert meta["counts"]["labels"] == {"darken": 1, "numpro": 2, "raw": 1, "circle": 1}

    by_id = {x["id"]: x for x in lines}
    dropped = by_id["synthetic-00002"]
    assert dropped["status"] == "dropped" and not any(s["all_correct"] for s in dropped["summary"].values())
    s0 = by_id["synthetic-00000"]["scores"]
    assert s0["darken"]["A"]["iou"] == pytest.approx(1.0, abs=0.02) and s0["darken"]["A"]["object"] == 1.0
    assert s0["circle"]["A"]["iou"] == pytest.approx(1 / 3, abs=0.03)
    assert s0["circle"]["A"]["object"] == pytest.approx(SIM_JACCARD_MAX)
    # Labels re-derive from the stored scores.
    for x in lines:
        assert derive_label(x["scores"], list(VP_TYPES), ["A", "B"])[0] == x["label"]
    s3 = by_id["synthetic-00003"]
    assert s3["key_objects_source"] == "extracted" and s3["key_objects"]
    assert s3["scores"]["numpro"]["A"]["iou"] == 0.0          # no annotated boxes to compare with
    assert by_id["synthetic-00004"]["scores"]["circle"]["B"]["error"]
    # What the reasoners saw differs by VP type, as rendered.
    raw, dark = a.images[("synthetic-00004", "raw")], a.images[("synthetic-00004", "darken")]
    circ = a.images[("synthetic-00004", "circle")]
    assert raw.shape == dark.shape and dark.mean() < raw.mean()
    assert ((circ == [255, 0, 0]).all(-1).sum() > (raw == [255, 0, 0]).all(-1).sum())
    assert not np.array_equal(a.images[("synthetic-00004", "api_prompt")], raw)
    assert not np.array_equal(a.images[("synthetic-00004", "numpro")], raw)
    # A finished build has nothing left to do; changing the candidate set is refused.
    assert run_build(ds, [a, b], out, opts, key_object_reasoner=a, heatmap_fn=_heatmap).labelled == 0
    with pytest.raises(ValueError, match="--vp-types"):
        run_build(ds, [a, b], out, BuildOptions(vp_types=["raw"], progress=False))


def test_bad_record_is_skipped_and_written(dataset_path, tmp_path):
    path, originals = dataset_path
    records = json.loads(path.read_text())[:2]
    records[1]["video_path"] = "broken.mp4"
    (path.parent / "broken.mp4").write_bytes(b"not a video")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    ds = load_stgr(bad, path.parent)
    a, b = _reasoners(originals)
    out = tmp_path / "out.jsonl"
    stats = run_build(ds, [a, b], out, BuildOptions(vp_types=["raw"], progress=False, workers=1))
    assert stats.skipped == 1 and stats.labelled == 1
    skipped = [x for x in _lines(out) if x["status"] == "skipped"]
    assert len(skipped) == 1 and "broken.mp4" in skipped[0]["reason"]


def test_object_similarity_levels():
    assert object_similarity("Red  Ball", "red ball") == 1.0
    assert object_similarity("man", "old man") == SIM_SUBSTRING
    fuzzy = object_similarity("t-shirt", "tshirt")
    assert 0.64 <= fuzzy < 0.8
    assert object_similarity("ball red", "red ball") == pytest.approx(SIM_JACCARD_MAX)
    assert object_similarity("red car", "blue car") == pytest.approx(SIM_JACCARD_MAX / 3)
    assert object_similarity("dog", "table") == 0.0 and object_similarity("", "dog") == 0.0


def test_score_reply_malformed_and_mcq():
    rec = {"id": "x", "task": "General video QA MCQ", "answer": "B", "question": "q A. a B. b"}
    kt, kb, ko = [1.0], [[(0.1, 0.1, 0.5, 0.5)]], ["cup"]
    for bad in ("B", "", "{not json", json.dumps({"reasoning": "r"}), json.dumps([1, 2]), None):
        s = score_reply(bad, rec, kt, kb, ko)
        assert not s.correct and s.iou == 0 and s.object == 0 and s.error
    good = json.dumps({"reasoning": "<obj>cup</obj><box>[100, 100, 500, 500]</box>at<t>1.4</t>s", "answer": "B."})
    s = score_reply("Here you go: " + good + " done", rec, kt, kb, ko)
    assert s.correct and s.iou == pytest.approx(1.0, abs=0.01) and s.object == 1.0 and s.n_claims == 1
    late = good.replace("1.4", "2.5")                          # beyond tau = 1 s of the key frame
    assert score_reply(late, rec, kt, kb, ko).iou == 0.0 and score_reply(late, rec, kt, kb, ko).object == 1.0
    assert not score_reply(good.replace('"B."', '"A"'), rec, kt, kb, ko).correct
    free = {"id": "y", "task": "General video QA Free-form", "answer": "The man opens the door.", "question": "q"}
    ok = json.dumps({"reasoning": "", "answer": "The man opens the door"})
    assert score_reply(ok, free, kt, kb, ko).correct
    assert not score_reply(ok, free, kt, kb, ko, rouge_threshold=1.01).correct


def test_prompts_and_key_object_parsing():
    p = proxy_reasoner_prompt("What color? A. red B. blue C. green", "General video QA MCQ", 3)
    assert "3 options (A, B, C)" in p and "<obj>OBJECT</obj><box>[x1, y1, x2, y2]</box>at<t>TIME</t>s" in p
    assert "Use integer box coordinates in [0, 999]." in p and p.endswith("C. green")
    assert option_letters("no options here") == list("ABCDE")
    assert "An open-ended question" in proxy_reasoner_prompt("Why?", "General video QA Free-form", 2)
    assert "[Extracted objects]\n(none)" in key_object_prompt("Q?", "A.")
    assert parse_key_objects('{"primary": "cup", "secondary": ["table", "man", "dog"]}') == ["cup", "table", "man"]
    assert parse_key_objects('{"primary": "NONE", "secondary": []}') == []
    assert parse_key_objects("no json") is None


def test_vp_type_resolution_and_contact_sheet():
    assert resolve_vp_types(None, have_heatmaps=False) == ["circle", "darken", "numpro", "raw"]
    assert resolve_vp_types(None, have_heatmaps=True) == list(VP_TYPES)
    with pytest.raises(ValueError, match="--clip-path"):
        resolve_vp_types(["api_prompt", "raw"], have_heatmaps=False)
    with pytest.raises(ValueError, match="unknown"):
        resolve_vp_types(["blur"], have_heatmaps=True)
    frames = torch.arange(5 * 4 * 6 * 3, dtype=torch.int64).remainder(256).to(torch.uint8).view(5, 4, 6, 3)
    sheet = contact_sheet(frames, gap=2)                       # 3 columns, 2 rows
    assert sheet.shape == (4 * 2 + 2, 6 * 3 + 2 * 2, 3)
    assert np.array_equal(sheet[:4, :6], frames[0].numpy())
    assert np.array_equal(sheet[6:10, 8:14], frames[4].numpy())


def test_local_vlm_reasoner_reply_is_scored_not_raised():
    """The local back-end runs the tiny random model through build_policy / build_inputs /
    generate_group; its gibberish is a malformed (wrong) reply, not an error."""
    from visioncoach.selector.reasoners import reasoner_from_spec

    threads = torch.get_num_threads()
    torch.set_num_threads(1)                  # tiny ops: spinning OpenMP threads only slow them
    try:
        r = reasoner_from_spec("local:name=tiny,device=cpu,max_new_tokens=6,max_pixels=3136")
        frames = [np.full((56, 84, 3), 90, np.uint8), np.full((56, 84, 3), 160, np.uint8)]
        reply = r.complete(ReasonerRequest("Question?", frames, [0.5, 1.5], ["Key frame 1:", "Key frame 2:"]))
        text_only = r.complete(ReasonerRequest(key_object_prompt("Q?", "A.")))
    finally:
        torch.set_num_threads(threads)
    assert isinstance(reply, str) and isinstance(text_only, str)
    s = score_reply(reply, {"id": "x", "task": "General video QA MCQ", "answer": "A", "question": "q"},
                    [0.5], [[(0, 0, 1, 1)]], ["cup"])
    assert not s.correct and s.error
