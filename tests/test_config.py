"""Config system: defaults, YAML files, command-line overrides, and the errors users see."""

import dataclasses
import textwrap

import pytest

from visioncoach import config as C


def test_embedded_default_is_tiny_and_paper_file_has_paper_settings():
    tiny = C.load_config([])
    assert tiny.stage == "sft+rl" and tiny.model.path == "" and tiny.data.decoder == "pyav"
    with pytest.raises(C.ConfigError, match="vp.selector_path"):  # the trained selector is needed
        C.load_config(["--config", str(C.CONFIG_DIR / "qwen2_5_vl_7b.yaml")])
    paper = C.load_config(["--config", str(C.CONFIG_DIR / "qwen2_5_vl_7b.yaml"), "--vp.selector_path=/sel"])
    assert paper.data.nframes == 16
    assert paper.rollout.num_generations == 4 and paper.rollout.max_new_tokens == 768
    assert paper.rollout.temperature == 1.0 and paper.rollout.top_p == 0.95
    assert paper.optim.lr == 1e-6 and paper.optim.scheduler == "cosine"
    assert paper.optim.weight_decay == 0.01 and paper.optim.grad_clip == 5.0
    assert paper.loss.beta == 0.04 and paper.loss.sd_alpha == 0.1
    assert paper.vp.hard_threshold == 2.21 and paper.vp.top_n == 2
    assert paper.dist.zero_stage == 3


def test_paper_file_equals_dataclass_defaults():
    # The dataclass defaults are documented as the paper's settings; the file must agree.
    paper = C.load_config(["--config", str(C.CONFIG_DIR / "qwen2_5_vl_7b.yaml"), "--vp.selector_path=/sel"])
    data, _ = C.load_yaml(C.CONFIG_DIR / "qwen2_5_vl_7b.yaml")
    defaults = C.Config()
    for section in ("rollout", "reward", "loss", "optim"):
        for key in data[section]:
            assert getattr(getattr(paper, section), key) == getattr(getattr(defaults, section), key), \
                f"{section}.{key}"


@pytest.mark.parametrize("argv, key, expected", [
    (["--optim.lr=2e-6"], ("optim", "lr"), 2e-6),
    (["--optim.lr", "3.5"], ("optim", "lr"), 3.5),
    (["--rollout.num_generations=8"], ("rollout", "num_generations"), 8),
    (["--model.gradient_checkpointing=false"], ("model", "gradient_checkpointing"), False),
    (["--model.lora.enabled=yes"], ("model", "lora"), None),
    (["--reward.sigma=null"], ("reward", "sigma"), None),
    (["--reward.sigma=0.5"], ("reward", "sigma"), 0.5),
    (["--vp.types=darken,raw"], ("vp", "types"), ["darken", "raw"]),
    (["--vp.types=[circle, numpro]"], ("vp", "types"), ["circle", "numpro"]),
    (["--optim.betas=0.9,0.95"], ("optim", "betas"), [0.9, 0.95]),
    (["--vp.selector=fixed:darken"], ("vp", "selector"), "fixed:darken"),
    (["--stage", "sft"], ("stage",), "sft"),
    (["--model.tiny.hidden_size=128"], ("model", "tiny"), None),
])
def test_overrides(argv, key, expected):
    cfg = C.load_config(argv)
    value = cfg
    for k in key:
        value = getattr(value, k)
    if expected is None and dataclasses.is_dataclass(value):
        if key == ("model", "lora"):
            assert value.enabled is True
        else:
            assert value.hidden_size == 128
    else:
        assert value == expected and type(value) is type(expected)


def test_later_override_wins_and_file_then_cli_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 0.5\nvp:\n  selector: none\n")
    cfg = C.load_config(["--config", str(f), "--optim.lr=0.25", "--optim.lr=0.125"])
    assert cfg.optim.lr == 0.125
    assert C.load_config(["--config", str(f)]).optim.lr == 0.5


@pytest.mark.parametrize("argv, fragments", [
    (["--optim.lrr=3"], ["unknown config key 'optim.lrr'", "--optim.lrr=3", "did you mean 'optim.lr'"]),
    (["--nonsense.key=1"], ["unknown config key 'nonsense.key'"]),
    (["--optim.lr.x=1"], ["unknown config key 'optim.lr.x'"]),
    (["--optim.lr=fast"], ["'optim.lr'", "expected a number", "'fast'"]),
    (["--rollout.num_generations=2.5"], ["'rollout.num_generations'", "expected an integer"]),
    (["--model.gradient_checkpointing=maybe"], ["'model.gradient_checkpointing'", "true or false"]),
    (["--stage=dpo"], ["'stage'", "must be one of", "'sft+rl'"]),
    (["--model.tiny=3"], ["'model.tiny'", "is a section"]),
    (["--vp.selector=fixed:blur"], ["'vp.selector'", "fixed:<"]),
    (["--vp.types=darken,blur"], ["'vp.types'", "blur"]),
    (["--rollout.num_generations=1"], ["'rollout.num_generations'", ">= 2"]),
    (["--log.profile_steps=5"], ["'log.profile_steps'"]),
    (["--optim.lr"], ["has no value"]),
    (["positional"], ["unexpected command-line argument 'positional'"]),
    (["--data.synthetic_seed=-2"], ["'data.synthetic_seed'", "-1 for the run's seed"]),
    # Training on the held-out clips would make the held-out check meaningless.
    (["--seed=3", "--data.synthetic_seed=7922"], ["'data.synthetic_seed'", "(7922, from data.synthetic_seed)",
                                                   "data.heldout_seed"]),
    (["--data.synthetic_seed=5", "--data.heldout_seed=5"], ["'data.synthetic_seed'", "held-out"]),
    (["--seed=5", "--data.heldout_seed=5"], ["(5, from seed, as data.synthetic_seed is -1)"]),
    (["--data.heldout_seed=-5"], ["'data.heldout_seed'", "-1 for seed + 7919"]),
])
def test_cli_errors_name_the_key(argv, fragments):
    with pytest.raises(C.ConfigError) as err:
        C.load_config(argv)
    for frag in fragments:
        assert frag in str(err.value)


def test_yaml_errors_name_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(textwrap.dedent("""\
        seed: 1
        optim:
          lr: 1.0e-5
          warmup_steps: 10
        """))
    with pytest.raises(C.ConfigError, match=r"unknown config key 'optim.warmup_steps' \(.*bad.yaml:4\)"):
        C.load_config(["--config", str(f)])
    f.write_text("rollout:\n  num_generations: four\n")
    with pytest.raises(C.ConfigError, match=r"'rollout.num_generations' \(.*bad.yaml:2\): expected an integer"):
        C.load_config(["--config", str(f)])
    f.write_text("data:\n  dataset: 5\n")
    with pytest.raises(C.ConfigError, match=r"'data.dataset'.*expected a string"):
        C.load_config(["--config", str(f)])
    f.write_text("model:\n  lora: true\n")
    with pytest.raises(C.ConfigError, match=r"'model.lora'.*is a section"):
        C.load_config(["--config", str(f)])
    f.write_text("- a\n- b\n")
    with pytest.raises(C.ConfigError, match="must hold a mapping"):
        C.load_config(["--config", str(f)])
    f.write_text("optim: {lr: [\n")
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        C.load_config(["--config", str(f)])
    with pytest.raises(C.ConfigError, match="cannot read config file"):
        C.load_config(["--config", str(tmp_path / "missing.yaml")])


def test_yaml_types_are_strict_but_numbers_widen(tmp_path):
    f = tmp_path / "c.yaml"
    # An int where a float is expected is fine; 1e-6 without a dot is a YAML string but a number.
    f.write_text("optim:\n  lr: 1e-6\n  grad_clip: 1\nstage: sft\n")
    cfg = C.load_config(["--config", str(f)])
    assert cfg.optim.lr == 1e-6 and cfg.optim.grad_clip == 1.0 and isinstance(cfg.optim.grad_clip, float)
    f.write_text("rollout:\n  num_generations: 4.0\n")
    with pytest.raises(C.ConfigError, match="expected an integer"):
        C.load_config(["--config", str(f)])
    f.write_text("model:\n  gradient_checkpointing: 1\n")
    with pytest.raises(C.ConfigError, match="true or false"):
        C.load_config(["--config", str(f)])


def test_round_trip_through_yaml(tmp_path):
    cfg = C.load_config(["--optim.lr=7e-6", "--vp.types=raw", "--reward.sigma=2"])
    f = tmp_path / "dump.yaml"
    f.write_text(C.to_yaml(cfg))
    again = C.load_config(["--config", str(f)])
    assert C.to_dict(again) == C.to_dict(cfg)


def test_synthetic_and_heldout_seeds_follow_the_run_seed_unless_set():
    cfg = C.load_config(["--seed=4"])
    assert (C.synthetic_seed(cfg), C.heldout_seed(cfg)) == (4, 4 + 7919)
    cfg = C.load_config(["--seed=4", "--data.synthetic_seed=104", "--data.heldout_seed=1000"])
    assert (C.synthetic_seed(cfg), C.heldout_seed(cfg)) == (104, 1000)
    # Without a held-out check the seeds may coincide.
    C.load_config(["--data.synthetic_seed=5", "--data.heldout_seed=5", "--data.heldout_samples=0"])
