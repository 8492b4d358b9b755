"""The published STGR format end to end, on the real videos: several sources in their own
folders, video records with normalized boxes in the reasoning and key-frame image files, an
image record with pixel boxes, records with nulls and an integer id, an invalid record; the
preview's exact targets and boxes (hand-computed); a short SFT run and inference on what it
wrote. Plus the pieces: the SFT target and box conversion, sources, the prompt budget."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from visioncoach.config import DataConfig, SourceConfig, load_config
from visioncoach.data.clip import read_image
from visioncoach.data.loader import ClipDataset, SampleFailure
from visioncoach.data.stgr import DatasetError, load_stgr
from visioncoach.data.decode import decode
from visioncoach.rewards.records import RewardTargets
from visioncoach.templates import boxes_to_pixels, sft_target
from shared_data import VIDEOS  # noqa: E402

CUP, BIKES = VIDEOS / "cup.mp4", VIDEOS / "bikes.mp4"
REASONING = ("The hand lifts <obj>cup</obj><box>[0.25, 0.3, 0.5, 0.75]</box>at<t>2.0</t>s and "
             "turns it: <obj>cup</obj><box>[0.3,0.3,0.55,0.8]</box>at<t>4.0</t>s.")


def _published(root: Path) -> Path:
    """A small dataset laid out as released: a folder per source, key-frame images apart."""
    (root / "plm" / "videos").mkdir(parents=True)
    (root / "plm" / "keyframes").mkdir()
    (root / "r1").mkdir()
    (root / "gqa").mkdir()
    shutil.copy(CUP, root / "plm" / "videos" / "cup.mp4")
    shutil.copy(BIKES, root / "r1" / "bikes.mp4")
    frame = decode(CUP, nframes=0, key_times=[2.0]).frames[0].numpy()          # 480 x 640
    Image.fromarray(frame).save(root / "plm" / "keyframes" / "cup_2s.png")
    Image.fromarray(frame).save(root / "gqa" / "cup.png")
    records = [
        {"id": 7, "source": "STR_plm_demo", "task": "temporal-spatial free-form QA", "video_path": "videos/cup.mp4",
         "image_path": None, "image_size": [], "question": "What does the hand do with the cup?",
         "answer": "It turns the cup.", "reasoning_process": REASONING,
         "key_frames": [{"idx": 0, "time": 2.0, "path": "cup_2s.png"}, {"idx": 1, "time": 4.0, "path": "gone.png"}],
         "key_items": {"0": {"cup": [[0.25, 0.3, 0.5, 0.75]], "hand": None},
                       "1": {"cup": [[0.3, 0.3, 0.55, 0.8], None]}}},
        {"id": "r1-0", "source": "videor1", "task": "temporal QA", "video_path": "bikes.mp4",
         "question": "When do the bikes pass?", "answer": "[2.0, 5.5]",
         "reasoning_process": "Bikes pass from <t>2.0</t>s to <t>5.5</t>s."},
        {"id": "gqa-0", "source": "gqa", "task": "visual QA", "image_path": "cup.png", "image_size": [640, 480],
         "question": "Where is the cup?", "answer": "[160, 120, 320, 360]",
         "reasoning_process": "The <obj>cup</obj><box>[160, 120, 320, 360]</box> is held in the middle."},
        {"id": "bad", "source": "videor1", "task": "no such task", "video_path": "bikes.mp4",
         "question": "?", "answer": "x", "reasoning_process": "x"},
    ]
    path = root / "stgr_sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


SOURCES = lambda root: [SourceConfig("STR_plm_*", str(root / "plm"), str(root / "plm" / "keyframes")),  # noqa: E731
                        SourceConfig("videor1", str(root / "r1")), SourceConfig("gqa", str(root / "gqa"))]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("stgr")
    return root, _published(root)


def test_every_valid_record_loads_and_the_invalid_one_is_counted(published):
    root, path = published
    ds = load_stgr(path, sft=True, sources=SOURCES(root))
    assert [r["id"] for r in ds.records] == ["7", "r1-0", "gqa-0"]          # int id -> str
    assert ds.skipped == [f"{path}:4: record 3: field 'task' must be one of "
                          + ds.skipped[0].split("must be one of ", 1)[1]]
    assert ds.records[0]["key_items"] == {"0": {"cup": [[0.25, 0.3, 0.5, 0.75]]}, "1": {"cup": [[0.3, 0.3, 0.55, 0.8]]}}
    assert "image_size" not in ds.records[0] and "image_path" not in ds.records[0]
    assert ds.media(0) == root / "plm" / "videos" / "cup.mp4" and ds.is_image(2)
    with pytest.raises(DatasetError, match="record 3: field 'task'"):
        load_stgr(path, sft=True, sources=SOURCES(root), strict=True)
    # A source with no entry and no fallback is an error naming it, before anything trains.
    with pytest.raises(DatasetError, match=r"source 'gqa' \(1 record\(s\)\) matches no data.sources entry"):
        load_stgr(path, sft=True, sources=SOURCES(root)[:2])
    assert len(load_stgr(path, root / "gqa", sft=True, sources=SOURCES(root)[:2])) == 3   # video_root fallback


def test_key_frames_come_from_their_images_and_image_records_are_one_image(published):
    root, path = published
    ds = load_stgr(path, sft=True, sources=SOURCES(root))
    clips = ClipDataset(ds, nframes=4, backend="pyav", targets=RewardTargets((3136, 12544)))
    s = clips[0]
    assert [k["from"] for k in s.meta["key_frames"]] == ["image", "decoded"]
    assert s.meta["key_frame_images"] == [str(root / "plm" / "keyframes" / "cup_2s.png")]
    key = s.is_key.nonzero().flatten().tolist()
    assert s.times[key].tolist() == [2.0, pytest.approx(4.0, abs=0.05)] and s.times.diff().min() >= 0
    img = read_image(root / "plm" / "keyframes" / "cup_2s.png", size=tuple(s.frames.shape[1:3]))
    assert torch.equal(s.frames[key[0]], img)
    g = clips[2]
    assert g.kind == "image" and g.frames.shape == (1, 480, 640, 3) and not g.is_key.any()
    assert g.reward_record.frame_size == (112.0, 84.0) and g.reward_record.gt_box == (28.0, 21.0, 56.0, 63.0)
    (root / "gqa" / "broken.png").write_bytes(b"not an image")
    ds.records[2] = {**ds.records[2], "image_path": "broken.png"}
    assert isinstance(clips[2], SampleFailure) and "not a readable image" in clips[2].reason


def test_boxes_to_pixels_hand_computed():
    assert boxes_to_pixels("<box>[0.25, 0.3, 0.5, 0.75]</box>", 112, 84) == "<box>[28,25,56,63]</box>"
    assert boxes_to_pixels("<box>[0.3,0.3,0.55,0.8]</box>", 112, 84) == "<box>[34,25,62,67]</box>"
    # half to even, as Python's round: 0.125 * 100 = 12.5 -> 12, 0.375 * 100 = 37.5 -> 38
    assert boxes_to_pixels("<box>[0.125,0.375,1,1]</box>", 100, 100) == "<box>[12,38,100,100]</box>"
    # bare lists only when asked; 2-number segments and malformed boxes stay as they are
    assert boxes_to_pixels("[160, 120, 320, 360] and [2.0, 5.5]", 0.175, 0.175) == "[160, 120, 320, 360] and [2.0, 5.5]"
    assert boxes_to_pixels("[160, 120, 320, 360] and [2.0, 5.5]", 0.175, 0.175, bare=True) == "[28,21,56,63] and [2.0, 5.5]"
    assert boxes_to_pixels("<box>[0.1, x, 0.2, 0.3]</box><box>[1,2,3]</box>", 10, 10) == \
        "<box>[0.1, x, 0.2, 0.3]</box><box>[1,2,3]</box>"


def test_sft_target_hand_computed():
    rec = {"video_path": "v.mp4", "reasoning_process": REASONING, "answer": "It turns the cup."}
    assert sft_target(rec, (112, 84)) == (
        "<think>The hand lifts <obj>cup</obj><box>[28,25,56,63]</box>at<t>2.0</t>s and turns it: "
        "<obj>cup</obj><box>[34,25,62,67]</box>at<t>4.0</t>s.</think>\n<answer>It turns the cup.</answer>")
    img = {"image_path": "c.png", "image_size": [640, 480], "answer": "[160, 120, 320, 360]",
           "reasoning_process": "The <obj>cup</obj><box>[160, 120, 320, 360]</box> is held."}
    assert sft_target(img, (112, 84)) == ("<think>The <obj>cup</obj><box>[28,21,56,63]</box> is held.</think>\n"
                                         "<answer>[28,21,56,63]</answer>")
    tagged = {"video_path": "v.mp4", "answer": "A", "reasoning_process": "<think>x</think><answer>A</answer>"}
    assert sft_target(tagged, (112, 84)) == tagged["reasoning_process"]          # kept as it is


def test_preview_shows_exact_targets_and_boxes(published, tmp_path):
    from visioncoach.data.preview import main as preview_main

    root, path = published
    args = ["--out", str(tmp_path), "--n", "3", "--stage", "sft", f"--data.dataset={path}", "--data.nframes=4",
            "--data.sources=" + json.dumps([vars(s) for s in SOURCES(root)]), "--data.num_workers=0"]
    assert preview_main(args) == 0
    lines = [json.loads(x) for x in (tmp_path / "preview.jsonl").read_text().splitlines()]
    cup, r1, gqa = lines
    assert cup["frame_size"] == [112, 84] and cup["skipped"] is None and cup["key_frames_from"] == ["image", "decoded"]
    assert cup["target"] == ("<think>The hand lifts <obj>cup</obj><box>[28,25,56,63]</box>at<t>2.0</t>s and turns it: "
                             "<obj>cup</obj><box>[34,25,62,67]</box>at<t>4.0</t>s.</think>\n"
                             "<answer>It turns the cup.</answer>")
    # The rewards' ground truth: x * W, y * H in float32 (records.convert), no rounding.
    assert cup["gt_boxes"] == {"2.0": {"cup": [[28.0, 25.200000762939453, 56.0, 63.0]]},
                               "4.0": {"cup": [[33.599998474121094, 25.200000762939453, 61.599998474121094, 67.19999694824219]]}}
    assert cup["prompt"].count("<|image_pad|>") == len(cup["frame_times"]) == 6 and "Frame 6 at" in cup["prompt"]
    assert cup["media"]["media"].endswith("plm/videos/cup.mp4")
    assert r1["frame_size"] == [168, 56] and r1["target"].endswith("<answer>[2.0, 5.5]</answer>")
    assert gqa["frame_size"] == [112, 84] and gqa["frame_times"] == [0.0] and "The video is" not in gqa["prompt"]
    assert gqa["target"] == ("<think>The <obj>cup</obj><box>[28,21,56,63]</box> is held in the middle.</think>\n"
                             "<answer>[28,21,56,63]</answer>")
    assert all((tmp_path / f"{i}.png").is_file() for i in range(3))


def test_prompt_budget_drops_uniform_frames_then_skips(published, tokenizer):
    from visioncoach.processor import fit_prompt_budget, prompt_token_count
    from visioncoach.templates import user_text

    root, path = published
    s = ClipDataset(load_stgr(path, sft=True, sources=SOURCES(root)), nframes=8, backend="pyav")[0]
    data = DataConfig(max_pixels=12544)
    q = user_text(s.record["question"], s.record["task"])
    full = prompt_token_count(s.frames.shape, s.times, s.duration, q, tokenizer, max_pixels=12544)
    assert fit_prompt_budget(s, tokenizer, DataConfig(max_pixels=12544, max_prompt_tokens=full)) is s
    small = fit_prompt_budget(s, tokenizer, DataConfig(max_pixels=12544, max_prompt_tokens=full - 1))
    assert small.frames.shape[0] == s.frames.shape[0] - 1 and small.meta["frames_dropped"] == 1
    assert torch.equal(small.frames[small.is_key], s.frames[s.is_key])               # key frames kept
    n = lambda x: prompt_token_count(x.frames.shape, x.times, x.duration, q, tokenizer, max_pixels=12544)  # noqa: E731
    budget = full - (full - n(small)) * (s.frames.shape[0] // 2 - 1)  # room for about half the frames
    half = fit_prompt_budget(s, tokenizer, DataConfig(max_pixels=12544, max_prompt_tokens=budget))
    assert 4 <= half.frames.shape[0] < small.frames.shape[0] and n(half) <= budget
    tighter = fit_prompt_budget(s, tokenizer, DataConfig(max_pixels=12544, max_prompt_tokens=n(half) - 1))
    assert tighter.frames.shape[0] < half.frames.shape[0]        # the most frames that fit were kept
    assert torch.equal(tighter.frames[tighter.is_key], s.frames[s.is_key])
    with pytest.raises(ValueError, match="even with 4 frames .data.min_frames=4."):
        fit_prompt_budget(s, tokenizer, DataConfig(max_pixels=12544, max_prompt_tokens=50, min_frames=4))
    with pytest.raises(ValueError, match="over data.max_prompt_tokens"):
        fit_prompt_budget(s, tokenizer, DataConfig(max_pixels=12544, max_prompt_tokens=full - 1, prompt_overflow="skip"))
    assert data.max_prompt_tokens == 16384


def test_sources_config_is_checked():
    with pytest.raises(Exception, match="data.sources"):
        load_config(["--data.sources=[{match: gqa, medai: /x}]"])
    with pytest.raises(Exception, match=r"data.sources\[0\].media"):
        load_config(["--data.sources=[{match: gqa}]"])


@pytest.mark.slow
def test_sft_on_published_data_then_infer_on_the_run_folder(published, tmp_path, monkeypatch, capsys):
    from visioncoach import infer, train

    root, path = published
    monkeypatch.setenv("VISIONCOACH_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    args = ["--stage=sft", f"--data.dataset={path}", "--data.sources=" + json.dumps([vars(s) for s in SOURCES(root)]),
            "--data.nframes=2", "--data.num_workers=0", "--optim.sft_steps=3", f"--output_dir={run}",
            "--log.progress=false"]
    assert train.main(args) == 0
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all(m["loss"] is not None for m in metrics)
    assert infer.main(["--model", str(run), "--video", str(CUP), "--question", "What is held?",
                       "--out", str(tmp_path / "out"), "--nframes", "2", "--max-new-tokens", "8",
                       "--device", "cpu"]) == 0
    assert (tmp_path / "out" / "cup_grounding.json").is_file()
