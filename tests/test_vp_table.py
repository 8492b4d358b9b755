"""Adding a visual prompt is one row of the table (``visioncoach.vp.spec``): a test-only type,
kernel-free with a torch reference only, registered once, is picked up by the config check, the
chooser, the renderer dispatch, the key-frame prompting of RL, the hints, the selector's labels,
its candidate rendering and its instruction, and one RL step."""

import pytest
import torch

from visioncoach.config import ConfigError, VPConfig, load_config
from visioncoach.data.loader import ClipDataset
from visioncoach.data.stgr import load_stgr
from visioncoach.data.synthetic import generate
from visioncoach.processor import resize_frames
from visioncoach.rewards.records import RewardTargets
from visioncoach.selector.frames import KeyFrames, render_candidates, resolve_vp_types
from visioncoach.selector.labels import LabelMapper, map_label, selector_labels
from visioncoach.selector.templates import selector_instruction
from visioncoach.vp import (VPSpec, add_hint, register_vp_type, render_vp, render_vp_reference,
                            unregister_vp_type, vp_spec, vp_types)
from visioncoach.vp.chooser import VPChooser
from visioncoach.vp.prompting import key_frame_prompt, prompted_inputs

HINT = "Hint: in the key frames, the key objects are shown in inverted colours."


def invert_in_boxes(frames, boxes, box_count, *, strength=255):
    """The test type's renderer: ``strength - c`` inside each box (pixel-index ranges)."""
    out = frames.clone()
    for f in range(frames.shape[0]):
        for b in range(int(box_count[f])):
            x1, y1, x2, y2 = (int(v) for v in boxes[f, b].round().tolist())
            out[f, y1:y2, x1:x2] = strength - out[f, y1:y2, x1:x2]
    return out


@pytest.fixture
def invert():
    spec = register_vp_type(VPSpec("invert", needs="boxes", reference=invert_in_boxes, hint=HINT,
                                   aliases=("invert", "inverted", "negative colours")))
    yield spec
    unregister_vp_type("invert")
    assert "invert" not in vp_types()


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    data = load_stgr(generate(tmp_path_factory.mktemp("syn"), n=4, seed=3), sft=False)
    clips = ClipDataset(data, nframes=3, backend="pyav", targets=RewardTargets((3136, 12544)))
    out = [clips[i] for i in range(len(clips))]
    return [s for s in out if s.is_key.any() and s.reward_record.frames]


def _frames(n=2, h=12, w=16):
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_a_registered_type_reaches_config_chooser_renderer_and_hints(invert):
    assert vp_types()[-1] == "invert" and vp_spec("invert") is invert
    with pytest.raises(ValueError, match="already registered"):
        register_vp_type(invert)
    # config: a known type in vp.types and fixed:<type>, and part of the default pool
    cfg = load_config(["--vp.selector=fixed:invert", "--vp.types=invert,raw"])
    assert cfg.vp.types == ["invert", "raw"] and "invert" in VPConfig().types
    # chooser: fixed and random pick it up
    chooser = VPChooser(cfg.vp, seed=0, rank=0, have_heatmaps=False)
    assert chooser.choose(0, [None] * 3, [{}] * 3, {}) == ["invert"] * 3
    rnd = VPChooser(VPConfig(selector="random", types=["invert"]), seed=0, rank=0, have_heatmaps=False)
    assert rnd.choose(5, [None] * 4, [{}] * 4, {}) == ["invert"] * 4
    # renderer dispatch: the table's reference, with only the boxes it needs
    frames = _frames()
    boxes = torch.tensor([[[2.0, 3.0, 8.0, 9.0]], [[0.0, 0.0, 0.0, 0.0]]])
    count = torch.tensor([1, 0])
    out = render_vp(frames, "invert", boxes, count, frame_index=torch.tensor([1, 2]))
    want = frames.clone()
    want[0, 3:9, 2:8] = 255 - frames[0, 3:9, 2:8]
    assert torch.equal(out, want)
    assert torch.equal(render_vp_reference(frames, "invert", boxes, count), want)
    assert torch.equal(render_vp(frames, "invert", boxes, count, backend="triton"), want)  # no kernel
    # hints
    assert add_hint("What is held?", "invert") == "What is held?\n" + HINT


def test_unregistered_type_is_rejected_everywhere():
    assert "invert" not in vp_types()
    with pytest.raises(ConfigError, match="vp.selector"):
        load_config(["--vp.selector=fixed:invert"])
    with pytest.raises(ConfigError, match="vp.types"):
        load_config(["--vp.types=invert"])
    with pytest.raises(ValueError, match="unknown visual prompt type 'invert'"):
        render_vp(_frames(), "invert")
    with pytest.raises(ValueError, match="unknown visual prompt type"):
        add_hint("q", "invert")
    assert map_label("inverted")[0] == "raw"


def test_the_selector_side_picks_it_up(invert):
    assert selector_labels()[-1] == "invert"
    assert map_label("Negative colours.") == ("invert", True)     # an alias as the whole answer
    assert LabelMapper()("Inverted.") == "invert"
    assert "invert" in resolve_vp_types(None, have_heatmaps=False)
    assert resolve_vp_types(["invert"], have_heatmaps=False) == ["invert"]
    assert "or invert?" in selector_instruction("Q?")
    frames = _frames(n=2, h=10, w=20)
    kf = KeyFrames(frames, [0.5, 1.5], [{"cup": [(0.1, 0.2, 0.5, 0.8)]}, {}])
    got = render_candidates(kf, ["invert", "raw"], "Q?")
    want = frames.clone()
    want[0, 2:8, 2:10] = 255 - frames[0, 2:8, 2:10]
    assert torch.equal(got["invert"], want) and torch.equal(got["raw"], frames)


def test_rl_key_frame_prompting_picks_it_up(invert, samples, tokenizer):
    from visioncoach.config import DataConfig

    s = samples[0]
    frames = resize_frames(s.frames, 3136, 12544)
    out = key_frame_prompt(frames, s.times, s.is_key, s.reward_record, "invert", darken_factor=0.3)
    key = s.is_key.nonzero().flatten()
    assert torch.equal(out[~s.is_key], frames[~s.is_key])      # only key frames change
    assert not torch.equal(out[key], frames[key])
    data = DataConfig(min_pixels=3136, max_pixels=12544)
    x = prompted_inputs(s, frames, "invert", tokenizer, data, darken_factor=0.3)
    text = tokenizer.decode(x.tensors["input_ids"][0].tolist())
    assert HINT in text


def test_one_rl_step_with_the_new_type(invert, samples, tokenizer, tmp_path):
    from visioncoach.models.tiny import build_tiny_model
    from visioncoach.trainer import rl
    from visioncoach.utils.dist import DistInfo

    def low_reward(texts, records, cfg, progress=0.0):
        z = torch.zeros(len(texts))
        return {"accuracy": z, "format": z, "temporal": z, "spatial": z,
                "total": torch.arange(len(texts), dtype=torch.float32) % 3}

    cfg = load_config([f"--{k}={v}" for k, v in {
        "data.num_workers": 0, "data.nframes": 3, "data.max_pixels": 12544, "rollout.max_new_tokens": 4,
        "rollout.prompts_per_step": 1, "vp.selector": "fixed:invert", "vp.hard_threshold": 5,
        "loss.beta": 0, "optim.rl_steps": 1}.items()])
    data = load_stgr(generate(tmp_path / "syn", n=2, seed=3), sft=False)
    runner = rl.RLRunner(cfg, DistInfo(0, 1, 0, torch.device("cpu"), None), build_tiny_model(seed=0),
                         tokenizer, data, tmp_path / "run", reward_fn=low_reward)
    results = runner.collect([s for s in samples[:1]], progress=0.0)
    assert results[0].hard and results[0].vp_type == "invert" and results[0].prompted is not None
    m = runner.step_metrics(results)
    assert m["vp_counts"] == {"invert": 1} and m["vp_rollouts"] == 1
