"""VP-Selector training (LoRA on the tiny Qwen2.5-VL, CPU), inference (``Selector``), the
label mapping, and the plug-and-play ``apply`` CLI."""

import json

import numpy as np
import pytest
import torch

from visioncoach.data import synthetic
from visioncoach.selector import LabelMapper, Selector, SelectorInput, map_label, selector_labels

SELECTOR_LABELS = selector_labels()
from visioncoach.selector.frames import key_frames_at

# The label is determined by the question (the video is irrelevant): one template per label.
TEMPLATES = {
    "api_prompt": "Which regions of the scene attract attention, considering lighting, texture and background {o}?",
    "circle": "Where exactly is the {o} located relative to the borders, the corners and the middle?",
    "darken": "What color, shape and size does the {o} have when you ignore everything around it?",
    "numpro": "At which frame number, counting from the first one, does the {o} start to move?",
    "raw": "Would you describe the overall mood of this clip as calm, busy, happy or sad {o}?",
}
OBJECTS = ["red square", "blue circle", "green square", "yellow circle"]


@pytest.mark.parametrize("text,label,mapped", [
    ("darken", "darken", True), ("Darken.", "darken", True), ("**circle**", "circle", True),
    ("  RAW!! ", "raw", True), ("API_PROMPT", "api_prompt", True), ("api prompt", "api_prompt", True),
    # The label must be the answer: a sentence that only mentions one is no choice.
    ("frame numbering", "numpro", True), ("I would use frame numbering here", "raw", False),
    ("The best is circle, not darken", "raw", False),
    ("numpro<|im_end|>", "numpro", True), ("darkn", "darken", True), ("heatmap", "api_prompt", True),
    ("draw", "raw", False), ("banana", "raw", False), ("", "raw", False), ("!!!", "raw", False),
])
def test_label_mapping_on_messy_strings(text, label, mapped):
    assert map_label(text) == (label, mapped)


def test_label_mapper_counts_unmapped():
    m = LabelMapper()
    assert [m(t) for t in ("circle", "???", "Numpro.", "xyz")] == ["circle", "raw", "numpro", "raw"]
    assert (m.total, m.unmapped) == (4, 2)
    assert map_label("nothing useful", ("circle", "darken")) == ("darken", False)   # no raw: last label


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """20 samples (4 per label) over 6 synthetic clips, trained through the CLI."""
    from visioncoach.selector import train

    root = tmp_path_factory.mktemp("selector")
    data = synthetic.ensure_synthetic(n=6, seed=0, cache=root / "cache")
    records = json.loads(data.read_text())
    samples = []
    for i in range(20):
        label, rec = SELECTOR_LABELS[i % 5], records[i % 6]
        samples.append({"id": f"s{i}", "video": str(data.parent / rec["video_path"]),
                        "question": TEMPLATES[label].format(o=OBJECTS[(i // 5) % 4]),
                        "key_times": [k["time"] for k in rec["key_frames"]], "key_objects": [],
                        "status": "labelled", "label": label})
    lines = [json.dumps(s) for s in samples]
    lines.insert(3, json.dumps({"id": "d", "video": "x.mp4", "question": "q", "key_times": [1.0],
                                "status": "dropped", "label": None}))       # dropped: not trained on
    lines.append('{"id": "cut", "vid')                                    # a partial line: skipped
    labels = root / "labels.jsonl"
    labels.write_text("\n".join(lines))
    out = root / "sel"
    # One intra-op thread: on a small shared CPU, OpenMP threads spinning against other
    # processes make each tiny-model step ~20x slower; one thread runs a step in ~0.1 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # Flags for the tiny random model (its logits are near uniform over 151,936 tokens, so it
    # learns slowly at the paper's lr): smaller batches, higher lr decayed linearly, small images.
    assert train.main(["--data", str(labels), "--out", str(out), "--epochs", "40", "--batch-size", "4",
                       "--lr", "6e-3", "--lr-schedule", "linear", "--min-pixels", "784",
                       "--max-pixels", "3136", "--max-side", "56", "--device", "cpu"]) == 0
    yield out, samples, records, data
    torch.set_num_threads(threads)


def _inputs(samples, max_side=56):
    return [SelectorInput(s["question"], key_frames_at(s["video"], s["key_times"], max_side=max_side)[0])
            for s in samples]


def test_training_reaches_90_percent(trained):
    out, samples, _, _ = trained
    meta = json.loads((out / "selector.json").read_text())
    assert meta["labels"] == list(SELECTOR_LABELS) and meta["train"]["samples"] == 20
    assert meta["train"]["skipped"] == 1 and meta["base_model"] == "tiny"
    assert (out / "adapter_model.safetensors").is_file()
    sel = Selector(out, device="cpu", batch_size=8)
    inputs = _inputs(samples)
    pred = sel.predict(inputs)
    acc = np.mean([p == s["label"] for p, s in zip(pred, samples)])
    assert acc >= 0.9, (acc, pred)
    # Batching (left padding) does not change the greedy prediction; mappings work too.
    one = Selector(out, device="cpu", batch_size=1)
    assert one.predict(inputs[:5]) == pred[:5]
    as_dicts = [{"question": x.question, "frames": x.frames.numpy(), "key_objects": []} for x in inputs[:3]]
    assert sel.predict(as_dicts) == pred[:3]


def test_selector_rejects_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="selector.json"):
        Selector(tmp_path)
    (tmp_path / "selector.json").write_text("{not json")
    with pytest.raises(ValueError, match="malformed"):
        Selector(tmp_path)
    meta = {"labels": list(SELECTOR_LABELS), "base_model": "tiny", "prompt_version": "old"}
    (tmp_path / "selector.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="prompt_version"):
        Selector(tmp_path)


def test_apply_writes_prompted_pngs(trained, tmp_path, capsys):
    from PIL import Image

    from visioncoach.selector import apply

    out, _, records, data = trained
    rec = records[0]
    times = [k["time"] for k in rec["key_frames"]]
    box = rec["key_items"][str(rec["key_frames"][0]["idx"])]
    name, (b,) = next(iter(box.items()))
    dest = tmp_path / "applied"
    assert apply.main(["--selector", str(out), "--video", str(data.parent / rec["video_path"]),
                       "--question", TEMPLATES["darken"].format(o="green square"), "--objects", name,
                       "--boxes", "0:" + ",".join(f"{v:.4f}" for v in b), "--key-times", *map(str, times),
                       "--out", str(dest), "--device", "cpu"]) == 0
    sel = json.loads((dest / "selection.json").read_text())
    assert sel["vp_type"] == "darken" and len(sel["frames"]) == 2
    assert sel["prompted_question"].startswith(sel["question"]) and "darkened" in sel["prompted_question"]
    raw, _ = key_frames_at(data.parent / rec["video_path"], times)
    pngs = [np.asarray(Image.open(dest / f)) for f in sel["frames"]]
    assert all(p.shape == tuple(raw.shape[1:]) and p.dtype == np.uint8 for p in pngs)
    assert pngs[0].mean() < raw[0].numpy().mean()            # outside the box is darkened
    assert np.array_equal(pngs[1], raw[1].numpy())           # the box was pinned to key frame 0
    capsys.readouterr()
    assert apply.main(["--selector", str(out), "--video", "v.mp4", "--question", "q", "--boxes", "1,2,3",
                       "--out", str(dest)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --boxes")
