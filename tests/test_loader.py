"""Decoding DataLoader: bad samples counted and skipped, deterministic sharding."""

import json

import pytest

from visioncoach.data import loader as L
from visioncoach.data import stgr, synthetic


@pytest.fixture(scope="module")
def data_with_bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("d")
    path = synthetic.generate(root, n=8, seed=3)
    recs = json.loads(path.read_text())
    (root / "videos" / "00002.mp4").write_bytes(b"\x00" * 500)      # corrupt
    (root / "videos" / "00005.mp4").write_bytes(b"garbage" * 10)    # not a video
    return stgr.load_stgr(path), {recs[2]["id"], recs[5]["id"]}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_are_skipped_and_counted(data_with_bad_files, num_workers):
    data, bad_ids = data_with_bad_files
    ds = L.ClipDataset(data, nframes=4, backend="pyav")
    loader = L.make_loader(ds, batch_size=3, shuffle=False, num_workers=num_workers)
    counter = L.FailureCounter()
    seen = []
    for batch in loader:
        for s in L.split_failures(batch, counter):
            assert s.frames.shape[1:] == (84, 112, 3) and len(s.frames) >= 4
            seen.append(s.record["id"])
    assert counter.total == 2 and {f.id for f in counter.first} == bad_ids
    assert len(seen) == 6 and not bad_ids & set(seen)
    assert "2 sample(s) skipped" in counter.summary()


def test_sharding_is_disjoint_complete_and_deterministic():
    shards = [list(L.ShardSampler(10, r, 3, shuffle=True, seed=7)) for r in range(3)]
    assert all(len(s) == 4 for s in shards)              # padded so every rank steps together
    assert set().union(*map(set, shards)) == set(range(10))
    assert shards == [list(L.ShardSampler(10, r, 3, shuffle=True, seed=7)) for r in range(3)]
    s = L.ShardSampler(10, 0, 3, shuffle=True, seed=7)
    s.set_epoch(1)
    assert list(s) != shards[0]
    with pytest.raises(ValueError):
        L.ShardSampler(10, 3, 3)


def test_reward_record_is_converted_once_for_the_model_frame_size(data_with_bad_files):
    from visioncoach.processor import build_inputs, smart_resize
    from visioncoach.rewards import convert
    from visioncoach.rewards.records import RewardTargets

    data, _ = data_with_bad_files
    budget = (28 * 28 * 4, 28 * 28 * 6)          # forces a resize of the 112 x 84 frames
    s = L.ClipDataset(data, nframes=4, backend="pyav", targets=RewardTargets(budget))[0]
    h, w = smart_resize(84, 112, *budget)
    assert (w, h) != (112, 84)
    assert s.reward_record == convert({**s.record, "frame_size": [w, h]}, 0)
    assert s.reward_record.frames, "the synthetic record has annotated key frames"
    # The frame size is the one the processor gives the model.
    from visioncoach.models.tokenizer import qwen25_tokenizer
    inputs = build_inputs(s.frames, s.times, s.duration, "q", qwen25_tokenizer(),
                          min_pixels=budget[0], max_pixels=budget[1])
    assert tuple(inputs.frame_size) == (w, h)
    assert L.ClipDataset(data, nframes=4, backend="pyav")[0].reward_record is None
