"""Entry point: ``torchrun --nproc_per_node=N -m visioncoach.train [--config FILE] [--key=value ...]``.

Start-up: config validation (before any model is built), the process group, the run folder
claimed (``trainer.runfolder``: its lock, leftovers of killed runs, the resume checkpoints
checked), the dataset (the
bundled synthetic one is generated on first use) validated up front, the policy and
processor, and a preflight that checks that every rank built identical weights and that the
data path works end to end on this machine (the first sample is decoded, turned into model
inputs and run forward and backward). Then the stages of ``stage``: the SFT cold start
(``visioncoach.trainer.sft.SFTRunner``) and RL, VisionCoach Algorithm 1
(``visioncoach.trainer.rl.RLRunner``) with the reward function of ``reward.fn``.

With the synthetic dataset, a held-out synthetic set (``data.heldout_samples`` clips of
another seed) is rolled out greedily, without visual prompts (as the paper evaluates), before
and after each stage: ``summary.json`` records the mean of every reward component under
``heldout`` (``before_sft``, ``after_sft``, ``before_rl``, ``after_rl``), and the format
reward around SFT also as ``heldout_format_before_sft`` / ``_after_sft``. RL's summary is the mean reward per component over its
first and last steps, over every segment of a resumed run (from ``metrics.jsonl``).
``--log.resume=auto`` continues the last stage that has a checkpoint (an RL checkpoint means
SFT is done).
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from pathlib import Path

from collections import Counter

import torch

from visioncoach import config as config_lib
from visioncoach.trainer.checkpoint import latest_checkpoint
from visioncoach.utils.files import write_text_atomic

log = logging.getLogger("visioncoach.train")


def _setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stdout,
                        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")


def param_checksum(model: torch.nn.Module) -> torch.Tensor:
    """[2] float64: sum and sum of squares of all parameters (cheap cross-rank identity check)."""
    from visioncoach.trainer.distributed import full_parameters

    s = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad(), full_parameters(model):   # ZeRO-3: gathered (collective)
        for p in model.parameters():
            x = p.detach().to("cpu", torch.float64)
            s[0] += x.sum()
            s[1] += (x * x).sum()
    return s


def prepare_dataset(cfg, dist_info, sft: bool | None = None):
    """The STGR dataset of ``data.dataset`` (``data.stgr.load_configured``). ``sft``: require
    SFT reasoning in every record (default: unless the stage is RL only)."""
    from visioncoach.data.stgr import load_configured

    return load_configured(cfg.data, config_lib.synthetic_seed(cfg), sft=cfg.stage != "rl" if sft is None else sft,
                           dist_info=dist_info)


def _heldout_set(cfg, dist_info):
    """Synthetic records of another seed (none of the training clips), for the held-out check."""
    if cfg.data.dataset != "synthetic" or cfg.data.heldout_samples == 0:
        return None
    from visioncoach.data.loader import ClipDataset
    from visioncoach.data.stgr import load_stgr
    from visioncoach.rewards.records import RewardTargets
    from visioncoach.data.synthetic import ensure_synthetic

    import torch.distributed as dist

    seed = config_lib.heldout_seed(cfg)
    n, tasks = cfg.data.heldout_samples, cfg.data.synthetic_tasks
    if dist_info.is_main:
        ensure_synthetic(n, seed, tasks=tasks)
    if dist_info.backend is not None:
        dist.barrier()
    data = load_stgr(ensure_synthetic(n, seed, tasks=tasks), sft=False)
    clips = ClipDataset(data, cfg.data.nframes, backend=cfg.data.decoder,
                        targets=RewardTargets((cfg.data.min_pixels, cfg.data.max_pixels)))
    return [c for c in (clips[i] for i in range(len(clips))) if hasattr(c, "frames")]


def heldout_rewards(model, tokenizer, samples, cfg, reward_fn, progress: float = 1.0) -> dict[str, float]:
    """Mean of each reward component over greedy answers to ``samples`` (``ClipSample`` with
    reward records), raw inputs (no visual prompt). ``progress``: training progress for the
    temporal sigma schedule (1.0: the final, strictest sigma, so numbers taken at different
    points of training are comparable)."""
    from visioncoach.processor import sample_inputs
    from visioncoach.rewards.components import REWARD_KEYS, check_rewards
    from visioncoach.rollout.generate import generate_group

    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    was_training = model.training
    model.eval()
    texts = []
    for s in samples:
        inputs = sample_inputs(s, s.frames.to(next(model.parameters()).device), s.record["question"],
                               tokenizer, cfg.data)
        g = generate_group(model, inputs, 1, max_new_tokens=cfg.rollout.max_new_tokens, greedy=True,
                           eos_token_ids=[e for e in eos if e is not None],
                           pad_token_id=tokenizer.pad_token_id, logprobs=False)
        texts.append(tokenizer.decode(g.tokens[0, :int(g.lengths[0])].tolist(), skip_special_tokens=True))
    model.train(was_training)
    rewards = reward_fn(texts, [s.reward_record for s in samples], cfg.reward, progress=progress)
    # The same contract check as RL's, so a broken reward.fn is named here too, not a KeyError.
    check_rewards(rewards, len(texts), f"the reward function (config key 'reward.fn' = {cfg.reward.fn!r})")
    return {k: round(float(rewards[k].float().mean()), 4) for k in REWARD_KEYS}


def _heldout_check(summary, when: str, model, tokenizer, heldout, cfg, reward_fn) -> None:
    """``summary["heldout"][when]``: the held-out means per component (logged)."""
    means = heldout_rewards(model, tokenizer, heldout, cfg, reward_fn)
    summary["heldout"] = {**summary.get("heldout", {}), when: means}
    if when.endswith("_sft"):   # the key the format check has always had
        summary[f"heldout_format_{when}"] = means["format"]
    log.info("held-out rewards %s (%d synthetic clips, greedy, no visual prompt): %s", when.replace("_", " "),
             len(heldout), means)


def rl_summary(history: list[dict], steps: int) -> dict:
    """Mean reward per component over the first and the last fifth of the RL steps."""
    from visioncoach.rewards.components import REWARD_KEYS

    rows = [m for m in history if "reward_total" in m]
    k = max(1, len(rows) // 5)
    mean = lambda part, key: sum(m[f"reward_{key}"] for m in part) / max(1, len(part))  # noqa: E731
    return {"steps": steps, "window": k,
            "reward": {key: {"first": round(mean(rows[:k], key), 4), "last": round(mean(rows[-k:], key), 4)}
                       for key in REWARD_KEYS},
            "eligible_frac": round(sum(m.get("eligible_frac", 1.0) for m in rows) / max(1, len(rows)), 4),
            "hard_frac": round(sum(m["hard_frac"] for m in rows) / max(1, len(rows)), 4),
            "vp_counts": dict(sum((Counter(m.get("vp_counts", {})) for m in rows), Counter())),
            "vp_rollouts": sum(m.get("vp_rollouts", 0) for m in rows),
            "sd_rows": sum(m.get("sd_rows", 0) for m in rows)}


def ranks_identical(model, dist_info) -> bool:
    """True when every rank holds the same weights (checksums compared exactly)."""
    import torch.distributed as dist

    checksum = param_checksum(model)
    if dist_info.backend is None or dist_info.world_size == 1:
        return True
    gathered = [torch.zeros_like(checksum) for _ in range(dist_info.world_size)]
    dist.all_gather(gathered, checksum)
    same = all(torch.equal(g, checksum) for g in gathered)
    if not same:
        log.error("ranks hold different weights after training: %s", [g.tolist() for g in gathered])
    return same


PREFLIGHT_SAMPLES = 8


def preflight(model, tokenizer, dataset, cfg, dist_info) -> dict:
    """Checks every rank holds the same weights and that the data path runs end to end: the
    first of the first ``PREFLIGHT_SAMPLES`` records that loads goes through the training
    path (decode, prompt budget, model inputs) and one forward and backward. Records that
    fail here are said; only when none of them loads does the run stop."""
    import torch.distributed as dist

    from visioncoach.data.loader import ClipDataset, SampleFailure
    from visioncoach.processor import fit_prompt_budget, sample_inputs

    checksum = param_checksum(model)
    if dist_info.backend is not None:
        gathered = [torch.zeros_like(checksum) for _ in range(dist_info.world_size)]
        dist.all_gather(gathered, checksum)
        for r, other in enumerate(gathered):
            if not torch.allclose(other, checksum, rtol=1e-12, atol=0):
                raise RuntimeError(f"rank {r} built different weights than rank {dist_info.rank} "
                                   f"(checksums {other.tolist()} vs {checksum.tolist()})")
    t0 = time.perf_counter()
    clips = ClipDataset(dataset, cfg.data.nframes, backend=cfg.data.decoder)
    failed, sample = [], None
    for i in range(min(len(dataset), PREFLIGHT_SAMPLES)):
        s = clips[i]
        try:
            if isinstance(s, SampleFailure):
                raise ValueError(s.reason)
            sample = fit_prompt_budget(s, tokenizer, cfg.data)
            break
        except ValueError as exc:
            failed.append(f"{dataset.where(i)}: {dataset.records[i]['id']}: {exc}")
    if failed:
        log.warning("preflight: %d record(s) could not be prepared (they will be skipped and "
                    "counted in training): %s", len(failed), "; ".join(failed))
    if sample is None:
        raise RuntimeError(f"preflight: none of the first {len(failed)} records could be prepared: "
                           + "; ".join(failed))
    model_inputs = sample_inputs(sample, sample.frames.to(dist_info.device), sample.record["question"],
                                 tokenizer, cfg.data)
    data_s = time.perf_counter() - t0
    inputs = model_inputs.tensors
    t0 = time.perf_counter()
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - t0
    loss = float(out.loss.detach())  # start-up only: the training loop never syncs per step
    if not torch.isfinite(torch.tensor(loss)):
        raise RuntimeError(f"preflight forward gave a non-finite loss ({loss})")
    return {"ranks_identical": True, "param_sum": checksum[0].item(), "sample": sample.record["id"],
            "frames": int(sample.frames.shape[0]), "frame_size": model_inputs.frame_size,
            "tokens": int(inputs["input_ids"].numel()), "decode_prep_s": round(data_s, 3),
            "loss": loss, "fwd_bwd_s": round(elapsed, 3), "records_failed": len(failed)}


def check_paths(cfg) -> None:
    """Every file or folder the config names exists: a ``ConfigError`` naming the key, before
    anything is built (a missing dataset, resume path or selector would otherwise surface
    after the model is loaded, or, for the selector, after the whole SFT stage)."""
    def need(ok: bool, key: str, what: str, value) -> None:
        if not ok:
            raise config_lib.ConfigError(f"config key {key!r}: {what} {value} not found")

    d = cfg.data
    if d.dataset != "synthetic":
        need(Path(d.dataset).is_file(), "data.dataset", "dataset file", d.dataset)
    for key in ("video_root", "key_frame_root"):
        if getattr(d, key):
            need(Path(getattr(d, key)).is_dir(), f"data.{key}", "folder", getattr(d, key))
    for i, src in enumerate(d.sources):
        need(Path(src.media).is_dir(), f"data.sources[{i}].media", "folder", src.media)
        if src.key_frames:
            need(Path(src.key_frames).is_dir(), f"data.sources[{i}].key_frames", "folder", src.key_frames)
    if cfg.stage in ("rl", "sft+rl") and cfg.vp.selector == "model":
        meta = Path(cfg.vp.selector_path) / "selector.json"
        need(meta.is_file(), "vp.selector_path", "trained VP-Selector (its selector.json)", meta)
        from visioncoach.selector.model import check_selector

        try:   # its metadata and base model too, without loading anything
            check_selector(cfg.vp.selector_path, base_model=cfg.vp.selector_base_model or None,
                           base_flag="vp.selector_base_model")
        except (FileNotFoundError, ValueError) as exc:
            raise config_lib.ConfigError(f"config key 'vp.selector_path': {exc}") from None
    if cfg.vp.clip_path:
        need(Path(cfg.vp.clip_path).is_dir(), "vp.clip_path", "CLIP checkpoint folder", cfg.vp.clip_path)
    if cfg.log.resume not in ("", "auto"):
        need(Path(cfg.log.resume).is_dir(), "log.resume", "checkpoint folder", cfg.log.resume)


def _run_stages(cfg, dist_info, reward_fn, t_start: float) -> int:
    """The stages, after start-up: its own frame, so that the model, engines and runners are
    unreferenced once it returns (see ``main``'s shutdown)."""
    from visioncoach.models.policy import build_policy
    from visioncoach.ops import native_info
    from visioncoach.trainer.lockstep import empty_steps   # steps no rank had a sample for
    from visioncoach.trainer.runfolder import RunSummary, stage_rows

    torch.manual_seed(cfg.seed)
    log.info("world size %d, backend %s, device %s", dist_info.world_size, dist_info.backend,
             dist_info.device)
    log.info("native ops: %s", native_info())
    out_dir = Path(cfg.output_dir)
    if dist_info.is_main:
        write_text_atomic(out_dir / "config.yaml", config_lib.to_yaml(cfg))
    dataset = prepare_dataset(cfg, dist_info)
    log.info("dataset %s: %d records (%d skipped: media missing; %d skipped: invalid)",
             dataset.path, len(dataset), len(dataset.missing_videos), len(dataset.skipped))
    model, processor, info = build_policy(cfg.model, cfg.data, dist_info.device, seed=cfg.seed)
    report = preflight(model, processor.tokenizer, dataset, cfg, dist_info)
    log.info("preflight: %s", report)
    summary = RunSummary(cfg, dist_info.is_main, t0=t_start)   # summary.json, across resumes
    # Every rank evaluates the held-out set (same samples, same result): under ZeRO-3 the
    # forward passes gather parameters collectively.
    heldout = _heldout_set(cfg, dist_info)
    rl_ckpt = cfg.log.resume and latest_checkpoint(out_dir / "checkpoints" / "rl") is not None
    if cfg.stage in ("sft", "sft+rl") and not rl_ckpt:
        from visioncoach.trainer.sft import SFTRunner

        # A resumed run keeps its first segment's number (measured on the same fresh init).
        if heldout is not None and "heldout_format_before_sft" not in summary:
            _heldout_check(summary, "before_sft", model, processor.tokenizer, heldout, cfg, reward_fn)
        runner = SFTRunner(cfg, dist_info, model, processor.tokenizer, dataset, out_dir,
                           processor=processor)
        runner.maybe_resume(cfg.log.resume)
        rows = stage_rows(runner, runner.run())
        history = [m for m in rows if m["loss"] is not None]
        if history:
            k = max(1, len(history) // 5)
            summary["sft"] = {"steps": runner.step, "empty_steps": empty_steps(rows),
                              "loss_first": sum(m["loss"] for m in history[:k]) / k,
                              "loss_last": sum(m["loss"] for m in history[-k:]) / k}
        if heldout is not None:
            _heldout_check(summary, "after_sft", model, processor.tokenizer, heldout, cfg, reward_fn)
        del runner
    if cfg.stage in ("rl", "sft+rl"):
        from visioncoach.trainer.checkpoint import load_weights
        from visioncoach.trainer.rl import RLRunner

        sft_ckpt = latest_checkpoint(out_dir / "checkpoints" / "sft")
        if rl_ckpt and cfg.stage == "sft+rl" and sft_ckpt is not None:
            # SFT was skipped: its final weights are RL's starting point (and reference policy).
            load_weights(sft_ckpt, model)

        rl_data = dataset if cfg.stage == "rl" else prepare_dataset(cfg, dist_info, sft=False)
        runner = RLRunner(cfg, dist_info, model, processor.tokenizer, rl_data, out_dir,
                          reward_fn=reward_fn, processor=processor)
        runner.maybe_resume(cfg.log.resume)
        if heldout is not None and "before_rl" not in summary.get("heldout", {}):
            if cfg.stage == "sft+rl" and not rl_ckpt:   # the model SFT just finished with
                summary["heldout"] = {**summary["heldout"], "before_rl": summary["heldout"]["after_sft"]}
            else:
                _heldout_check(summary, "before_rl", model, processor.tokenizer, heldout, cfg, reward_fn)
        history = stage_rows(runner, runner.run())   # every segment's steps
        if heldout is not None:
            _heldout_check(summary, "after_rl", model, processor.tokenizer, heldout, cfg, reward_fn)
        summary["rl"] = {**rl_summary(history, runner.step), "empty_steps": empty_steps(history)}
        log.info("RL: mean reward per component, first -> last steps: %s", summary["rl"]["reward"])
    summary["ranks_identical_after_training"] = ranks_identical(model, dist_info)
    summary.finish()   # wall_time_s: summed over the segments, each from its start-up
    if dist_info.is_main:
        log.info("summary: %s (metrics in %s)", summary, out_dir / "metrics.jsonl")
    return 0


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    argv = sys.argv[1:] if argv is None else argv
    try:
        _, _, print_config = config_lib.parse_args(argv)
        cfg = config_lib.load_config(argv)
        if print_config:
            print(config_lib.to_yaml(cfg), end="")
            return 0
        from visioncoach.rewards.components import load_reward_fn, with_components

        # reward.components applied once, here: RL and the held-out check see the same total.
        reward_fn = with_components(load_reward_fn(cfg.reward.fn), cfg.reward.components)
        if cfg.model.path:
            from visioncoach.models.resolve import ModelDirError, resolve_model_dir

            try:
                resolve_model_dir(cfg.model.path)
            except ModelDirError as exc:
                raise config_lib.ConfigError(f"config key 'model.path': {exc}") from None
        check_paths(cfg)
    except (config_lib.ConfigError, ValueError) as exc:
        print(f"visioncoach.train: config error: {exc}", file=sys.stderr)
        return 2

    from visioncoach.utils.dist import init_distributed, shutdown

    dist_info = init_distributed(cfg.dist)
    _setup_logging(dist_info.rank)
    if not (cfg.log.progress and dist_info.is_main):
        # transformers' own bars ("Writing model shards", "Loading weights") too, not only ours.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    from visioncoach.trainer.runfolder import StartupError, claim_run_folder

    lock = None
    try:
        try:   # one owner per output_dir, its leftovers cleaned, resume checkpoints checked
            lock = claim_run_folder(cfg, dist_info)
        except StartupError as exc:
            if dist_info.is_main:
                print(f"visioncoach.train: error: {exc}", file=sys.stderr)
            return 2
        return _run_stages(cfg, dist_info, reward_fn, t_start)
    finally:
        if lock is not None:
            lock.release()
        # With _run_stages' frame gone, collecting the cycles among the model, engines and
        # runners drops the last references to the process group, so destroy_process_group
        # frees it (and joins gloo's worker threads) now, not during interpreter shutdown,
        # where that aborted a rank now and then ("terminate called without an active
        # exception", SIGABRT after a completed run).
        gc.collect()
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
