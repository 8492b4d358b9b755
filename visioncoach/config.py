"""One config system for every entry point.

Nested dataclasses, one per component along the data flow. Field defaults are the paper's
settings (Qwen2.5-VL-7B, appendix B.2); YAML files under ``visioncoach/configs/`` override
them, and ``--section.key=value`` (or ``--section.key value``) on the command line overrides
the file. Every value is checked against its field's type and every key against the
dataclasses before anything is built; errors name the key and where it came from
(file:line, or the command-line argument).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "tiny.yaml"
VP_TYPES = ("api_prompt", "circle", "darken", "numpro", "raw")


class ConfigError(ValueError):
    """A bad config key or value; the message names the key and its source."""


# ---------------------------------------------------------------------------------------
# Sections (data flow order: data -> model -> rollout -> reward -> loss -> vp -> optim)
# ---------------------------------------------------------------------------------------

@dataclass
class DataConfig:
    # "synthetic" (the bundled generator) or a path to an STGR-format JSON/JSONL file.
    dataset: str = "synthetic"
    # Folder that relative `video_path`s in the dataset are resolved against.
    video_root: str = ""
    # Uniform frames per video (paper B.2: 16); annotated key frames are added in time order.
    nframes: int = 16
    # Per-frame pixel budget after resizing (reference: 128 * 28 * 28) and its floor.
    max_pixels: int = 100352
    min_pixels: int = 3136
    # Decoder: DALI (NVDEC) on GPU, PyAV with seeking on CPU; `auto` picks by device.
    decoder: Literal["auto", "dali", "pyav"] = "auto"
    # `frames`: one image per frame with "Frame i at T s:" text (the reference's layout);
    # `video`: Qwen2.5-VL video tokens.
    layout: Literal["frames", "video"] = "frames"
    num_workers: int = 2
    # SFT samples per rank per step (RL batches are rollout.prompts_per_step prompts).
    batch_size: int = 1
    max_prompt_tokens: int = 16384
    shuffle: bool = True
    # Samples the synthetic generator writes (ignored for file datasets).
    synthetic_samples: int = 64


@dataclass
class TinyModelConfig:
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_depth: int = 2
    vision_hidden_size: int = 32


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@dataclass
class ModelConfig:
    # Local path of a Qwen2.5-VL checkpoint; empty = the tiny random-weight model below.
    path: str = ""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    # `auto`: flash_attention_2 when flash-attn and CUDA are present, else sdpa (logged).
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    # `auto`: bfloat16 on GPU, float32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    gradient_checkpointing: bool = True
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class RolloutConfig:
    # G rollouts per prompt (paper B.2: 4).
    num_generations: int = 4
    temperature: float = 1.0
    top_p: float = 0.95
    # Completion length (paper B.2: 768).
    max_new_tokens: int = 768
    # Prompts per rank per step (paper: per-device batch 1).
    prompts_per_step: int = 1
    # CUDA only: capture the decode step with torch.compile(mode="reduce-overhead") (CUDA
    # graphs over the static KV cache). GPU-unverified, so off by default.
    compile_decode: bool = False


@dataclass
class RewardConfig:
    # Temporal Gaussian width (eq. 6); None = the schedule 4(1 - p) for progress p < 0.75, else 1.
    sigma: Optional[float] = None
    # Temporal gate of the spatial reward, seconds.
    tau: float = 1.0
    # `object_aware` (eq. 8), or the ablations `max` (eq. 13) and `avg` (eq. 14).
    spatial_mode: Literal["object_aware", "max", "avg"] = "object_aware"
    identity: Literal["soft", "exact", "none"] = "soft"


@dataclass
class LossConfig:
    # GSPO clip range in sequence-ratio space (GSPO paper: 3e-4 / 4e-4).
    eps_low: float = 3e-4
    eps_high: float = 4e-4
    # KL coefficient to the reference policy, k3 estimator (paper B.2: 0.04).
    beta: float = 0.04
    # Self-distillation weight alpha (eq. 2; paper: 0.1).
    sd_alpha: float = 0.1
    # Optimizer steps per rollout batch (mu). With 1 the GSPO ratio is identically 1.
    updates_per_rollout: int = 1


@dataclass
class VPConfig:
    # Who picks the visual prompt for a hard sample: the trained VP-Selector (`model`),
    # `fixed:<type>`, `gating` (appendix D.3), `random`, or `none` (plain GSPO).
    selector: str = "model"
    selector_path: str = ""
    # A sample is hard when its mean raw-rollout reward is below the threshold (paper: 2.21),
    # or, in `percentile` mode, below that percentile of the running reward distribution.
    hard_mode: Literal["absolute", "percentile"] = "absolute"
    hard_threshold: float = 2.21
    # Distill the top-N improved prompted rollouts, ranked by answer reward (paper: 2).
    top_n: int = 2
    types: list[str] = field(default_factory=lambda: list(VP_TYPES))
    darken_factor: float = 0.3
    # Local CLIP checkpoint for `api_prompt` heatmaps (nothing is downloaded).
    clip_path: str = ""


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 5.0
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.0
    # Steps per stage; -1 = one epoch (paper: one epoch for SFT and for RL).
    sft_steps: int = -1
    rl_steps: int = -1
    sft_lr: float = 1e-6
    # Non-finite loss or gradients skip the step; this many in a row stop the run.
    max_nonfinite_steps: int = 5


@dataclass
class DistConfig:
    # `auto`: DeepSpeed when more than one process, else plain single-process.
    engine: Literal["auto", "deepspeed", "ddp", "none"] = "auto"
    zero_stage: int = 3
    # `auto`: nccl with CUDA, gloo on CPU.
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    timeout_s: int = 1800


@dataclass
class LogConfig:
    every_steps: int = 1
    tensorboard: bool = True
    progress: bool = True
    # torch.profiler trace over steps "a:b" (empty = off).
    profile_steps: str = ""
    checkpoint_every: int = 100
    # Checkpoints kept per stage (the newest); older ones are deleted after a new one is
    # published. 0 keeps all.
    keep_checkpoints: int = 2
    # "" = fresh run, "auto" = latest checkpoint in output_dir, or a checkpoint path.
    resume: str = ""


@dataclass
class Config:
    # `sft` (cold start), `rl` (Algorithm 1), or both in sequence.
    stage: Literal["sft", "rl", "sft+rl"] = "rl"
    seed: int = 0
    output_dir: str = "runs/visioncoach"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    vp: VPConfig = field(default_factory=VPConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)


# Checks across fields, run after every override: (predicate, key, message).
def _validate(cfg: Config) -> None:
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"config key {key!r}: {msg}")

    need(cfg.data.nframes >= 1, "data.nframes", f"must be >= 1, got {cfg.data.nframes}")
    need(cfg.data.min_pixels <= cfg.data.max_pixels, "data.min_pixels",
         f"{cfg.data.min_pixels} exceeds data.max_pixels {cfg.data.max_pixels}")
    need(cfg.rollout.num_generations >= 2, "rollout.num_generations",
         f"group-normalised advantages need >= 2 rollouts, got {cfg.rollout.num_generations}")
    need(cfg.rollout.temperature > 0, "rollout.temperature", "must be > 0")
    need(0 < cfg.rollout.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {cfg.rollout.top_p}")
    need(cfg.rollout.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
    need(cfg.reward.sigma is None or cfg.reward.sigma > 0, "reward.sigma", "must be > 0 or null")
    need(cfg.reward.tau >= 0, "reward.tau", "must be >= 0")
    need(cfg.loss.eps_low >= 0 and cfg.loss.eps_high >= 0, "loss.eps_low", "clip range must be >= 0")
    need(cfg.loss.eps_low < 1, "loss.eps_low", "must be < 1 (the ratio's lower clip is 1 - eps_low)")
    need(cfg.loss.beta >= 0, "loss.beta", "must be >= 0")
    need(cfg.loss.sd_alpha >= 0, "loss.sd_alpha", "must be >= 0")
    need(cfg.loss.updates_per_rollout >= 1, "loss.updates_per_rollout", "must be >= 1")
    sel = cfg.vp.selector
    ok_sel = sel in ("model", "gating", "random", "none") or (
        sel.startswith("fixed:") and sel[len("fixed:"):] in VP_TYPES)
    need(ok_sel, "vp.selector", f"must be model, gating, random, none or fixed:<{'|'.join(VP_TYPES)}>, "
         f"got {sel!r}")
    if cfg.stage in ("rl", "sft+rl"):
        need(sel != "model" or bool(cfg.vp.selector_path), "vp.selector_path",
             "is required when vp.selector is 'model' (train one with `python -m "
             "visioncoach.selector.train`, or pick gating, random, fixed:<type> or none)")
        need(sel != "fixed:api_prompt" or bool(cfg.vp.clip_path), "vp.clip_path",
             "is required for vp.selector fixed:api_prompt (a local CLIP checkpoint for the heatmap)")
    bad = [t for t in cfg.vp.types if t not in VP_TYPES]
    need(not bad, "vp.types", f"unknown visual prompt type(s) {bad}; known: {list(VP_TYPES)}")
    need(cfg.vp.top_n >= 1, "vp.top_n", "must be >= 1")
    if cfg.vp.hard_mode == "percentile":
        need(0 <= cfg.vp.hard_threshold <= 100, "vp.hard_threshold",
             "is a percentile in [0, 100] when vp.hard_mode is percentile")
    need(0 <= cfg.vp.darken_factor <= 1, "vp.darken_factor", "must be in [0, 1]")
    need(cfg.optim.lr > 0 and cfg.optim.sft_lr > 0, "optim.lr", "learning rates must be > 0")
    need(len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas), "optim.betas",
         f"needs two values in [0, 1), got {cfg.optim.betas}")
    need(cfg.optim.grad_clip > 0, "optim.grad_clip", "must be > 0")
    need(0 <= cfg.optim.warmup_ratio < 1, "optim.warmup_ratio", "must be in [0, 1)")
    need(cfg.dist.zero_stage in (0, 1, 2, 3), "dist.zero_stage",
         f"must be 0, 1, 2 or 3, got {cfg.dist.zero_stage}")
    need(cfg.data.batch_size >= 1, "data.batch_size", "must be >= 1")
    need(cfg.optim.max_nonfinite_steps >= 1, "optim.max_nonfinite_steps", "must be >= 1")
    need(cfg.log.every_steps >= 1, "log.every_steps", "must be >= 1")
    need(cfg.log.checkpoint_every >= 1, "log.checkpoint_every", "must be >= 1")
    need(cfg.log.keep_checkpoints >= 0, "log.keep_checkpoints", "must be >= 0 (0 keeps all)")
    if cfg.log.profile_steps:
        parts = cfg.log.profile_steps.split(":")
        need(len(parts) == 2 and all(p.isdigit() for p in parts) and int(parts[0]) < int(parts[1]),
             "log.profile_steps", f"must look like 'a:b' with a < b, got {cfg.log.profile_steps!r}")


# ---------------------------------------------------------------------------------------
# Typed assignment
# ---------------------------------------------------------------------------------------

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, from_cli: bool) -> Any:
    """Value converted to ``tp``; raises TypeError/ValueError with a short reason."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (from_cli and str(value).lower() in ("null", "none"))):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, from_cli)
            except (TypeError, ValueError):
                pass
        raise TypeError(f"expected {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ValueError(f"must be one of {', '.join(repr(c) for c in choices)}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if from_cli and isinstance(value, str):
            text = value.strip()
            value = yaml.safe_load(text) if text.startswith("[") else (
                [v.strip() for v in text.split(",")] if text else [])
            if not isinstance(value, list):
                raise TypeError(f"expected {_type_name(tp)}")
            from_items_cli = not text.startswith("[")
        else:
            from_items_cli = False
        if not isinstance(value, list):
            raise TypeError(f"expected {_type_name(tp)}")
        return [_coerce(v, item, from_items_cli) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_cli and isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise TypeError("expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_cli and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise TypeError("expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads 1e-6 (no dot) as a string; accept plain numbers written that way.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise TypeError("expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError("expected a string (quote it in YAML)")
    raise TypeError(f"unsupported field type {tp!r}")


def _fields(obj: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _hints(obj: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(obj))


def _all_keys(obj: Any, prefix: str = "") -> list[str]:
    out = []
    for name in _fields(obj):
        value = getattr(obj, name)
        key = prefix + name
        out.append(key)
        if dataclasses.is_dataclass(value):
            out += _all_keys(value, key + ".")
    return out


def _unknown(cfg: Config, key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, _all_keys(cfg), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r} ({where}){hint}")


def set_value(cfg: Config, key: str, value: Any, where: str, from_cli: bool = False) -> None:
    """Assign ``value`` to the dotted ``key`` of ``cfg`` after checking key and type."""
    parts = key.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj) or part not in _fields(obj):
            raise _unknown(cfg, key, where)
        if i < len(parts) - 1:
            obj = getattr(obj, part)
    name = parts[-1]
    current = getattr(obj, name)
    if dataclasses.is_dataclass(current):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} ({where}) is a section; give its keys "
                              f"({', '.join(_fields(current))}), not a value")
        for sub, sub_value in value.items():
            set_value(cfg, f"{key}.{sub}", sub_value, where, from_cli)
        return
    tp = _hints(obj)[name]
    try:
        setattr(obj, name, _coerce(value, tp, from_cli))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config key {key!r} ({where}): {exc}, got {value!r} "
                          f"(type {_type_name(tp)})") from None


# ---------------------------------------------------------------------------------------
# YAML with line numbers
# ---------------------------------------------------------------------------------------

def _yaml_lines(node: yaml.Node, prefix: str, out: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = f"{prefix}{k.value}"
            out[key] = k.start_mark.line + 1
            _yaml_lines(v, key + ".", out)


def load_yaml(path: str | Path) -> tuple[dict, dict[str, int]]:
    """Mapping from a YAML config file and the line of each (dotted) key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    lines: dict[str, int] = {}
    _yaml_lines(root, "", lines)
    return data, lines


def apply_yaml(cfg: Config, path: str | Path) -> None:
    data, lines = load_yaml(path)

    def walk(mapping: dict, prefix: str) -> None:
        for k, v in mapping.items():
            key = f"{prefix}{k}"
            where = f"{path}:{lines.get(key, '?')}"
            parts = key.split(".")
            obj = cfg
            for part in parts[:-1]:
                obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj) or str(k) not in _fields(obj):
                raise _unknown(cfg, key, where)
            if dataclasses.is_dataclass(getattr(obj, str(k))) and isinstance(v, dict):
                walk(v, key + ".")
            else:
                set_value(cfg, key, v, where)

    walk(data, "")


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

USAGE = """usage: torchrun [--nproc_per_node=N] -m visioncoach.train [--config FILE] [--key.sub=value ...]

  --config FILE        YAML config (default: the embedded tiny config, {default})
  --key.sub=value      override one field, e.g. --optim.lr=2e-6 --rollout.num_generations=8
                       (`--key.sub value` works too; lists as a,b,c or [a, b, c])
  --print-config       print the resolved config as YAML and exit
  -h, --help           this message

sections: {sections}
"""


def parse_args(argv: list[str]) -> tuple[Optional[str], list[tuple[str, str, str]], bool]:
    """(config file, [(key, raw value, source)], print_config). Raises ConfigError."""
    config_file = None
    overrides: list[tuple[str, str, str]] = []
    print_config = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            raise SystemExit(USAGE.format(default=DEFAULT_CONFIG,
                                          sections=", ".join(_fields(Config()))))
        if arg == "--print-config":
            print_config = True
            i += 1
            continue
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected command-line argument {arg!r} (argument {i + 1}); "
                              "overrides look like --section.key=value")
        body = arg[2:]
        if "=" in body:
            key, value = body.split("=", 1)
            source = f"command-line argument {arg!r}"
        else:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"command-line argument {arg!r} has no value "
                                  f"(use --{body}=VALUE)")
            key, value = body, argv[i + 1]
            source = f"command-line arguments {arg!r} {value!r}"
            i += 1
        if key == "config":
            config_file = value
        else:
            overrides.append((key, value, source))
        i += 1
    return config_file, overrides, print_config


def load_config(argv: Optional[list[str]] = None, *, config_file: Optional[str | Path] = None) -> Config:
    """Defaults <- YAML file (``--config``, else the embedded tiny config) <- overrides."""
    argv = list(argv or [])
    cli_file, overrides, _ = parse_args(argv)
    cfg = Config()
    apply_yaml(cfg, cli_file or config_file or DEFAULT_CONFIG)
    for key, value, source in overrides:
        set_value(cfg, key, value, source, from_cli=True)
    _validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
