"""The synthetic grounded-video dataset and the STGR reader."""

import json

import numpy as np
import pytest
import torch

from visioncoach.data import stgr, synthetic
from visioncoach.data.decode import decode
from visioncoach.rewards import RewardConfig, score


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return synthetic.ensure_synthetic(n=12, seed=0, cache=tmp_path_factory.mktemp("cache"))


def _packets(path):
    import av

    with av.open(str(path)) as c:
        return [bytes(p) for p in c.demux(video=0)]


def test_generator_is_deterministic(synth, tmp_path):
    """Same seed, same bytes: every clip's H.264 packets, not only one decoded clip (when
    FFmpeg converted the RGB frames, one or two clips in twelve came out different per run)."""
    again = synthetic.generate(tmp_path / "again", n=12, seed=0)
    assert json.loads(again.read_text()) == json.loads(synth.read_text())
    for i in range(12):
        name = f"videos/{i:05d}.mp4"
        assert _packets(synth.parent / name) == _packets(again.parent / name), name
    a = decode(synth.parent / "videos" / "00003.mp4", nframes=6)
    b = decode(again.parent / "videos" / "00003.mp4", nframes=6)
    assert torch.equal(a.frames, b.frames)
    other = synthetic.generate(tmp_path / "other", n=12, seed=1)
    assert json.loads(other.read_text()) != json.loads(synth.read_text())


def test_yuv_conversion_matches_what_decoders_assume():
    """``_yuv420p`` is BT.601 limited range: luma within 1 of swscale's (which rounds
    differently), and FFmpeg's YUV -> RGB brings a frame of 2 x 2 blocks back within 3 levels
    (chroma is one sample per block, so nothing is lost to subsampling but rounding)."""
    import av

    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (42, 56, 3), dtype=np.uint8)
    rgb = np.repeat(np.repeat(blocks, 2, 0), 2, 1)                       # [84, 112, 3]
    ours = synthetic._yuv420p(rgb)                                       # [126, 112]
    theirs = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(
        format="yuv420p").to_ndarray()
    assert ours.shape == theirs.shape == (126, 112)
    assert np.abs(ours[:84].astype(int) - theirs[:84]).max() <= 1
    back = av.VideoFrame.from_ndarray(ours, format="yuv420p").to_ndarray(format="rgb24")
    assert np.abs(back.astype(int) - rgb).max() <= 3
    with pytest.raises(ValueError, match="even frame size"):
        synthetic._yuv420p(rgb[:83])


def test_every_task_type_and_cache_reuse(synth):
    recs = json.loads(synth.read_text())
    assert {r["task"] for r in recs} == set(synthetic.TASKS)
    assert synthetic.ensure_synthetic(n=12, seed=0, cache=synth.parent.parent) == synth
    assert not list(synth.parent.parent.glob(".synthetic-*"))  # no half-written leftovers


def test_annotation_boxes_cover_the_shapes(synth):
    """A box drawn from the annotation covers the object's pixels in the decoded key frame."""
    ds = stgr.load_stgr(synth)
    for i, rec in enumerate(ds.records):
        times = [kf["time"] for kf in rec["key_frames"]]
        clip = decode(ds.video(i), nframes=2, key_times=times)
        keys = clip.frames[clip.is_key].numpy().astype(int)                 # [K, H, W, 3]
        for kf, frame in zip(rec["key_frames"], keys):
            objects = rec["key_items"][str(kf["idx"])]
            for name, boxes in objects.items():
                color = np.array(synthetic.COLORS[name.split()[0]])
                near = np.abs(frame - color).max(-1) < 40                   # the object's pixels
                x1, y1, x2, y2 = (np.array(boxes[0]) * [112, 84, 112, 84]).round().astype(int)
                inside = np.zeros_like(near)
                inside[y1:y2, x1:x2] = True
                # The object's colour never extends past its box (1 px of codec blur allowed);
                # the object drawn last (never occluded) fills most of it (a disc: pi/4).
                grown = np.zeros_like(near)
                grown[max(0, y1 - 1):y2 + 1, max(0, x1 - 1):x2 + 1] = True
                assert near[~grown].sum() == 0, (rec["id"], name)
                if name == list(objects)[-1]:
                    assert near[inside].sum() >= 0.6 * (x2 - x1) * (y2 - y1), (rec["id"], name)


def test_reference_reasoning_scores_full_rewards(synth):
    recs = json.loads(synth.read_text())
    for r in recs:
        r["frame_size"] = [synthetic.WIDTH, synthetic.HEIGHT]
    out = score([r["reasoning_process"] for r in recs], recs, RewardConfig(), progress=1.0)
    assert torch.equal(out["total"], torch.full((len(recs),), 4.0))


def test_load_stgr_reports_all_problems_with_lines(tmp_path, synth):
    recs = json.loads(synth.read_text())[:4]
    del recs[1]["question"]
    recs[2]["key_frames"] = [{"idx": "3", "time": 1.0}]
    recs[3]["id"] = recs[0]["id"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(recs, indent=1))
    with pytest.raises(stgr.DatasetError) as err:
        stgr.load_stgr(bad, synth.parent, strict=True)
    problems = err.value.problems
    assert len(problems) == 3
    lines = bad.read_text().splitlines()
    for p, fragment in zip(problems, ["'question' is required", "key_frames[0].idx", "duplicate id"]):
        assert fragment in p
        n = int(p.split(":")[1])
        assert lines[n - 1].strip() == "{"  # the line where that record starts
    # Not strict (the default): the invalid records are skipped and counted with file:line.
    ds = stgr.load_stgr(bad, synth.parent)
    assert [r["id"] for r in ds.records] == [recs[0]["id"]] and ds.skipped == problems
    # JSONL: the same, one record per line
    jl = tmp_path / "bad.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in recs) + "\n{broken\n")
    with pytest.raises(stgr.DatasetError, match=r"bad.jsonl:5: invalid JSON"):
        stgr.load_stgr(jl, synth.parent)


def test_missing_videos_are_counted_not_fatal(tmp_path, synth):
    recs = json.loads(synth.read_text())
    recs[0]["video_path"] = "videos/nope.mp4"
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs))
    ds = stgr.load_stgr(f, synth.parent)
    assert len(ds) == len(recs) - 1 and len(ds.missing_videos) == 1
    with pytest.raises(stgr.DatasetError, match="not found"):
        stgr.load_stgr(f, synth.parent, strict=True)
    with pytest.raises(stgr.DatasetError, match="'reasoning_process' is required"):
        json_no_sft = tmp_path / "nosft.json"
        json_no_sft.write_text(json.dumps([{k: v for k, v in recs[1].items() if k != "reasoning_process"}]))
        stgr.load_stgr(json_no_sft, synth.parent, sft=True)
    with pytest.raises(FileNotFoundError, match="data.dataset"):
        stgr.load_stgr(tmp_path / "absent.json")


def test_training_clips_come_from_data_synthetic_seed(tmp_path, monkeypatch):
    """``data.synthetic_seed`` picks the training clips (e.g. RL on clips its SFT never saw);
    -1 keeps the run's seed."""
    from visioncoach import config as C
    from visioncoach.train import prepare_dataset

    monkeypatch.setenv("VISIONCOACH_CACHE", str(tmp_path))
    other = prepare_dataset(C.load_config(["--seed=4", "--data.synthetic_seed=104",
                                           "--data.synthetic_samples=2"]), None)
    own = prepare_dataset(C.load_config(["--seed=4", "--data.synthetic_samples=2"]), None)
    assert other.path.parent.name == f"synthetic-v{synthetic.VERSION}-n2-s104"
    assert own.path.parent.name == f"synthetic-v{synthetic.VERSION}-n2-s4"
    assert other.records[0]["question"] != own.records[0]["question"] or \
        other.records[0]["key_frames"] != own.records[0]["key_frames"]
