"""RL stage: VisionCoach Algorithm 1 (paper section 3.2, eqs. 1-2).

For each prompt x = (video, question) of a rank's batch (B prompts):

 1. G rollouts on the raw input (``visioncoach.rollout``: one vision-encoder pass, one
    prefill), rewards R_g (eq. 4, ``reward.fn``, one batched call for all B*G texts) and group
    advantages A_g = (R_g - mean R) / (std R + 1e-4), std unbiased (as TRL).
 2. hard(x) = 1[mean R < k]: k absolute (``vp.hard_threshold``, paper 2.21), or, with
    ``vp.hard_mode=percentile``, the k-th percentile of the running distribution of
    per-prompt mean rewards (every rank's prompts of every step so far, this step included),
    or (``relative``) k x the most x's task can score. Only prompts on which a type the
    chooser may pick can be drawn are eligible (``vp.hard_eligible``; ``eligible_frac``).
 3. Hard prompts only: the chooser (``vp.selector``) picks a visual prompt v, drawn on the key
    frames with its hint appended to the question (x' = VP(x; v), q + hint(v); ``visioncoach.vp``);
    G rollouts on x'; candidates C = {g : R'_g > mean R} (mean of the *raw* rollouts; by
    default with R = mean(r_spa, r_tmp, r_acc), ``vp.candidate_reward``); S = the
    top-N of C by answer reward R'_acc (ties: earlier rollout); C empty -> no distillation.
 4. One ``gspo_sd_loss`` call over the rows [raw rollouts of every prompt ; S rollouts]:

        L = (1/B) sum_x [ (1/G) sum_g (GSPO_g + beta KL_g)
                          + alpha 1[S_x != {}] (1/|S_x|) sum_{j in S_x} NLL(y'_j | x', q') ]

    The NLL conditions on the prompted input (Algorithm 1 line 16; ``loss.sd_condition=raw``:
    on x, q instead).

The rules (advantages, the bar k, C and S, the gating choice, the row weights) are the pure
functions of ``visioncoach.algorithm``; this module runs them in order.

``loss.updates_per_rollout`` = mu optimizer updates per rollout batch, each recomputing the
policy log-probs; the old log-probs are the sampler's, recorded at rollout time. With mu = 1
the old policy is the current one, so the GSPO ratio is identically 1 (old = logp.detach(),
the reference implementation's situation): only the advantage-weighted gradient acts and the
clip never does.

The vision tower is not trained in RL: its features are computed once per input (under
no_grad) and reused by the rollouts, the policy pass and the reference pass; the language
model (all its layers and embeddings) is.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch

from visioncoach import algorithm
from visioncoach.data.loader import ClipSample
from visioncoach.kernels.gspo_sd_loss import gspo_sd_loss
from visioncoach.models.access import vision_tower
from visioncoach.processor import ModelInputs, resize_frames, sample_inputs
from visioncoach.rewards.components import (ACCURACY, FORMAT, REWARD_KEYS, SPATIAL, TEMPORAL,
                                            TOTAL, check_rewards, with_components)
from visioncoach.rollout.forcing import completion_hidden_states
from visioncoach.rollout.generate import RolloutGroup, generate_group
from visioncoach.rollout.prompt import prompt_embeds
from visioncoach.trainer.distributed import (gathered_for_generation, is_zero3, reference_policy,
                                             token_logprobs)
from visioncoach.trainer.harness import StageRunner
from visioncoach.trainer.lockstep import NO_USABLE_SAMPLE, pad_to_common_count, stand_in_rollout
from visioncoach.trainer.running_stats import RunningStats
from visioncoach.utils.profiling import Phases, peak_memory_gb
from visioncoach.vp.chooser import VPChooser
from visioncoach.vp.prompting import eligible, prompted_inputs

log = logging.getLogger(__name__)

__all__ = ["RLRunner", "build_chooser", "Group", "Rows", "PromptResult", "RunningStats"]


@dataclass
class Group:
    """G rollouts of one model input, scored."""
    inputs: ModelInputs
    rollout: RolloutGroup
    texts: list[str]
    rewards: dict[str, torch.Tensor] = field(default_factory=dict)   # each [G] float32


@dataclass
class Rows:
    """Loss rows that share one input: all G rollouts of a raw group, or the S of a prompted one."""
    group: Group
    tokens: torch.Tensor      # [g, T] int64
    lengths: torch.Tensor     # [g]
    old_logp: torch.Tensor    # [g, T] the sampler's log-probs (0 at padding)


@dataclass
class PromptResult:
    sample: ClipSample
    raw: Group
    advantages: torch.Tensor                 # [G]
    eligible: bool = True                    # a type the chooser may pick renders on it
    hard: bool = False
    vp_type: str | None = None
    prompted: Group | None = None
    candidates: list[int] = field(default_factory=list)
    distill: list[int] = field(default_factory=list)
    padding: bool = False                    # a ZeRO-3 stand-in (trainer/lockstep.py), weight 0


def build_chooser(vp_cfg, seed: int, rank: int, device: torch.device, have_heatmaps: bool) -> VPChooser:
    """The ``VPChooser`` of ``vp.selector``, with the trained VP-Selector loaded (frozen) from
    ``vp.selector_path`` for ``model`` (on the base model ``vp.selector_base_model`` when set,
    else its selector.json's; the selector logs which it loaded). A selector that cannot be
    loaded is a ``ConfigError`` naming the key to change."""
    selector = None
    if vp_cfg.selector == "model" and vp_cfg.selector_path:
        from visioncoach.config import ConfigError
        from visioncoach.models.resolve import ModelDirError, resolve_model_dir
        from visioncoach.selector import Selector

        override = vp_cfg.selector_base_model
        if override and override != "tiny":
            try:
                resolve_model_dir(override)
            except ModelDirError as exc:
                raise ConfigError(f"config key 'vp.selector_base_model': {exc}") from None
        kw = {"base_model": override, "base_flag": "vp.selector_base_model"} if override else {}
        try:
            selector = Selector(vp_cfg.selector_path, device=device, **kw)
        except (FileNotFoundError, ValueError) as exc:   # ModelDirError is a FileNotFoundError
            raise ConfigError(f"config key 'vp.selector_path': {exc}") from None
    return VPChooser(vp_cfg, seed, rank, have_heatmaps, selector=selector)


class RLRunner(StageRunner):
    """VisionCoach Algorithm 1 for ``optim.rl_steps`` rollout batches (``rollout.prompts_per_step``
    prompts per rank each), ``loss.updates_per_rollout`` optimizer updates per batch.

    Components: ``reward_fn`` (``reward.fn``, default ``rewards.score``), ``ref_model`` (the
    frozen reference policy; None with LoRA, whose adapters are disabled instead, or beta 0),
    ``chooser`` (the visual prompt of a hard prompt), ``heatmap_fn`` (CLIP relevance maps, with
    ``vp.clip_path``) and ``stats`` (running statistics over all ranks)."""

    stage = "rl"

    def __init__(self, cfg, dist_info, model, tokenizer, dataset, out_dir, *, ref_model=None,
                 reward_fn=None, processor=None):
        # RL does not train the vision tower (see the module docstring): frozen explicitly, so
        # the optimizer holds no state for it and weight decay never touches it.
        vision_tower(model).requires_grad_(False)
        self.lora = hasattr(model, "disable_adapter")
        self.ref_model = None
        if cfg.loss.beta > 0 and not self.lora:
            # Full fine-tuning: a frozen copy of the starting policy (under ZeRO-3 partitioned
            # like it), taken before DeepSpeed partitions the policy.
            self.ref_model = ref_model if ref_model is not None else reference_policy(model, cfg, dist_info)
            self.ref_model.requires_grad_(False).eval()
        super().__init__(cfg, dist_info, model, tokenizer, dataset, out_dir, lr=cfg.optim.lr,
                         steps=cfg.optim.rl_steps, updates_per_step=cfg.loss.updates_per_rollout,
                         pixels=(cfg.data.min_pixels, cfg.data.max_pixels), processor=processor)
        if reward_fn is None:
            from visioncoach.rewards import score as reward_fn
        self.reward_fn = with_components(reward_fn, cfg.reward.components)   # total = the enabled sum
        # One prompt prefill shared by the G rows calls the language model twice in one graph
        # (prefill, then the completions on its cache), which ZeRO-3's parameter release
        # breaks in the backward; there the G rows run as one plain forward instead.
        self.share_prompt = not is_zero3(model)
        self.heatmap_fn = None
        if cfg.vp.clip_path:
            from visioncoach.vp.heatmap import clip_heatmap_fn

            self.heatmap_fn = clip_heatmap_fn(cfg.vp.clip_path, device=dist_info.device)
        self.chooser = build_chooser(cfg.vp, cfg.seed, dist_info.rank, dist_info.device,
                                     self.heatmap_fn is not None)
        self.eos = [i for i in (tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id)
                    if i is not None]
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]
        self.stats = RunningStats(dist_info)

    @property
    def batch_size(self) -> int:
        return self.cfg.rollout.prompts_per_step

    # -- the step ------------------------------------------------------------------------------
    def train_step(self, batch) -> dict:
        phase = Phases("rl")
        with phase("data"):
            samples = self.usable(batch)
            # Collective, ranks decide the same; a stand-in only without any prompt (loss_rows
            # evens out the group counts).
            most, pad = self.agree(samples, fill=False)
        if not most:
            return self.skip_step(phase, NO_USABLE_SAMPLE)
        # Every rank collects, even with no sample left: the running statistics are gathered.
        results = self.collect(samples, self.step / max(1, self.steps), phase, stand_in=pad)
        real = [r for r in results if not r.padding]
        mu = self.cfg.loss.updates_per_rollout
        if results:
            groups, adv, gw, sw = self.loss_rows(results)
            with phase("ref_logprobs"):
                ref = self.reference_logprobs(groups)
                # Off-policy after the first update: ratios against the sampler's log-probs.
                old = self.sampler_logprobs(groups) if mu > 1 else None
        losses, grad_norms, stats_acc, n_tok = [], [], {}, 0
        self.model.train()
        for _ in range(mu):
            with phase("policy_logprobs"):
                if results:
                    loss, stats, mask = self.loss(groups, adv, gw, sw, old, ref)
                    n_tok = n_tok + mask.sum()
                else:
                    loss, stats = self.zero_loss(), {}
            with phase("backward_optim", nvtx="rl/backward+optimizer"):
                ok, grad_norm, lr = self.update(loss)
            if ok:   # kept as tensors: read once, after the step's updates
                losses.append(loss.detach())
                grad_norms.append(grad_norm.detach())
            for k, v in stats.items():
                stats_acc[k] = stats_acc.get(k, 0.0) + v.detach() / mu
        self.step += 1
        n_tok = int(n_tok)
        busy = phase.seconds["policy_logprobs"] + phase.seconds["backward_optim"]
        return {"stage": "rl", "step": self.step, "prompts": len(real), **phase.metrics(),
                "loss": float(torch.stack(losses).mean()) if losses else None,
                "skipped_updates": mu - len(losses), "lr": lr,
                "grad_norm": float(torch.stack(grad_norms).mean()) if grad_norms else None,
                "tokens": n_tok, "tokens_per_s": n_tok / max(busy, 1e-9),
                "peak_mem_gb": peak_memory_gb(self.dist.device), "samples_skipped": self.failures.total,
                **{k: float(v) for k, v in stats_acc.items()}, **self.step_metrics(real)}

    def collect(self, samples: list[ClipSample], progress: float, phase: Phases | None = None,
                stand_in: ClipSample | None = None) -> list[PromptResult]:
        """Phases 1-3 of Algorithm 1 for this rank's prompts: rollouts, rewards, hard flags,
        visual prompts, re-rollouts, candidates and the distillation set."""
        cfg, dev = self.cfg, self.dist.device
        phase = phase or Phases("rl")
        gen = torch.Generator(device=dev).manual_seed(
            (cfg.seed * 1_000_003 + self.dist.rank) * 1_000_003 + self.step)
        with phase("prep"):
            resized = [resize_frames(s.frames.to(dev), cfg.data.min_pixels, cfg.data.max_pixels)
                       for s in samples]
            raw_inputs = [sample_inputs(s, f, s.record["question"], self.tokenizer, cfg.data)
                          for s, f in zip(samples, resized)]
        with gathered_for_generation(self.ds, self.model):
            with phase("rollout"):
                raw = [self._rollouts(x, gen) for x in raw_inputs]
            with phase("reward"):
                self._score(raw, [s.reward_record for s in samples], progress)
            results = [PromptResult(s, g, algorithm.group_advantages(g.rewards[TOTAL]))
                       for s, g in zip(samples, raw)]
            self.mark_hard(results)
            if self.chooser.active and any(r.hard for r in results):
                self.prompt_hard(results, resized, gen, progress, phase)
            if stand_in is not None:   # ZeRO-3, no prompt on this rank (trainer/lockstep.py)
                results.append(PromptResult(stand_in, Group(*stand_in_rollout(self, stand_in), []),
                                            torch.zeros(cfg.rollout.num_generations), padding=True))
        return results

    def _rollouts(self, inputs: ModelInputs, generator: torch.Generator) -> Group:
        r = self.cfg.rollout
        grp = generate_group(self.model, inputs, r.num_generations, max_new_tokens=r.max_new_tokens,
                             temperature=r.temperature, top_p=r.top_p, eos_token_ids=self.eos,
                             pad_token_id=self.pad, generator=generator,
                             compile_decode=r.compile_decode)
        lengths = grp.lengths.tolist()
        texts = self.tokenizer.batch_decode([row[:n] for row, n in zip(grp.tokens.tolist(), lengths)],
                                            skip_special_tokens=True)
        return Group(inputs, grp, texts)

    def _score(self, groups: list[Group], records: list, progress: float) -> None:
        """One batched reward call for all groups; fills ``group.rewards``."""
        if not groups:
            return
        texts = [t for g in groups for t in g.texts]
        recs = [rec for g, rec in zip(groups, records) for _ in g.texts]
        r = self.reward_fn(texts, recs, self.cfg.reward, progress)
        check_rewards(r, len(texts), f"the reward function (config key 'reward.fn' = {self.cfg.reward.fn!r})")
        k = 0
        for g in groups:
            n = len(g.texts)
            g.rewards = {key: r[key][k:k + n].float().cpu() for key in REWARD_KEYS}
            k += n

    def mark_hard(self, results: list[PromptResult]) -> None:
        """Algorithm 1 line 6, against the running statistics (this step included), for the
        prompts a visual prompt can be drawn on (``vp.hard_eligible``)."""
        vp, means = self.cfg.vp, [float(r.raw.rewards[TOTAL].mean()) for r in results]
        self.stats.add(means, [{k: float(r.raw.rewards[k].mean()) for k in (TEMPORAL, SPATIAL)}
                               for r in results])
        for r in results:
            r.eligible = vp.hard_eligible == "all" or eligible(
                r.sample, self.chooser.may_pick, all_frames=vp.numpro_frames == "all")
        att = [algorithm.attainable_reward(r.sample.reward_record, self.cfg.reward.components)
               if vp.hard_mode == "relative" else 0.0 for r in results]
        flags = algorithm.hard_flags(vp.hard_mode, vp.hard_threshold, means, self.stats.mean_history,
                                     [r.eligible for r in results], att)
        for r, h in zip(results, flags):
            r.hard = h

    def prompt_hard(self, results: list[PromptResult], resized: list[torch.Tensor],
                    gen: torch.Generator, progress: float, phase: Phases) -> None:
        """Algorithm 1 lines 7-14 for the hard prompts: choose and draw the visual prompt,
        re-roll on it, score, and pick the candidates C and the distilled set S."""
        cfg = self.cfg
        hard = [i for i, r in enumerate(results) if r.hard]
        with phase("vp"):
            raw_means = [{k: float(results[i].raw.rewards[k].mean()) for k in (TEMPORAL, SPATIAL)}
                         for i in hard]
            types = self.chooser.choose(self.step, [results[i].sample for i in hard], raw_means,
                                        self.stats.averages())
            prompted = {}
            for i, v in zip(hard, types):
                results[i].vp_type = v
                x = prompted_inputs(results[i].sample, resized[i], v, self.tokenizer, cfg.data,
                                    darken_factor=cfg.vp.darken_factor, heatmap_fn=self.heatmap_fn,
                                    all_frames=cfg.vp.numpro_frames == "all")
                if x is not None:
                    prompted[i] = x
        with phase("rollout", nvtx="rl/vp_rollout"):
            for i, x in prompted.items():
                results[i].prompted = self._rollouts(x, gen)
        with phase("reward"):
            self._score([results[i].prompted for i in prompted],
                        [results[i].sample.reward_record for i in prompted], progress)
        for i in prompted:
            r = results[i]
            rule = cfg.vp.candidate_reward      # C compares like with like: raw mean of the same score
            r.candidates, r.distill = algorithm.select_distill(
                float(algorithm.candidate_score(r.raw.rewards, rule).mean()), r.prompted.rewards,
                cfg.vp.top_n, rule)

    # -- the loss ------------------------------------------------------------------------------
    def loss_rows(self, results: list[PromptResult]):
        """The rows of the one loss call, grouped by input (``Rows``), and per-row advantages,
        GSPO weights and SD weights [N]: raw rollouts of every prompt, then distilled ones."""
        groups = [Rows(r.raw, r.raw.rollout.tokens, r.raw.rollout.lengths, r.raw.rollout.logprobs)
                  for r in results]
        adv = [r.advantages for r in results]
        for r in results:
            if r.distill:
                ro = r.prompted.rollout
                sel = torch.tensor(r.distill, device=ro.tokens.device)
                cond = algorithm.distill_input(self.cfg.loss.sd_condition, r.raw, r.prompted)
                groups.append(Rows(cond, ro.tokens[sel], ro.lengths[sel], ro.logprobs[sel]))
                adv.append(torch.zeros(len(r.distill)))
        gw, sw = algorithm.loss_row_weights(len(results), self.cfg.rollout.num_generations,
                                            [len(r.distill) for r in results], self.cfg.loss.sd_alpha)
        adv = torch.cat(adv)
        if results[0].padding:   # a ZeRO-3 stand-in, this rank's only group: weight 0
            gw, sw = gw * 0, sw * 0
        if is_zero3(self.model):   # same number of passes on every rank (trainer/lockstep.py)
            groups, adv, gw, sw = pad_to_common_count(groups, adv, gw, sw, self.dist)
        dev = self.dist.device
        return groups, adv.to(dev), gw.to(dev), sw.to(dev)

    def token_logprobs(self, model, groups: list[Rows], *, ref: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, T] log pi(token) of every row (0 past its length) through the fused LM-head
        kernel, and the mask [N, T]. ``ref``: ``model`` is the reference copy, whose prompt
        embeddings are rebuilt around the same (frozen) vision features."""
        T = max(int(g.tokens.shape[1]) for g in groups)
        out = []
        for g in groups:
            prompt = g.group.rollout.prompt
            if ref and model is not self.model:
                prompt = prompt_embeds(model, g.group.inputs, g.group.rollout.vision)
            h = completion_hidden_states(model, prompt, g.tokens, g.lengths,      # [g, t, D]
                                         share_prompt=self.share_prompt)
            lp = token_logprobs(model, h, g.tokens)                              # [g, t] fp32
            out.append(torch.nn.functional.pad(lp, (0, T - lp.shape[1])))
        logp = torch.cat(out)                                                    # [N, T]
        lengths = torch.cat([g.lengths for g in groups])
        mask = torch.arange(T, device=logp.device)[None, :] < lengths[:, None]
        return torch.where(mask, logp, torch.zeros_like(logp)), mask

    def reference_logprobs(self, groups: list[Rows]) -> torch.Tensor | None:
        if self.cfg.loss.beta <= 0:
            return None
        with torch.no_grad():
            if self.lora:
                with self.model.disable_adapter():
                    return self.token_logprobs(self.model, groups, ref=True)[0]
            return self.token_logprobs(self.ref_model, groups, ref=True)[0]

    @staticmethod
    def sampler_logprobs(groups: list[Rows]) -> torch.Tensor:
        """[N, T] the log-probs recorded at rollout time (the old policy of GSPO's ratio)."""
        T = max(int(g.tokens.shape[1]) for g in groups)
        return torch.cat([torch.nn.functional.pad(g.old_logp, (0, T - g.old_logp.shape[1])) for g in groups])

    def loss(self, groups, adv, gw, sw, old, ref):
        """(loss, stats, mask) of the current policy on the rows."""
        logp, mask = self.token_logprobs(self.model, groups)
        loss, stats = gspo_sd_loss(logp, old, ref, adv, mask, gw, sw, eps_low=self.cfg.loss.eps_low,
                                   eps_high=self.cfg.loss.eps_high, beta=self.cfg.loss.beta)
        return loss, stats, mask

    # -- metrics -------------------------------------------------------------------------------
    def step_metrics(self, results: list[PromptResult]) -> dict:
        """Reward components, hard fraction, VP counts and gains (paper Fig. 4a), SD sizes; with
        ``vp.selector=model``, the selector's outputs this step and how many of them became raw
        because they named no label (``selector_unmapped``) or a type this run cannot render
        (``selector_unrenderable``)."""
        out = self.chooser.selector_metrics()
        if not results:
            return out
        for k in REWARD_KEYS:
            out[f"reward_{k}"] = float(torch.cat([r.raw.rewards[k] for r in results]).mean())
        out["eligible_frac"] = sum(r.eligible for r in results) / len(results)
        out["hard_frac"] = sum(r.hard for r in results) / len(results)
        out["vp_counts"] = dict(Counter(r.vp_type for r in results if r.vp_type))
        gains: dict[str, list[float]] = {}
        for r in results:
            if r.prompted is not None:
                gains.setdefault(r.vp_type, []).append(
                    float(r.prompted.rewards[TOTAL].mean() - r.raw.rewards[TOTAL].mean()))
        out["vp_gain"] = {k: sum(v) / len(v) for k, v in gains.items()}
        out["vp_rollouts"] = sum(r.prompted is not None for r in results)
        out["sd_candidates"] = sum(len(r.candidates) for r in results)
        out["sd_rows"] = sum(len(r.distill) for r in results)
        return out

    def progress_fields(self, history: list[dict]) -> dict:
        """The running raw-rollout reward (last 10 steps) and hard fraction."""
        recent = [m for m in history[-10:] if f"reward_{TOTAL}" in m]
        if not recent:
            return {}
        return {"reward": f"{sum(m[f'reward_{TOTAL}'] for m in recent) / len(recent):.3f}",
                "hard": f"{sum(m['hard_frac'] for m in recent) / len(recent):.2f}"}

    def log_step(self, m: dict) -> None:
        r = {k: m.get(f"reward_{k}", 0.0) for k in REWARD_KEYS}
        log.info("rl step %d/%d reward %.3f (acc %.2f fmt %.2f tmp %.2f spa %.2f) hard %.2f vp %s "
                 "sd %d loss %s clip %.3f kl %.4f", m["step"], self.steps, r[TOTAL], r[ACCURACY],
                 r[FORMAT], r[TEMPORAL], r[SPATIAL], m.get("hard_frac", 0.0), m.get("vp_counts", {}),
                 m.get("sd_rows", 0), f"{m['loss']:.4f}" if m.get("loss") is not None else "skipped",
                 m.get("clip_frac", 0.0), m.get("kl_mean", 0.0))

    # -- checkpoints ---------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {**super().trainer_state(), **self.stats.state()}

    def load_trainer_state(self, state: dict) -> None:
        super().load_trainer_state(state)
        self.stats.load(state)
