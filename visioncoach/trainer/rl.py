"""RL stage: VisionCoach Algorithm 1 (paper section 3.2, eqs. 1-2).

For each prompt x = (video, question) of a rank's batch (B prompts):

 1. G rollouts on the raw input (``visioncoach.rollout``: one vision-encoder pass, one
    prefill), rewards R_g (eq. 4, ``visioncoach.rewards.score``, one batched call for all B*G
    texts) and group advantages A_g = (R_g - mean R) / (std R + 1e-4), std unbiased (as TRL).
 2. hard(x) = 1[mean R < k]: k absolute (``vp.hard_threshold``, paper 2.21), or, with
    ``vp.hard_mode=percentile``, the k-th percentile of the running distribution of
    per-prompt mean rewards (every rank's prompts of every step so far, this step included).
 3. Hard prompts only: the selector picks a visual prompt v, rendered on the key frames
    (``kernels.vp_render``) with its hint appended to the question (x' = VP(x; v), q + hint(v));
    G rollouts on x'; candidates C = {g : R'_g > mean R} (mean of the *raw* rollouts); S = the
    top-N of C by answer reward R'_acc (ties: earlier rollout); C empty -> no distillation.
 4. One ``gspo_sd_loss`` call over the rows [raw rollouts of every prompt ; S rollouts]:

        L = (1/B) sum_x [ (1/G) sum_g (GSPO_g + beta KL_g)
                          + alpha 1[S_x != {}] (1/|S_x|) sum_{j in S_x} NLL(y'_j | x', q') ]

    i.e. gspo_weight = 1/(B G) on raw rows, sd_weight = alpha/(B |S_x|) on distilled rows (eq. 2
    averaged over the batch). The NLL conditions on the prompted input (Algorithm 1 line 16).

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
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from visioncoach.data.loader import ClipSample, split_failures
from visioncoach.kernels.gspo_sd_loss import gspo_sd_loss
from visioncoach.kernels.vp_render import render_vp
from visioncoach.processor import ModelInputs, build_inputs, resize_frames
from visioncoach.prompts import user_text
from visioncoach.rewards import score
from visioncoach.rewards.records import Record
from visioncoach.rollout.engine import (RolloutGroup, _base, completion_hidden_states,
                                        generate_group, prompt_embeds)
from visioncoach.trainer.engine import (frozen_copy, gathered_for_generation, is_zero3,
                                        token_logprobs)
from visioncoach.trainer.loop import StageRunner, _peak_mem_gb
from visioncoach.utils.profiling import nvtx_range
from visioncoach.vp.hints import add_hint

log = logging.getLogger(__name__)

REWARD_KEYS = ("accuracy", "format", "temporal", "spatial", "total")
ADV_EPS = 1e-4
# A decoded key frame is matched to the record's annotated key frame nearest in time, if
# within this many seconds (decoders land on the frame nearest the requested time).
KEY_FRAME_MATCH_S = 1.0


# ----------------------------------------------------------------------------- pieces


def group_advantages(total: torch.Tensor) -> torch.Tensor:
    """[G] -> (R - mean) / (std + 1e-4), unbiased std (0 for G = 1)."""
    std = total.std() if total.numel() > 1 else total.new_zeros(())
    return (total - total.mean()) / (std + ADV_EPS)


def hard_threshold(mode: str, k: float, history: list[float]) -> float:
    """The bar a prompt's mean reward must reach not to be hard (Algorithm 1 line 6)."""
    if mode == "absolute":
        return k
    # percentile of the running distribution (linear interpolation, numpy's default)
    xs = sorted(history)
    if not xs:
        return -math.inf
    pos = (len(xs) - 1) * k / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def select_distill(raw_mean: float, prompted: dict[str, torch.Tensor], top_n: int) -> tuple[list[int], list[int]]:
    """C = {g : R'_g > mean R} and S = top-N of C by answer reward (stable: earlier first)."""
    total = prompted["total"].tolist()
    acc = prompted["accuracy"].tolist()
    cand = [g for g, r in enumerate(total) if r > raw_mean]
    chosen = sorted(cand, key=lambda g: (-acc[g], g))[:top_n]
    return cand, sorted(chosen)


class VPChooser:
    """The visual prompt of each hard prompt, by ``vp.selector``:

    * ``fixed:<type>``: always that type.
    * ``gating`` (appendix D.3): frame numbers (``numpro``) when the prompt's temporal reward is
      below the running average, darkening when its spatial reward is; when both (or neither)
      are, the larger shortfall decides (ties: ``darken``).
    * ``random``: uniform over ``vp.types`` (seeded by seed, rank and step).
    * ``model``: the trained VP-Selector (``visioncoach.selector.Selector``), frozen.
    * ``none``: no visual prompting (plain GSPO; hard prompts are only counted).
    """

    def __init__(self, vp_cfg, seed: int, rank: int, device: torch.device, has_heatmap: bool):
        self.mode = vp_cfg.selector
        self.seed, self.rank = seed, rank
        self.types = [t for t in vp_cfg.types if t != "api_prompt" or has_heatmap]
        if not self.types:
            raise ValueError("config key 'vp.types': no usable visual prompt type "
                             "(api_prompt needs vp.clip_path)")
        self.fixed = self.mode.split(":", 1)[1] if self.mode.startswith("fixed:") else None
        if self.fixed == "api_prompt" and not has_heatmap:
            raise ValueError("config key 'vp.selector' is fixed:api_prompt, which needs a CLIP "
                             "checkpoint in 'vp.clip_path'")
        self.selector = None
        if self.mode == "model":
            if not vp_cfg.selector_path:
                raise ValueError("config key 'vp.selector' is 'model' but 'vp.selector_path' is empty: "
                                 "train one with `python -m visioncoach.selector.train`, or use "
                                 "gating, random, fixed:<type> or none")
            from visioncoach.selector import Selector

            self.selector = Selector(vp_cfg.selector_path, device=device)

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def choose(self, step: int, samples: list[ClipSample], raw: list[dict[str, float]],
               averages: dict[str, float]) -> list[str]:
        """One VP type per hard prompt; ``raw[i]``: mean raw reward components of prompt i."""
        if self.fixed is not None:
            return [self.fixed] * len(samples)
        if self.mode == "gating":
            out = []
            for r in raw:
                short_t = averages["temporal"] - r["temporal"]
                short_s = averages["spatial"] - r["spatial"]
                out.append("numpro" if short_t > short_s else "darken")
            return out
        if self.mode == "random":
            rng = random.Random(hash((self.seed, self.rank, step)))
            return [rng.choice(self.types) for _ in samples]
        from visioncoach.selector import SelectorInput

        inputs = [SelectorInput(question=s.record["question"],
                                frames=s.frames[s.is_key] if s.is_key.any() else s.frames,
                                key_objects=sorted({n for f in s.reward_record.frames for n in f.names})
                                if s.reward_record is not None else ())
                  for s in samples]
        # A type this run cannot render (api_prompt without vp.clip_path) becomes raw.
        return [t if t in self.types else "raw" for t in self.selector.predict(inputs)]


def key_frame_prompt(frames: torch.Tensor, times: torch.Tensor, is_key: torch.Tensor,
                     record: Record, vp_type: str, *, darken_factor: float, heatmap_fn=None,
                     question: str = "") -> torch.Tensor | None:
    """The frames [F, h, w, 3] (already at the model's size, so ``record``'s pixel boxes apply)
    with ``vp_type`` rendered on the key frames; None when the sample offers nothing to
    render it from (no key frame among the frames, or no annotated box for darken/circle)."""
    key = is_key.nonzero().flatten()                                       # [K]
    if key.numel() == 0 or vp_type == "raw":
        return None if key.numel() == 0 else frames
    kf = frames[key]                                                       # [K, h, w, 3]
    kwargs = {}
    if vp_type in ("darken", "circle"):
        per_frame = []
        for t in times[key].tolist():
            near = min(record.frames, key=lambda f: abs(f.time - t), default=None)
            ok = near is not None and abs(near.time - t) <= KEY_FRAME_MATCH_S
            per_frame.append([b for boxes in near.boxes for b in boxes] if ok else [])
        if not any(per_frame):
            return None
        bmax = max(len(b) for b in per_frame)
        boxes = torch.zeros(len(per_frame), bmax, 4)
        for i, bs in enumerate(per_frame):
            if bs:
                boxes[i, :len(bs)] = torch.tensor(bs)
        kwargs = dict(boxes=boxes.to(frames.device),
                      box_count=torch.tensor([len(b) for b in per_frame], device=frames.device))
    elif vp_type == "numpro":
        kwargs = dict(frame_index=key + 1)      # the 1-based "Frame i" of the prompt text
    elif vp_type == "api_prompt":
        names = sorted({n for f in record.frames for n in f.names})
        kwargs = dict(heatmap=heatmap_fn(kf, [", ".join(names) if names else question]))
    out = frames.clone()
    out[key] = render_vp(kf, vp_type, darken_factor=darken_factor, **kwargs)
    return out


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
    hard: bool = False
    vp_type: str | None = None
    prompted: Group | None = None
    candidates: list[int] = field(default_factory=list)
    distill: list[int] = field(default_factory=list)


# ----------------------------------------------------------------------------- the step


class RLRunner(StageRunner):
    """VisionCoach Algorithm 1 for ``optim.rl_steps`` rollout batches (``rollout.prompts_per_step``
    prompts per rank each), ``loss.updates_per_rollout`` optimizer updates per batch."""

    stage = "rl"

    def __init__(self, cfg, dist_info, model, tokenizer, dataset, out_dir, *, ref_model=None,
                 reward_fn=None):
        # RL does not train the vision tower (see the module docstring): frozen explicitly, so
        # the optimizer holds no state for it and weight decay never touches it.
        for p in _vision_params(model):
            p.requires_grad_(False)
        self.lora = hasattr(model, "disable_adapter")
        self.ref_model = None
        if cfg.loss.beta > 0 and not self.lora:
            # Full fine-tuning: a frozen copy of the starting policy (LoRA disables adapters
            # instead), taken before DeepSpeed partitions the policy.
            self.ref_model = ref_model if ref_model is not None else frozen_copy(model)
            self.ref_model.requires_grad_(False).eval()
        super().__init__(cfg, dist_info, model, tokenizer, dataset, out_dir, lr=cfg.optim.lr,
                         steps=cfg.optim.rl_steps, updates_per_step=cfg.loss.updates_per_rollout,
                         pixels=(cfg.data.min_pixels, cfg.data.max_pixels))
        self.reward_fn = reward_fn or score
        # One prompt prefill shared by the G rows calls the language model twice in one graph
        # (prefill, then the completions on its cache), which ZeRO-3's parameter release
        # breaks in the backward; there the G rows run as one plain forward instead.
        self.share_prompt = not is_zero3(model)
        heatmap_fn = None
        if cfg.vp.clip_path:
            from visioncoach.vp.heatmap import ClipRelevance

            heatmap_fn = ClipRelevance.from_pretrained(cfg.vp.clip_path, device=dist_info.device)
        self.heatmap_fn = heatmap_fn
        self.chooser = VPChooser(cfg.vp, cfg.seed, dist_info.rank, dist_info.device, heatmap_fn is not None)
        self.eos = [i for i in (tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id)
                    if i is not None]
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]
        # Running statistics (all ranks): per-prompt mean rewards for the percentile bar, and
        # per-component sums for the gating rule's averages.
        self.mean_history: list[float] = []
        self.component_sums = {"temporal": 0.0, "spatial": 0.0, "n": 0}

    @property
    def batch_size(self) -> int:
        return self.cfg.rollout.prompts_per_step

    # -- phases ------------------------------------------------------------------------------
    def _inputs(self, sample: ClipSample, frames: torch.Tensor, question: str) -> ModelInputs:
        d = self.cfg.data
        return build_inputs(frames, sample.times, sample.duration, user_text(question, sample.record["task"]),
                            self.tokenizer, layout=d.layout, min_pixels=d.min_pixels, max_pixels=d.max_pixels)

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

    def _score(self, groups: list[Group], records: list[Record], progress: float) -> None:
        """One batched reward call for all groups; fills ``group.rewards``."""
        if not groups:
            return
        texts = [t for g in groups for t in g.texts]
        recs = [rec for g, rec in zip(groups, records) for _ in g.texts]
        r = self.reward_fn(texts, recs, self.cfg.reward, progress)
        k = 0
        for g in groups:
            n = len(g.texts)
            g.rewards = {key: r[key][k:k + n].float().cpu() for key in REWARD_KEYS}
            k += n

    def _gather(self, values: list[float]) -> list[float]:
        """This step's values of every rank, rank-major (ranks may hold different counts:
        a rank whose samples failed to decode contributes fewer)."""
        if self.dist.backend is None or self.dist.world_size == 1:
            return list(values)
        out: list = [None] * self.dist.world_size
        dist.all_gather_object(out, list(values))
        return [v for part in out for v in part]

    def collect(self, samples: list[ClipSample], progress: float) -> tuple[list[PromptResult], dict]:
        """Phases 1-3 of Algorithm 1 for this rank's prompts: rollouts, rewards, hard flags,
        visual prompts, re-rollouts, candidates and the distillation set."""
        cfg, dev = self.cfg, self.dist.device
        times: Counter = Counter()
        gen = torch.Generator(device=dev).manual_seed(
            (cfg.seed * 1_000_003 + self.dist.rank) * 1_000_003 + self.step)
        t0 = time.perf_counter()
        resized = [resize_frames(s.frames.to(dev), cfg.data.min_pixels, cfg.data.max_pixels) for s in samples]
        raw_inputs = [self._inputs(s, f, s.record["question"]) for s, f in zip(samples, resized)]
        times["prep"] += time.perf_counter() - t0

        with gathered_for_generation(self.ds, self.model):
            return self._collect(samples, progress, gen, resized, raw_inputs, times)

    def _collect(self, samples, progress, gen, resized, raw_inputs, times):
        cfg = self.cfg
        t0 = time.perf_counter()
        with nvtx_range("rl/rollout"):
            raw = [self._rollouts(x, gen) for x in raw_inputs]
        times["rollout"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        records = [s.reward_record for s in samples]
        with nvtx_range("rl/reward"):
            self._score(raw, records, progress)
        times["reward"] += time.perf_counter() - t0

        results = [PromptResult(s, g, group_advantages(g.rewards["total"])) for s, g in zip(samples, raw)]
        means = [float(g.rewards["total"].mean()) for g in raw]
        comp = [[float(g.rewards[k].mean()) for k in ("temporal", "spatial")] for g in raw]
        # Running statistics over all ranks, this step included.
        self.mean_history += self._gather(means)
        flat = self._gather([x for c in comp for x in c])
        self.component_sums["temporal"] += sum(flat[0::2])
        self.component_sums["spatial"] += sum(flat[1::2])
        self.component_sums["n"] += len(flat) // 2
        bar = hard_threshold(cfg.vp.hard_mode, cfg.vp.hard_threshold, self.mean_history)
        for res, m in zip(results, means):
            res.hard = m < bar

        hard = [i for i, res in enumerate(results) if res.hard]
        if hard and self.chooser.active:
            n = max(1, self.component_sums["n"])
            averages = {k: self.component_sums[k] / n for k in ("temporal", "spatial")}
            t0 = time.perf_counter()
            with nvtx_range("rl/vp"):
                types = self.chooser.choose(self.step, [samples[i] for i in hard],
                                            [dict(zip(("temporal", "spatial"), comp[i])) for i in hard],
                                            averages)
                prompted_inputs = {}
                for i, v in zip(hard, types):
                    s = samples[i]
                    frames = key_frame_prompt(resized[i], s.times, s.is_key, records[i], v,
                                              darken_factor=cfg.vp.darken_factor,
                                              heatmap_fn=self.heatmap_fn, question=s.record["question"])
                    results[i].vp_type = v
                    if frames is not None:
                        prompted_inputs[i] = self._inputs(s, frames, add_hint(s.record["question"], v))
            times["vp"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            with nvtx_range("rl/vp_rollout"):
                for i, x in prompted_inputs.items():
                    results[i].prompted = self._rollouts(x, gen)
            times["rollout"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            idx = list(prompted_inputs)
            self._score([results[i].prompted for i in idx], [records[i] for i in idx], progress)
            times["reward"] += time.perf_counter() - t0
            for i in idx:
                res = results[i]
                res.candidates, res.distill = select_distill(means[i], res.prompted.rewards, cfg.vp.top_n)
        return results, dict(times)

    def loss_rows(self, results: list[PromptResult]):
        """The rows of the one loss call, grouped by input (``Rows``), and per-row advantages,
        GSPO weights and SD weights [N]: raw rollouts of every prompt, then distilled ones."""
        B, G = len(results), self.cfg.rollout.num_generations
        alpha = self.cfg.loss.sd_alpha
        groups, adv, gw, sw = [], [], [], []
        for res in results:
            ro = res.raw.rollout
            groups.append(Rows(res.raw, ro.tokens, ro.lengths, ro.logprobs))
            adv.append(res.advantages)
            gw.append(torch.full((G,), 1.0 / (B * G)))
            sw.append(torch.zeros(G))
        for res in results:
            if res.distill:
                ro = res.prompted.rollout
                sel = torch.tensor(res.distill, device=ro.tokens.device)
                groups.append(Rows(res.prompted, ro.tokens[sel], ro.lengths[sel], ro.logprobs[sel]))
                k = len(res.distill)
                adv.append(torch.zeros(k))
                gw.append(torch.zeros(k))
                sw.append(torch.full((k,), alpha / (B * k)))
        if is_zero3(self.model) and self.dist.backend is not None:
            # ZeRO-3 gathers parameters per module call, collectively: every rank must run
            # the same number of policy passes, so ranks with fewer distilled groups repeat
            # their first group with zero weight.
            n = torch.tensor([len(groups)], device=self.dist.device)
            dist.all_reduce(n, op=dist.ReduceOp.MAX)
            for _ in range(int(n) - len(groups)):
                g = groups[0]
                groups.append(g)
                adv.append(torch.zeros(g.tokens.shape[0]))
                gw.append(torch.zeros(g.tokens.shape[0]))
                sw.append(torch.zeros(g.tokens.shape[0]))
        dev = self.dist.device
        return groups, torch.cat(adv).to(dev), torch.cat(gw).to(dev), torch.cat(sw).to(dev)

    def token_logprobs(self, model, groups: list["Rows"], *, ref: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
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

    def reference_logprobs(self, groups) -> torch.Tensor | None:
        if self.cfg.loss.beta <= 0:
            return None
        with torch.no_grad():
            if self.lora:
                with self.model.disable_adapter():
                    return self.token_logprobs(self.model, groups, ref=True)[0]
            return self.token_logprobs(self.ref_model, groups, ref=True)[0]

    def loss(self, groups, adv, gw, sw, old, ref):
        """(loss, stats, token count) of the current policy on the rows."""
        logp, mask = self.token_logprobs(self.model, groups)
        loss, stats = gspo_sd_loss(logp, old, ref, adv, mask, gw, sw, eps_low=self.cfg.loss.eps_low,
                                   eps_high=self.cfg.loss.eps_high, beta=self.cfg.loss.beta)
        return loss, stats, mask

    def train_step(self, batch) -> dict:
        cfg, dev = self.cfg, self.dist.device
        t_start = time.perf_counter()
        samples = split_failures(batch, self.failures)
        t_data = time.perf_counter() - t_start
        progress = self.step / max(1, self.steps)
        # Every rank collects, even with no sample left: the running statistics are gathered.
        results, times = self.collect(samples, progress)
        m = {"stage": "rl", "step": self.step + 1, "prompts": len(results), "time_data_s": t_data,
             **{f"time_{k}_s": v for k, v in times.items()}}
        mu = cfg.loss.updates_per_rollout
        losses, grad_norms, stats_acc = [], [], {}
        n_tok = 0
        if results:
            groups, adv, gw, sw = self.loss_rows(results)
            t0 = time.perf_counter()
            with nvtx_range("rl/ref_logprobs"):
                ref = self.reference_logprobs(groups)
            old = None
            if mu > 1:   # off-policy after the first update: ratios against the sampler's log-probs
                T = max(int(g.tokens.shape[1]) for g in groups)
                old = torch.cat([torch.nn.functional.pad(g.old_logp, (0, T - g.old_logp.shape[1]))
                                 for g in groups])
            m["time_ref_logprobs_s"] = time.perf_counter() - t0
        t_lp = t_bw = 0.0
        self.model.train()
        for u in range(mu):
            t0 = time.perf_counter()
            if results:
                with nvtx_range("rl/policy_logprobs"):
                    loss, stats, mask = self.loss(groups, adv, gw, sw, old, ref)
                n_tok = n_tok + mask.sum()
            else:
                loss, stats = self.zero_loss(), {}
            t1 = time.perf_counter()
            with nvtx_range("rl/backward+optimizer"):
                ok, grad_norm, lr = self.update(loss)
            t2 = time.perf_counter()
            t_lp += t1 - t0
            t_bw += t2 - t1
            if ok:   # kept as tensors: read once, after the step's updates
                losses.append(loss.detach())
                grad_norms.append(grad_norm.detach())
            for k, v in stats.items():
                stats_acc[k] = stats_acc.get(k, 0.0) + v.detach() / mu
        self.step += 1
        n_tok = int(n_tok)
        m.update(loss=float(torch.stack(losses).mean()) if losses else None,
                 skipped_updates=mu - len(losses), lr=lr,
                 grad_norm=float(torch.stack(grad_norms).mean()) if grad_norms else None,
                 time_policy_logprobs_s=t_lp, time_backward_optim_s=t_bw, tokens=n_tok,
                 tokens_per_s=n_tok / max(t_lp + t_bw, 1e-9), peak_mem_gb=_peak_mem_gb(dev),
                 samples_skipped=self.failures.total, **{k: float(v) for k, v in stats_acc.items()})
        m.update(self.step_metrics(results))
        return m

    @staticmethod
    def step_metrics(results: list[PromptResult]) -> dict:
        """Reward components, hard fraction, VP counts and gains (paper Fig. 4a), SD sizes."""
        out = {}
        if not results:
            return out
        for k in REWARD_KEYS:
            out[f"reward_{k}"] = float(torch.cat([r.raw.rewards[k] for r in results]).mean())
        out["hard_frac"] = sum(r.hard for r in results) / len(results)
        vp = Counter(r.vp_type for r in results if r.vp_type)
        out["vp_counts"] = dict(vp)
        gains: dict[str, list[float]] = {}
        for r in results:
            if r.prompted is not None:
                gains.setdefault(r.vp_type, []).append(
                    float(r.prompted.rewards["total"].mean() - r.raw.rewards["total"].mean()))
        out["vp_gain"] = {k: sum(v) / len(v) for k, v in gains.items()}
        out["vp_rollouts"] = sum(r.prompted is not None for r in results)
        out["sd_candidates"] = sum(len(r.candidates) for r in results)
        out["sd_rows"] = sum(len(r.distill) for r in results)
        return out

    def progress_fields(self, history: list[dict]) -> dict:
        """The running raw-rollout reward (last 10 steps) and hard fraction."""
        recent = [m for m in history[-10:] if "reward_total" in m]
        if not recent:
            return {}
        return {"reward": f"{sum(m['reward_total'] for m in recent) / len(recent):.3f}",
                "hard": f"{sum(m['hard_frac'] for m in recent) / len(recent):.2f}"}

    def log_step(self, m: dict) -> None:
        log.info("rl step %d/%d reward %.3f (acc %.2f fmt %.2f tmp %.2f spa %.2f) hard %.2f vp %s "
                 "sd %d loss %s clip %.3f kl %.4f", m["step"], self.steps, m.get("reward_total", 0.0),
                 m.get("reward_accuracy", 0.0), m.get("reward_format", 0.0), m.get("reward_temporal", 0.0),
                 m.get("reward_spatial", 0.0), m.get("hard_frac", 0.0), m.get("vp_counts", {}),
                 m.get("sd_rows", 0), f"{m['loss']:.4f}" if m.get("loss") is not None else "skipped",
                 m.get("clip_frac", 0.0), m.get("kl_mean", 0.0))

    # -- checkpoints -------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {**super().trainer_state(), "mean_history": self.mean_history,
                "component_sums": self.component_sums}

    def load_trainer_state(self, state: dict) -> None:
        super().load_trainer_state(state)
        self.mean_history = list(state.get("mean_history", []))
        self.component_sums = dict(state.get("component_sums", self.component_sums))


def _vision_params(model) -> list[torch.nn.Parameter]:
    return list(_base(model).visual.parameters())
