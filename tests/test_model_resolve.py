"""Which model folder a user's path means (``visioncoach.models.resolve``): model, checkpoint,
stage and run folders; one clean error for anything else, at every entry point; the merged
LoRA export loads without peft and computes what the peft model does."""

import json
from pathlib import Path

import pytest
import torch

from visioncoach.models.resolve import ModelDirError, load_model_dir, resolve_model_dir
from shared_data import VIDEOS  # noqa: E402

MODEL_FILES = ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json")


def _model(folder: Path, files=MODEL_FILES) -> Path:
    """Stand-in model folder: the resolver reads file names only."""
    folder.mkdir(parents=True)
    for f in files:
        (folder / f).write_text("{}")
    return folder


def _checkpoint(stage: Path, step: int, merged: bool = False) -> Path:
    ckpt = stage / f"step-{step:08d}"
    _model(ckpt / "model")
    if merged:
        _model(ckpt / "merged")
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step}))
    (stage / "latest").write_text(ckpt.name + "\n")
    return ckpt


def test_each_kind_of_folder_resolves_to_its_model(tmp_path):
    run = tmp_path / "run"
    sft = _checkpoint(run / "checkpoints" / "sft", 4)
    assert resolve_model_dir(run).folder == sft / "model"
    _checkpoint(run / "checkpoints" / "rl", 1)
    rl = _checkpoint(run / "checkpoints" / "rl", 2)
    r = resolve_model_dir(run)                                # RL over SFT; the stage's latest
    assert r.folder == rl / "model" and r.base is None
    assert r.what == (f"run folder {run} (stage rl) -> stage folder {run / 'checkpoints' / 'rl'} "
                      f"(latest step-00000002) -> checkpoint step-00000002 -> model folder {rl / 'model'}")
    assert resolve_model_dir(run / "checkpoints").folder == rl / "model"
    assert resolve_model_dir(run / "checkpoints" / "sft").folder == sft / "model"
    assert resolve_model_dir(sft).folder == sft / "model"
    assert resolve_model_dir(sft / "model").what == f"model folder {sft / 'model'}"
    lora = _checkpoint(tmp_path / "lora", 3, merged=True)     # the merged export wins
    r = resolve_model_dir(lora)
    assert r.folder == lora / "merged" and "merged LoRA export" in r.what


def test_a_lora_adapter_needs_a_local_base(tmp_path):
    base = _model(tmp_path / "base")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    r = resolve_model_dir(adapter)
    assert (r.folder, r.base) == (adapter, base) and r.what.startswith(f"LoRA adapter {adapter} on model folder")
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": None}))
    with pytest.raises(ModelDirError, match="base model .not recorded. is not a local folder.*log.export_merged"):
        resolve_model_dir(adapter)


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "nothere", "not a local checkpoint folder"),
    (lambda p: p, "no config.json .* no adapter_config.json .* no trainer_state.json .* no latest .* "
                  "no checkpoints/<stage>/latest"),
    (lambda p: (p / "checkpoints").mkdir() or p, "run folder .* has no checkpoint yet"),
    (lambda p: _model(p / "m", ("config.json", "model.safetensors")),
     "lacks the processor .* and the tokenizer"),
    (lambda p: _model(p / "m", ("config.json", "processor_config.json", "tokenizer.json")), "lacks weights"),
    (lambda p: (p / "latest").write_text("step-00000009\n") and p, "names .*step-00000009, which is not"),
    (lambda p: (p / "trainer_state.json").write_text("{}") and p, "has no model/ folder"),
])
def test_a_folder_that_is_none_of_these_is_one_clear_error(tmp_path, make, message):
    with pytest.raises(ModelDirError, match=message):
        resolve_model_dir(make(tmp_path))


def _infer(path, out):
    from visioncoach.infer import main

    return main(["--model", str(path), "--video", str(VIDEOS / "cup.mp4"), "--question", "q", "--out", str(out),
                 "--device", "cpu"])


def _predict(path, tmp_path):
    from visioncoach.predict import main

    ann = tmp_path / "ann.txt"
    ann.write_text("cup 1.0 2.0##a cup\n")
    return main(["--bench", "charades", "--model", str(path), "--videos", str(VIDEOS), "--ann", str(ann),
                 "--out", str(tmp_path / "p.jsonl"), "--device", "cpu"])


@pytest.mark.parametrize("entry", [_infer, _predict])
def test_infer_and_predict_refuse_a_bad_folder_with_one_error_line(entry, tmp_path, capsys):
    old = _model(tmp_path / "old", ("config.json", "model.safetensors"))   # weights only: pre-processor checkpoints
    for bad, says in [(tmp_path / "empty", "is not a model folder"), (old, "lacks the processor")]:
        bad.mkdir(exist_ok=True)
        assert entry(bad, tmp_path) == 2
        out, err = capsys.readouterr()
        [line] = err.strip().splitlines()
        assert line.startswith(f"error: {bad}") and says in line and "Traceback" not in out + err


def test_train_checks_model_path_before_building_anything(tmp_path, capsys, monkeypatch):
    import visioncoach.models.policy as policy
    from visioncoach import train

    monkeypatch.setattr(policy, "build_policy", lambda *a, **k: pytest.fail("model built"))
    assert train.main([f"--model.path={tmp_path}", f"--output_dir={tmp_path / 'run'}"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"visioncoach.train: config error: config key 'model.path': {tmp_path} is not")


def test_selector_apply_refuses_a_bad_base_model(tmp_path, capsys):
    from visioncoach.selector import apply
    from visioncoach.selector.labels import selector_labels
    from visioncoach.selector.templates import SELECTOR_PROMPT_VERSION

    sel = tmp_path / "sel"
    sel.mkdir()
    (sel / "selector.json").write_text(json.dumps({
        "labels": list(selector_labels()), "prompt_version": SELECTOR_PROMPT_VERSION,
        "base_model": str(tmp_path / "gone"), "min_pixels": 3136, "max_pixels": 3136}))
    assert apply.main(["--selector", str(sel), "--video", str(VIDEOS / "cup.mp4"), "--question", "q",
                       "--num-frames", "1", "--device", "cpu", "--out", str(tmp_path / "out")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    # Names the file that holds the path and the flag that overrides it.
    assert line.startswith(f"error: {sel / 'selector.json'}: the selector's base_model {tmp_path / 'gone'}")
    assert "is not a local checkpoint folder" in line and "--base-model" in line


def test_lora_merged_export_loads_without_peft_and_matches(tmp_path, tokenizer, processor):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from visioncoach.config import LoraConfig, load_config
    from visioncoach.data.stgr import load_stgr
    from visioncoach.data.synthetic import generate
    from visioncoach.models.policy import add_lora
    from visioncoach.models.tiny import build_tiny_model
    from visioncoach.trainer.sft import SFTRunner
    from visioncoach.utils.dist import DistInfo

    data = load_stgr(generate(tmp_path / "syn", n=2, seed=5), sft=True)
    cfg = load_config(["--data.num_workers=0", "--data.nframes=2", "--optim.sft_steps=2", "--optim.sft_lr=1e-2",
                       "--log.checkpoint_every=2", "--log.export_merged=true"])
    base = tmp_path / "base"                                              # a local base model folder
    build_tiny_model(seed=0).save_pretrained(base)
    processor.save_pretrained(base)
    model = add_lora(Qwen2_5_VLForConditionalGeneration.from_pretrained(base, local_files_only=True),
                     LoraConfig(enabled=True, r=4, dropout=0.0))
    runner = SFTRunner(cfg, DistInfo(0, 1, 0, torch.device("cpu"), None), model, tokenizer, data,
                       tmp_path / "run", processor=processor)
    runner.run()
    step = tmp_path / "run" / "checkpoints" / "sft" / "step-00000002"
    assert (step / "model" / "adapter_config.json").is_file()            # the adapter, as before
    merged = step / "merged"
    assert not (merged / "adapter_config.json").exists() and (merged / "processor_config.json").is_file()
    assert resolve_model_dir(tmp_path / "run").folder == merged
    plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(merged, local_files_only=True).eval()
    assert not any("lora" in k for k in plain.state_dict())
    ids = torch.tensor([tokenizer("<|im_start|>user\nWhere is the cup?<|im_end|>").input_ids])
    model.eval()
    with torch.no_grad():
        ours, theirs = plain(input_ids=ids).logits, model(input_ids=ids).logits
        with model.disable_adapter():
            untrained = model(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (theirs - untrained).abs().max() > 1e-3                        # the adapters did change it
    # The adapter alone resolves to adapter + its base, merged on load.
    r = resolve_model_dir(step / "model")
    assert (r.folder, r.base) == (step / "model", base)
    via_base, _ = load_model_dir(r, dtype=torch.float32, attn="sdpa", min_pixels=3136, max_pixels=12544)
    with torch.no_grad():
        torch.testing.assert_close(via_base.eval()(input_ids=ids).logits, theirs, rtol=1e-5, atol=1e-5)
