"""The VP-Selector must not mislead (issue #14 items 9 and 10): ``selector.apply`` records what
it drew, RL counts and warns about selector outputs that name no label, the label mapper takes
only answers, the selector tools' errors name the flag or file to change, and a build whose
reasoners were all unreachable fails.

The selector here is an untrained LoRA adapter on the tiny model (no training: its outputs are
set per test through ``generate_texts`` where a particular choice is needed)."""

import json
import logging
import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from video_clips import write_clip
from visioncoach.config import ConfigError, VPConfig, load_config
from visioncoach.data import synthetic
from visioncoach.selector import apply, build, map_label, selector_labels
from visioncoach.selector import train as sel_train
from visioncoach.selector.model import LORA_TARGET_MODULES, Selector
from visioncoach.selector.templates import SELECTOR_PROMPT_VERSION
from visioncoach.trainer import rl

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def selector_dir(tmp_path_factory):
    """A saved selector (identity LoRA on the tiny model, base ``tiny``)."""
    from peft import LoraConfig, get_peft_model

    from visioncoach.selector.model import load_base

    out = tmp_path_factory.mktemp("sel") / "sel"
    model, _ = load_base("tiny", CPU, seed=0, min_pixels=784, max_pixels=3136)
    get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=LORA_TARGET_MODULES)).save_pretrained(out)
    (out / "selector.json").write_text(json.dumps({
        "labels": list(selector_labels()), "prompt_version": SELECTOR_PROMPT_VERSION, "base_model": "tiny",
        "tiny_seed": 0, "min_pixels": 784, "max_pixels": 3136, "max_side": 56, "max_new_tokens": 3}))
    return out


@pytest.fixture()
def moved(selector_dir, tmp_path):
    """The same selector, whose base model folder no longer exists."""
    import shutil

    sel = tmp_path / "moved"
    shutil.copytree(selector_dir, sel)
    meta = json.loads((sel / "selector.json").read_text())
    (sel / "selector.json").write_text(json.dumps({**meta, "base_model": str(tmp_path / "gone")}))
    return sel


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """2 s of mid grey at 10 fps (circles and darkening change it visibly)."""
    path = tmp_path_factory.mktemp("v") / "grey.mp4"
    return write_clip(path, 20, content=lambda i: np.full((48, 64, 3), 128, np.uint8))


def _answer(monkeypatch, text):
    monkeypatch.setattr(Selector, "generate_texts", lambda self, batch: [text] * len(batch))


def _apply(selector, video, out, *extra):
    return apply.main(["--selector", str(selector), "--video", str(video), "--question", "Where is the cup?",
                       "--key-times", "0.5", "1.5", "--device", "cpu", "--out", str(out), *extra])


def _one_error_line(capsys):
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out + err, err
    return lines[0]


# -- 1. apply records what was drawn -----------------------------------------------------------

def test_apply_records_what_was_drawn_not_what_was_selected(selector_dir, video, tmp_path, monkeypatch):
    from PIL import Image

    _answer(monkeypatch, "circle")
    assert _apply(selector_dir, video, tmp_path / "a") == 0              # no --boxes: nothing to circle
    sel = json.loads((tmp_path / "a" / "selection.json").read_text())
    assert sel["selected"] == "circle" and sel["selector_mapped"] is True
    assert sel["vp_type"] == "raw" and sel["vp_per_frame"] == ["raw", "raw"] and "--boxes" in sel["vp_note"]
    assert sel["prompted_question"] == sel["question"]                    # no hint about red circles
    raw = [np.asarray(Image.open(tmp_path / "a" / f)) for f in sel["frames"]]

    assert _apply(selector_dir, video, tmp_path / "b", "--boxes", "0:0.2,0.2,0.7,0.7") == 0
    sel = json.loads((tmp_path / "b" / "selection.json").read_text())
    assert sel["vp_type"] == "circle" and sel["vp_per_frame"] == ["circle", "raw"]
    assert "red circles" in sel["prompted_question"] and "[1]" in sel["vp_note"]
    got = [np.asarray(Image.open(tmp_path / "b" / f)) for f in sel["frames"]]
    assert not np.array_equal(got[0], raw[0]) and np.array_equal(got[1], raw[1])


def test_apply_records_an_unmapped_output_as_such(selector_dir, video, tmp_path, monkeypatch):
    _answer(monkeypatch, "<obj>green circle</obj>")
    assert _apply(selector_dir, video, tmp_path / "a", "--boxes", "0.2,0.2,0.7,0.7") == 0
    sel = json.loads((tmp_path / "a" / "selection.json").read_text())
    assert sel["selected"] == sel["vp_type"] == "raw" and sel["selector_mapped"] is False
    assert sel["prompted_question"] == sel["question"]


# -- 2. RL counts and warns about unmapped selector outputs ------------------------------------

@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    from visioncoach.data.loader import ClipDataset
    from visioncoach.data.stgr import load_stgr
    from visioncoach.rewards.records import RewardTargets

    data = load_stgr(synthetic.generate(tmp_path_factory.mktemp("syn"), n=8, seed=3), sft=False)
    clips = ClipDataset(data, nframes=2, backend="pyav", targets=RewardTargets((784, 3136)))
    return [clips[i] for i in range(len(clips))]


def test_rl_counts_unmapped_selector_outputs_and_warns(selector_dir, samples, monkeypatch, caplog):
    # A badly trained selector: 7 of 8 outputs name no label.
    outputs = ["Darken."] + ["<obj>green circle</"] * 7
    monkeypatch.setattr(Selector, "generate_texts", lambda self, batch: outputs[:len(batch)])
    with caplog.at_level(logging.INFO):
        chooser = rl.build_chooser(VPConfig(selector="model", selector_path=str(selector_dir)), 0, 0, CPU,
                                   have_heatmaps=False)
        picked = chooser.choose(0, samples[:8], [{}] * 8, {})
    assert picked == ["darken"] + ["raw"] * 7
    loaded = [r.getMessage() for r in caplog.records if "VP-Selector" in r.getMessage()]
    assert loaded and str(selector_dir) in loaded[0] and "base model tiny" in loaded[0] and "'numpro'" in loaded[0]
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "named no visual prompt" in r.getMessage()]
    assert len(warned) == 1 and "7 of its last 8" in warned[0].getMessage()
    # Per step, through RLRunner.step_metrics (the chooser's counts since the last step).
    runner = SimpleNamespace(chooser=chooser)
    m = rl.RLRunner.step_metrics(runner, [])
    assert (m["selector_outputs"], m["selector_unmapped"], m["selector_unrenderable"]) == (8, 7, 0)
    assert rl.RLRunner.step_metrics(runner, [])["selector_unmapped"] == 0
    # No selector metrics for the other modes.
    gating = rl.build_chooser(VPConfig(selector="gating"), 0, 0, CPU, have_heatmaps=False)
    assert "selector_unmapped" not in rl.RLRunner.step_metrics(SimpleNamespace(chooser=gating), [])


# -- 3. the label must be the answer -----------------------------------------------------------

@pytest.mark.parametrize("text,label", [
    ("Darken.", "darken"), ("**circle**", "circle"), ("api prompt", "api_prompt"), ("frame numbering", "numpro"),
    ("darkn", "darken"), ("Answer: circle", "circle"), ("**Answer:** darken", "darken"),
    ("The answer is numpro.", "numpro"), ("Answer:\ncircle", "circle"), ("circle\nbecause the cup is small", "circle"),
    ("<answer>darken</answer>", "darken"), ("`raw`", "raw"),
])
def test_answers_map(text, label):
    assert map_label(text) == (label, True)


@pytest.mark.parametrize("text", [
    "<obj>green circle</obj>", "<obj>green circle</", "I would use frame numbering here",
    "The best is circle, not darken", "circle or darken", "The cup is circled in red.", "green circle",
    "visual prompt", "Answer:", "circular",
])
def test_mentions_are_not_answers(text):
    assert map_label(text) == ("raw", False)


# -- 4. errors name the flag or file to change -------------------------------------------------

def silent_reasoner(name="silent"):
    """An ``import:`` reasoner factory (never asked anything here)."""
    return SimpleNamespace(name=name, complete=lambda request: "")


def failing_factory():
    raise RuntimeError("no GPU left")


def test_bad_reasoner_specs_are_named(tmp_path, capsys):
    data = synthetic.ensure_synthetic(n=2, seed=0, cache=tmp_path / "cache")
    base = ["--data", str(data), "--out", str(tmp_path / "l.jsonl"), "--no-progress"]
    spec = f"local:name=q,path={tmp_path / 'nowhere'}"
    assert build.main(base + ["--reasoner", spec]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: --reasoner {spec!r}: path={tmp_path / 'nowhere'}") and "model.path" not in line
    ok = "import:test_selector_reliability:silent_reasoner"
    assert build.main(base + ["--reasoner", ok, "--key-object-reasoner", "import:no_such_mod:f"]) == 2
    assert _one_error_line(capsys).startswith("error: --key-object-reasoner 'import:no_such_mod:f'")
    bad = "import:test_selector_reliability:failing_factory"
    assert build.main(base + ["--reasoner", bad]) == 2
    assert _one_error_line(capsys) == f"error: --reasoner {bad!r}: RuntimeError: no GPU left"


def test_moved_selector_base_model_is_named_and_can_be_overridden(moved, video, tmp_path, capsys, monkeypatch):
    assert _apply(moved, video, tmp_path / "a") == 2
    line = _one_error_line(capsys)
    assert str(moved / "selector.json") in line and str(tmp_path / "gone") in line
    assert "--base-model" in line and "model.path" not in line
    assert _apply(moved, video, tmp_path / "a", "--base-model", str(tmp_path / "elsewhere")) == 2
    assert _one_error_line(capsys).startswith(f"error: --base-model {tmp_path / 'elsewhere'}: ")
    _answer(monkeypatch, "numpro")
    assert _apply(moved, video, tmp_path / "a", "--base-model", "tiny") == 0
    assert json.loads((tmp_path / "a" / "selection.json").read_text())["vp_type"] == "numpro"
    # RL: the same, through the config.
    with pytest.raises(ConfigError, match=r"'vp.selector_path'.*base_model.*vp.selector_base_model"):
        rl.build_chooser(VPConfig(selector="model", selector_path=str(moved)), 0, 0, CPU, have_heatmaps=False)
    with pytest.raises(ConfigError, match="'vp.selector_base_model'"):
        rl.build_chooser(VPConfig(selector="model", selector_path=str(moved),
                                  selector_base_model=str(tmp_path / "elsewhere")), 0, 0, CPU, have_heatmaps=False)
    chooser = rl.build_chooser(VPConfig(selector="model", selector_path=str(moved), selector_base_model="tiny"),
                               0, 0, CPU, have_heatmaps=False)
    assert chooser.selector.base_model == "tiny"
    with pytest.raises(ConfigError, match="vp.selector_base_model"):       # unused by another selector
        load_config(["--vp.selector=gating", "--vp.selector_base_model=tiny"])


def test_train_without_labelled_samples_says_why(tmp_path, capsys):
    lines = [{"id": f"d{i}", "status": "dropped", "label": None} for i in range(2)]
    lines.append({"id": "s", "status": "skipped", "label": None, "reason": "bad video"})
    data = tmp_path / "labels.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert sel_train.main(["--data", str(data), "--out", str(tmp_path / "sel"), "--device", "cpu"]) == 2
    line = _one_error_line(capsys)
    assert "2 dropped by the build" in line and "1 skipped by the build" in line and "logged above" not in line


def test_apply_key_time_past_the_end_is_an_error(selector_dir, video, tmp_path, capsys):
    assert apply.main(["--selector", str(selector_dir), "--video", str(video), "--question", "q",
                       "--key-times", "0.5", "5", "--device", "cpu", "--out", str(tmp_path / "o")]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("error: --key-times 5: ") and "2.00 s long" in line


# -- 5. build: unreachable reasoners fail the run; help prints each default once ---------------

def test_build_fails_when_every_reasoner_is_unreachable(tmp_path, capsys):
    with socket.socket() as s:                      # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = synthetic.ensure_synthetic(n=2, seed=0, cache=tmp_path / "cache")
    out = tmp_path / "labels.jsonl"
    code = build.main(["--data", str(data), "--out", str(out), "--vp-types", "raw", "--no-progress",
                       "--reasoner", f"http:name=down,base_url=http://127.0.0.1:{port}/v1,model=m",
                       "--retries", "0", "--timeout", "2"])
    assert code != 0
    line = _one_error_line(capsys)
    assert line.startswith("error: nothing could be labelled") and "unreachable" in line and "2 sample" in line
    assert not out.exists() or out.read_text() == ""


@pytest.mark.parametrize("tool", [build, sel_train, apply])
def test_help_gives_each_default_once(tool):
    parser = tool.build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        text = formatter._get_help_string(action) if action.help else ""
        shown = text % {"default": action.default} if "%(default)" in text else text
        assert shown.lower().count("(default") <= 1 and "(default: None)" not in shown, (action.dest, shown)
