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
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from visioncoach.utils import typed_config
from visioncoach.utils.typed_config import ConfigError, apply_yaml, load_yaml  # noqa: F401 (public API)

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "tiny.yaml"


def _vp_types() -> list[str]:
    # The visual-prompt table (``visioncoach.vp.spec``) pulls in the kernels: read only when a
    # VPConfig is made or checked, so importing the config stays cheap.
    from visioncoach.vp.spec import vp_types

    return list(vp_types())


# ---------------------------------------------------------------------------------------
# Sections (data flow order: data -> model -> rollout -> reward -> loss -> vp -> optim)
# ---------------------------------------------------------------------------------------

@dataclass
class SourceConfig:
    # A glob on the record's `source` (fnmatch: "STR_plm_*", "gqa"); the first match wins.
    match: str = "*"
    # Folder its `video_path` / `image_path` are relative to.
    media: str = ""
    # Folder its key-frame images (`key_frames[].path`) are relative to ("" = data.key_frame_root).
    key_frames: str = ""


@dataclass
class DataConfig:
    # "synthetic" (the bundled generator) or a path to an STGR-format JSON/JSONL file.
    dataset: str = "synthetic"
    # Where each record's files are, by its `source` (the released STGR layout has one folder
    # per source). Records whose source matches no entry use video_root / key_frame_root.
    sources: list[SourceConfig] = field(default_factory=list)
    # Folder that relative `video_path`s (and `image_path`s) are resolved against when no
    # data.sources entry matches; "" = the dataset file's folder when data.sources is empty.
    video_root: str = ""
    # Folder of key-frame images (`key_frames[].path`) when no data.sources entry says; "" =
    # the media folder. A key frame whose image is missing is decoded from the video at its time.
    key_frame_root: str = ""
    # An invalid record is skipped and counted with its file:line; true makes it an error.
    strict: bool = False
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
    # Prompt budget (paper B.2: 16,384 tokens). A longer prompt drops uniform frames (evenly,
    # key frames kept) down to data.min_frames (`drop_frames`), or the sample is skipped and
    # counted (`skip`, or when even data.min_frames frames do not fit).
    max_prompt_tokens: int = 16384
    prompt_overflow: Literal["drop_frames", "skip"] = "drop_frames"
    min_frames: int = 4
    shuffle: bool = True
    # Samples the synthetic generator writes (ignored for file datasets).
    synthetic_samples: int = 64
    # The synthetic generator's task set: `all` (every STGR task type) or `color` (the
    # learning benchmark's one-shape colour MCQ; visioncoach.data.synthetic).
    synthetic_tasks: Literal["all", "color"] = "all"
    # The generator's seed for the training clips (ignored for file datasets); -1: the run's
    # seed. Another value gives a stage clips it has not seen, e.g. RL on other clips than its
    # SFT cold start (as the paper's RL set is not its cold-start set).
    synthetic_seed: int = -1
    # Synthetic datasets only: clips of another seed rolled out greedily (no visual prompts)
    # before and after each stage, every reward component's mean in summary.json. The seed
    # -1 means seed + 7919 (a fixed value keeps the same clips across runs of other seeds).
    heldout_samples: int = 16
    heldout_seed: int = -1


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
    # Local Qwen2.5-VL model folder, or a training checkpoint / stage / run folder (its latest
    # checkpoint; visioncoach.models.resolve); empty = the tiny random-weight model below.
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
    # The reward function, "package.module:function" (its contract: visioncoach.rewards.components).
    fn: str = "visioncoach.rewards:score"
    # Which components make up `total`, what GSPO optimises and the hard bar reads (paper
    # Table 9 ablates them; eq. 4 sums all four). A subset replaces reward.fn's total with the
    # sum of the enabled ones; the others are still computed, logged and read by the rules that
    # name them (gating reads temporal/spatial, top-N ranks by accuracy).
    components: list[str] = field(default_factory=lambda: ["accuracy", "format", "temporal", "spatial"])


@dataclass
class LossConfig:
    # GSPO clip range in sequence-ratio space (GSPO paper: 3e-4 / 4e-4).
    eps_low: float = 3e-4
    eps_high: float = 4e-4
    # KL coefficient to the reference policy, k3 estimator (paper B.2: 0.04).
    beta: float = 0.04
    # Self-distillation weight alpha (eq. 2; paper: 0.1).
    sd_alpha: float = 0.1
    # What the distillation NLL conditions on: `prompted` (x', q'), eq. 1 and Algorithm 1
    # line 16; `raw` (x, q): the prompted rollout's tokens distilled on the raw input.
    sd_condition: Literal["prompted", "raw"] = "prompted"
    # Optimizer steps per rollout batch (mu). With 1 the GSPO ratio is identically 1.
    updates_per_rollout: int = 1
    # SFT: weight of each token of the answer block (between <answer> and </answer>) in the
    # token-NLL mean, the other target tokens weighing 1 (1 = the plain mean, the paper's).
    # Above 1 the answer carries more of the loss, so the cold start also learns what the
    # answer depends on (the frames) rather than only the format (bench/bench_learning.py).
    sft_answer_weight: float = 1.0


@dataclass
class VPConfig:
    # Who picks the visual prompt for a hard sample: the trained VP-Selector (`model`),
    # `fixed:<type>`, `gating` (appendix D.3), `random`, or `none` (plain GSPO).
    selector: str = "model"
    selector_path: str = ""
    # The selector's base model when it is no longer where its selector.json says (that file
    # stores the absolute path it was trained on): a model folder, or `tiny`; "" = selector.json's.
    selector_base_model: str = ""
    # A sample is hard when its mean raw-rollout reward is below the threshold (paper: 2.21),
    # or, in `percentile` mode, below that percentile of the running reward distribution, or,
    # in `relative` mode, below threshold x the most its task can score (accuracy + format, +
    # temporal with ground-truth times, + spatial with annotated boxes; enabled components
    # only): MCQ / free-form records top out at 2, so the absolute 2.21 marks them all hard.
    hard_mode: Literal["absolute", "percentile", "relative"] = "absolute"
    hard_threshold: float = 2.21
    # `promptable`: only samples on which the chooser can draw one of its types go through the
    # hard gate (the reference release gates only such ids); `all`: every sample does.
    hard_eligible: Literal["promptable", "all"] = "promptable"
    # The candidates C: `spa_tmp_acc` (default; appendix B.2, what the paper trained with: the
    # mean of r_spa, r_tmp, r_acc of a prompted rollout above the raw rollouts' mean of it) or
    # `total` (Algorithm 1 line 13 as written: R'_g above the raw mean R).
    candidate_reward: Literal["spa_tmp_acc", "total"] = "spa_tmp_acc"
    # Distill the top-N improved prompted rollouts, ranked by answer reward (paper: 2).
    top_n: int = 2
    # Frame numbers (frame_index types) on every model frame (`all`; appendix C.1: "we overlay
    # frame indices on each video frame") or on the key frames only (`key`).
    numpro_frames: Literal["all", "key"] = "all"
    # Default: every type of the visual-prompt table (the paper's pool V).
    types: list[str] = field(default_factory=_vp_types)
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
    # LoRA only: every checkpoint also holds merged/, the adapters merged into the base weights
    # with the processor (a from_pretrained folder that inference loads without peft).
    export_merged: bool = False
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


def synthetic_seed(cfg: Config) -> int:
    """The synthetic generator's seed for the training clips (``data.synthetic_seed``)."""
    return cfg.data.synthetic_seed if cfg.data.synthetic_seed >= 0 else cfg.seed


def heldout_seed(cfg: Config) -> int:
    """The synthetic generator's seed for the held-out clips (``data.heldout_seed``)."""
    return cfg.data.heldout_seed if cfg.data.heldout_seed >= 0 else cfg.seed + 7919


# Checks across fields, run once all overrides are applied.
def _validate(cfg: Config) -> None:
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"config key {key!r}: {msg}")

    need(cfg.data.nframes >= 1, "data.nframes", f"must be >= 1, got {cfg.data.nframes}")
    need(bool(cfg.output_dir.strip()), "output_dir", "must name a folder (an empty one would write into "
         "the current folder)")
    need(cfg.data.num_workers >= 0, "data.num_workers", f"must be >= 0 (0 decodes in the main process), "
         f"got {cfg.data.num_workers}")
    need(cfg.data.min_pixels >= 1, "data.min_pixels", f"must be >= 1, got {cfg.data.min_pixels}")
    need(cfg.data.max_pixels >= 28 * 28, "data.max_pixels", f"must be >= 784 (one 28 x 28 patch), "
         f"got {cfg.data.max_pixels}")
    need(cfg.data.synthetic_samples >= 1, "data.synthetic_samples", "must be >= 1")
    need(cfg.data.heldout_samples >= 0, "data.heldout_samples", "must be >= 0 (0 = no held-out check)")
    need(cfg.data.synthetic_seed >= -1, "data.synthetic_seed", f"must be >= 0, or -1 for the run's seed, "
         f"got {cfg.data.synthetic_seed}")
    need(cfg.data.heldout_seed >= -1, "data.heldout_seed", f"must be >= 0, or -1 for seed + 7919, "
         f"got {cfg.data.heldout_seed}")
    if cfg.data.dataset == "synthetic" and cfg.data.heldout_samples:
        source = ("data.synthetic_seed" if cfg.data.synthetic_seed >= 0
                  else "seed, as data.synthetic_seed is -1")
        need(synthetic_seed(cfg) != heldout_seed(cfg), "data.synthetic_seed",
             f"the training clips' seed ({synthetic_seed(cfg)}, from {source}) is the held-out clips' "
             "seed (data.heldout_seed): the held-out check would score clips the model trains on")
    need(cfg.rollout.prompts_per_step >= 1, "rollout.prompts_per_step",
         f"must be >= 1, got {cfg.rollout.prompts_per_step}")
    for key in ("sft_steps", "rl_steps"):
        n = getattr(cfg.optim, key)
        need(n == -1 or n >= 1, f"optim.{key}", f"must be -1 (one epoch) or >= 1, got {n}")
    need(cfg.optim.eps > 0, "optim.eps", f"must be > 0 (AdamW's denominator term), got {cfg.optim.eps}")
    need(cfg.optim.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {cfg.optim.weight_decay}")
    need(cfg.dist.timeout_s >= 1, "dist.timeout_s", f"must be >= 1 second, got {cfg.dist.timeout_s}")
    lora, tiny = cfg.model.lora, cfg.model.tiny
    need(lora.r >= 1 and lora.alpha > 0, "model.lora.r", "LoRA rank must be >= 1 and alpha > 0")
    need(0 <= lora.dropout < 1, "model.lora.dropout", f"must be in [0, 1), got {lora.dropout}")
    need(bool(lora.target_modules), "model.lora.target_modules", "must name at least one module")
    need(min(tiny.hidden_size, tiny.num_layers, tiny.num_heads, tiny.num_kv_heads, tiny.vision_depth,
             tiny.vision_hidden_size) >= 1, "model.tiny", "sizes must be >= 1")
    need(tiny.hidden_size % tiny.num_heads == 0 and tiny.num_heads % tiny.num_kv_heads == 0, "model.tiny",
         "hidden_size must be a multiple of num_heads, and num_heads of num_kv_heads")
    need(cfg.data.max_prompt_tokens >= 1, "data.max_prompt_tokens", "must be >= 1")
    need(cfg.data.min_frames >= 1, "data.min_frames", f"must be >= 1, got {cfg.data.min_frames}")
    for i, src in enumerate(cfg.data.sources):
        need(bool(src.match), f"data.sources[{i}].match", "must be a non-empty glob on the record's source")
        need(bool(src.media), f"data.sources[{i}].media", f"must name the folder of source {src.match!r}'s files")
    need(cfg.data.min_pixels <= cfg.data.max_pixels, "data.min_pixels",
         f"{cfg.data.min_pixels} exceeds data.max_pixels {cfg.data.max_pixels}")
    need(cfg.rollout.num_generations >= 2, "rollout.num_generations",
         f"group-normalised advantages need >= 2 rollouts, got {cfg.rollout.num_generations}")
    need(cfg.rollout.temperature > 0, "rollout.temperature", "must be > 0")
    need(0 < cfg.rollout.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {cfg.rollout.top_p}")
    need(cfg.rollout.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
    fn_module, _, fn_attr = cfg.reward.fn.replace(":", ".").rpartition(".")
    need(bool(fn_module) and fn_attr.isidentifier(), "reward.fn",
         f"must be a dotted path package.module:function, got {cfg.reward.fn!r}")
    need(cfg.reward.sigma is None or cfg.reward.sigma > 0, "reward.sigma", "must be > 0 or null")
    need(cfg.reward.tau >= 0, "reward.tau", "must be >= 0")
    need(cfg.loss.eps_low >= 0 and cfg.loss.eps_high >= 0, "loss.eps_low", "clip range must be >= 0")
    need(cfg.loss.eps_low < 1, "loss.eps_low", "must be < 1 (the ratio's lower clip is 1 - eps_low)")
    need(cfg.loss.beta >= 0, "loss.beta", "must be >= 0")
    need(cfg.loss.sd_alpha >= 0, "loss.sd_alpha", "must be >= 0")
    need(cfg.loss.updates_per_rollout >= 1, "loss.updates_per_rollout", "must be >= 1")
    need(math.isfinite(cfg.loss.sft_answer_weight) and cfg.loss.sft_answer_weight > 0,
         "loss.sft_answer_weight", f"must be a finite number > 0, got {cfg.loss.sft_answer_weight}")
    from visioncoach.vp.spec import clip_required, selector_mode_ok, vp_spec, vp_types

    sel = cfg.vp.selector
    need(selector_mode_ok(sel), "vp.selector",
         f"must be model, gating, random, none or fixed:<{'|'.join(vp_types())}>, got {sel!r}")
    if cfg.stage in ("rl", "sft+rl"):
        need(sel != "model" or bool(cfg.vp.selector_path), "vp.selector_path",
             "is required when vp.selector is 'model' (train one with `python -m "
             "visioncoach.selector.train`, or pick gating, random, fixed:<type> or none)")
        fixed = sel[len("fixed:"):] if sel.startswith("fixed:") else None
        need(fixed is None or not vp_spec(fixed).needs_clip or bool(cfg.vp.clip_path), "vp.clip_path",
             f"is required for vp.selector {sel}: " + clip_required(str(fixed), "vp.clip_path"))
    # Set for another selector it would be silently unused.
    need(not cfg.vp.selector_base_model or sel == "model", "vp.selector_base_model",
         f"only applies to vp.selector=model (a trained VP-Selector's base model), not {sel!r}")
    bad = [t for t in cfg.vp.types if t not in vp_types()]
    need(not bad, "vp.types", f"unknown visual prompt type(s) {bad}; known: {list(vp_types())}")
    need(cfg.vp.top_n >= 1, "vp.top_n", "must be >= 1")
    if cfg.vp.hard_mode == "percentile":
        need(0 <= cfg.vp.hard_threshold <= 100, "vp.hard_threshold",
             "is a percentile in [0, 100] when vp.hard_mode is percentile")
    if cfg.vp.hard_mode == "relative":
        need(0 < cfg.vp.hard_threshold <= 1, "vp.hard_threshold",
             "is a fraction in (0, 1] of the attainable reward when vp.hard_mode is relative "
             f"(the paper's 2.21 of 4 is 0.5525), got {cfg.vp.hard_threshold}")
    comps = cfg.reward.components
    known = ("accuracy", "format", "temporal", "spatial")
    need(bool(comps) and all(c in known for c in comps) and len(set(comps)) == len(comps),
         "reward.components", f"must be distinct names out of {list(known)} (at least one), got {comps}")
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
    return typed_config.parse_args(argv, USAGE.format(default=DEFAULT_CONFIG,
                                                      sections=", ".join(f.name for f in dataclasses.fields(Config))))


def load_config(argv: Optional[list[str]] = None, *, config_file: Optional[str | Path] = None) -> Config:
    """Defaults <- YAML file (``--config``, else the embedded tiny config) <- overrides."""
    argv = list(argv or [])
    cli_file, overrides, _ = parse_args(argv)
    cfg = Config()
    apply_yaml(cfg, cli_file or config_file or DEFAULT_CONFIG)
    for key, value, source in overrides:
        typed_config.set_value(cfg, key, value, source, from_cli=True)
    _validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
