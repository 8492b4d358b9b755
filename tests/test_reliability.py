"""No bad sample or config value loses a run (issue #14 items 2, 3, 9): every value that used to
pass validation and fail later is rejected up front naming its key; a run over a dataset of
bad samples completes with each one counted by reason; user mistakes in infer are one line."""

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest

from visioncoach import config as C
from visioncoach import train
from visioncoach.data.synthetic import generate



@pytest.fixture
def no_model(monkeypatch):
    import visioncoach.models.policy as policy

    monkeypatch.setattr(policy, "build_policy", lambda *a, **k: pytest.fail("model built despite a config error"))


@pytest.mark.parametrize("arg, key", [
    ("--data.num_workers=-3", "data.num_workers"),
    ("--rollout.prompts_per_step=0", "rollout.prompts_per_step"),
    ("--optim.sft_lr=inf", "optim.sft_lr"),
    ("--optim.lr=inf", "optim.lr"),
    ("--vp.hard_threshold=nan", "vp.hard_threshold"),
    ("--optim.eps=-1", "optim.eps"),
    ("--optim.weight_decay=-5", "optim.weight_decay"),
    ("--dist.timeout_s=0", "dist.timeout_s"),
    ("--data.max_pixels=0", "data.max_pixels"),
    ("--optim.sft_steps=-7", "optim.sft_steps"),
    ("--optim.rl_steps=0", "optim.rl_steps"),
    ("--output_dir=", "output_dir"),
    ("--model.lora.dropout=1.5", "model.lora.dropout"),
    ("--vp.selector=model", "vp.selector_path"),
])
def test_bad_values_are_config_errors_before_any_model(arg, key, no_model, capsys):
    assert train.main([arg]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and f"'{key}'" in err, err


def test_paths_that_do_not_exist_are_config_errors_before_any_model(tmp_path, no_model, capsys):
    for arg, key in ((f"--data.dataset={tmp_path / 'none.json'}", "data.dataset"),
                     (f"--log.resume={tmp_path / 'no-ckpt'}", "log.resume"),
                     (f"--vp.selector_path={tmp_path}", "vp.selector_path"),      # no selector.json in it
                     (f"--vp.clip_path={tmp_path / 'clip'}", "vp.clip_path"),
                     ("--data.sources=[{match: gqa, media: /no/such/folder}]", "data.sources[0].media")):
        extra = ["--vp.selector=model"] if key == "vp.selector_path" else []
        assert train.main([arg, *extra]) == 2, arg
        err = capsys.readouterr().err
        assert "config error" in err and f"'{key}'" in err and "not found" in err, err


def test_duplicate_yaml_keys_are_an_error_naming_both_lines(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 1.0e-5\n  sft_lr: 2.0e-5\n  lr: 3.0e-5\n")
    with pytest.raises(C.ConfigError, match=r"c.yaml:4: key 'optim.lr' is given twice \(first at line 2\)"):
        C.load_config(["--config", str(f)])
    f.write_text("data:\n  sources:\n    - {match: a, media: /x, media: /y}\n")
    with pytest.raises(C.ConfigError, match=r"'data.sources\[0\].media' is given twice"):
        C.load_config(["--config", str(f)])


def test_non_finite_numbers_are_rejected_in_files_too(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("loss:\n  beta: .nan\n")
    with pytest.raises(C.ConfigError, match=r"'loss.beta' .*c.yaml:2.*finite"):
        C.load_config(["--config", str(f)])


def _bad_dataset(tmp_path) -> tuple[Path, dict]:
    """Synthetic records plus every bad sample of issue #14: an undecodable first record, a
    4 x 1000 px video, a key-frame time of 1e20, a missing video."""
    sys.path.insert(0, str(Path(__file__).parent))
    from video_clips import write_clip

    path = generate(tmp_path / "syn", n=3, seed=11)
    recs = json.loads(path.read_text())
    videos = path.parent / "videos"
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    write_clip(videos / "thin.mp4", 12, size=(4, 1000))
    base = {k: v for k, v in recs[0].items() if k not in ("key_frames", "key_items", "segments")}
    bad = [{**base, "id": "broken", "video_path": "videos/broken.mp4"},
           {**base, "id": "thin", "video_path": "videos/thin.mp4"},
           {**recs[1], "id": "far", "key_frames": [{"idx": 0, "time": 1e20}], "key_items": {}},
           {**base, "id": "missing", "video_path": "videos/missing.mp4"}]
    path.write_text(json.dumps(bad[:1] + recs + bad[1:], indent=1))
    return path, {r["id"]: r for r in bad}


def test_a_run_over_every_bad_sample_completes_and_counts_each(tmp_path, monkeypatch, caplog):
    path, _ = _bad_dataset(tmp_path)
    monkeypatch.setenv("VISIONCOACH_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    caplog.set_level(logging.INFO)
    # 5 loadable records ('far' is invalid, 'missing' has no video): one epoch of batch 1.
    assert train.main(["--stage=sft", f"--data.dataset={path}", "--data.num_workers=0", "--data.nframes=2",
                       "--optim.sft_steps=5", "--data.shuffle=false", f"--output_dir={run}",
                       "--log.progress=false"]) == 0
    text = caplog.text
    assert "1 of 7 records skipped as invalid" in text and "key_frames[0].time" in text
    assert "1 of 7 records skipped: media file missing" in text
    assert "preflight: 1 record(s) could not be prepared" in text and "broken" in text
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 5 and metrics[-1]["samples_skipped"] == 2
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sft: 2 sample(s) skipped")]
    assert summary and "not a readable container" in summary[0] and "aspect ratio" in summary[0]


def test_infer_on_a_video_the_processor_cannot_take_is_one_error_line(tmp_path, tokenizer, capsys):
    from visioncoach.infer import main as infer_main
    from visioncoach.models.tiny import build_processor, build_tiny_model

    sys.path.insert(0, str(Path(__file__).parent))
    from video_clips import write_clip

    ckpt = tmp_path / "ckpt"
    build_tiny_model(seed=0).save_pretrained(ckpt)
    build_processor(tokenizer, max_pixels=3136).save_pretrained(ckpt)
    thin = write_clip(tmp_path / "thin.mp4", 12, size=(4, 1000))
    rc = infer_main(["--model", str(ckpt), "--video", str(thin), "--question", "What?", "--out",
                     str(tmp_path / "out"), "--nframes", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: cannot run the model on") and "aspect ratio" in err
    shutil.rmtree(ckpt)


def test_native_info_says_built_and_usable():
    import torch

    from visioncoach.ops import native_info

    info = native_info()
    assert set(info) == {"cpu", "cuda_built", "cuda_backend", "cuda_usable", "cuda_error"}
    assert info["cuda_usable"] == (info["cuda_backend"] is not None)
    if info["cuda_built"]:
        assert info["cuda_backend"] == ("nvcc" if torch.cuda.is_available() else None)


def test_progress_false_silences_transformers_bars(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VISIONCOACH_CACHE", str(tmp_path / "cache"))
    assert train.main(["--stage=sft", "--optim.sft_steps=1", "--data.synthetic_samples=2", "--data.nframes=2",
                       "--data.num_workers=0", f"--output_dir={tmp_path / 'run'}", "--log.progress=false"]) == 0
    err = capsys.readouterr().err
    assert "Writing model shards" not in err and "%|" not in err


def test_a_selector_whose_base_model_moved_is_a_config_error_at_start(tmp_path, no_model, capsys):
    from visioncoach.selector.templates import SELECTOR_PROMPT_VERSION

    sel = tmp_path / "sel"
    sel.mkdir()
    (sel / "selector.json").write_text(json.dumps({
        "labels": ["darken", "raw"], "base_model": str(tmp_path / "moved-away"), "min_pixels": 3136,
        "max_pixels": 12544, "prompt_version": SELECTOR_PROMPT_VERSION}))
    assert train.main(["--vp.selector=model", f"--vp.selector_path={sel}"]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "'vp.selector_path'" in err and "selector.json" in err, err
