"""The stage harness: what every training stage shares, around its one ``train_step``.

``StageRunner``: AdamW, warm-up + cosine (or linear/constant) schedule, gradient
averaging across ranks, clipping, a deterministic resumable data position, atomic
checkpoints (``checkpoints/<stage>/``), per-step JSONL metrics with per-phase timings,
tokens/s and peak memory, and non-finite steps skipped (and counted; several in a row stop
the run with a clear message).

Stages: SFT cold start (``visioncoach.trainer.sft.SFTRunner``: token NLL of the reference
reasoning) and RL (``visioncoach.trainer.rl.RLRunner``: VisionCoach Algorithm 1). Per-step
metrics go through ``visioncoach.trainer.metrics.StepLog``.

Gradients are averaged with one all-reduce per bucket after the backward
(``visioncoach.utils.dist.allreduce_gradients``) rather than by DistributedDataParallel:
the losses run the language model's submodules directly (prompt prefill shared by G
rollouts, hidden states into the fused LM-head kernel), which bypasses DDP's forward and
with it DDP's gradient hooks.
"""

from __future__ import annotations

import abc
import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist

from visioncoach.data.loader import ClipDataset, FailureCounter, SampleFailure, make_loader, split_failures
from visioncoach.processor import fit_prompt_budget
from visioncoach.rewards.records import RewardTargets
from visioncoach.trainer.checkpoint import (latest_checkpoint, load_checkpoint, safe_load, save_checkpoint,
                                            temp_name)
from visioncoach.trainer.distributed import (attach_logprob_head, engine_kind, full_parameters,
                                             initialize_deepspeed, register_head_weight,
                                             is_zero3, release_deepspeed)
from visioncoach.trainer.lockstep import StandIn, most_usable
from visioncoach.trainer.metrics import StepLog
from visioncoach.utils.dist import allreduce_gradients
from visioncoach.utils.profiling import StepProfiler, peak_memory_gb

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    pass


def lr_lambda(kind: str, total: int, warmup: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant" or total <= warmup:
            return 1.0
        p = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * p)) if kind == "cosine" else 1.0 - p
    return f


class StageRunner(abc.ABC):
    """Shared harness of a training stage; subclasses define ``stage`` and ``train_step``."""

    stage = ""

    def __init__(self, cfg, dist_info, model, tokenizer, dataset, out_dir: Path, *, lr: float,
                 steps: int, updates_per_step: int = 1, pixels: tuple[int, int] | None = None,
                 processor=None):
        self.cfg, self.dist, self.tokenizer, self.dataset = cfg, dist_info, tokenizer, dataset
        # Saved with every checkpoint, so its model folder loads for inference on its own.
        self.processor = processor
        self.out_dir = out_dir
        self.model = model
        o = cfg.optim
        self.params = [p for p in model.parameters() if p.requires_grad]
        # fused: one kernel over all parameters (CPU and CUDA), several times faster than the
        # per-tensor loop for a model with a 151,936-row embedding and LM head.
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay, fused=True)
        per_epoch = max(1, math.ceil(len(dataset) / dist_info.world_size / self.batch_size))
        self.steps = steps if steps > 0 else per_epoch
        self.steps_per_epoch = per_epoch
        updates = self.steps * updates_per_step
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(o.scheduler, updates, int(o.warmup_ratio * updates)))
        self.ds = None   # the DeepSpeed engine, when dist.engine resolves to deepspeed
        if engine_kind(cfg.dist, dist_info.world_size if dist_info.backend else 1) == "deepspeed":
            attach_logprob_head(model)
            self.ds = initialize_deepspeed(model, self.optimizer, self.scheduler, cfg)
            register_head_weight(model)
        self.clips = ClipDataset(dataset, cfg.data.nframes, backend=cfg.data.decoder,
                                 targets=RewardTargets(pixels) if pixels else None)
        self.failures = FailureCounter()
        self.step = 0
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.empty_steps = 0   # steps no rank had a usable sample for (``skip_step``)
        self.stand_in = StandIn(self.clips, lambda s: fit_prompt_budget(s, self.tokenizer, cfg.data))
        self.metrics_path = out_dir / "metrics.jsonl"
        self.ckpt_dir = out_dir / "checkpoints" / self.stage

    @property
    def batch_size(self) -> int:
        return self.cfg.data.batch_size

    # -- data ------------------------------------------------------------------------------
    def _batches(self):
        """Endless batches from the resumable position (epoch, batch within epoch)."""
        cfg = self.cfg
        while True:
            epoch, within = divmod(self.step, self.steps_per_epoch)
            loader = make_loader(self.clips, batch_size=self.batch_size, rank=self.dist.rank,
                                 world=self.dist.world_size, shuffle=cfg.data.shuffle, seed=cfg.seed,
                                 num_workers=cfg.data.num_workers)
            loader.sampler.set_epoch(epoch, start=within * self.batch_size)
            for batch in loader:
                yield batch
                if self.step % self.steps_per_epoch == 0:
                    break  # epoch boundary: rebuild the permutation for the next epoch

    def usable(self, batch) -> list:
        """The batch's decoded samples, each fitted to the prompt budget (``data.max_prompt_tokens``);
        failures and samples that cannot fit are counted in ``self.failures``."""
        out = []
        for s in split_failures(batch, self.failures):
            try:
                out.append(fit_prompt_budget(s, self.tokenizer, self.cfg.data))
            except ValueError as exc:
                self.failures.add(SampleFailure(s.index, s.record["id"], str(exc)))
        return out

    def zero_loss(self) -> torch.Tensor:
        """A loss of 0 touching every trainable parameter: a rank whose samples all failed
        still joins the gradient all-reduce with the same tensors as the others."""
        return sum(p.sum() * 0.0 for p in self.params)

    def agree(self, samples: list, fill: bool = True) -> tuple[int, object]:
        """Collective, once per step (``visioncoach.trainer.lockstep``): the most usable samples
        any rank has (0: every rank skips the step), and under ZeRO-3, where this rank has fewer
        (``fill=False``: none), a stand-in sample to run with weight 0 (else None)."""
        most = most_usable(len(samples), self.dist)
        self.stand_in.see(samples)
        short = most > len(samples) and (fill or not samples)
        return most, self.stand_in.get() if short and is_zero3(self.model) else None

    def skip_step(self, phase, reason: str) -> dict:
        """A step no rank has a usable sample for: no forward, no optimizer or schedule step
        (the data position still moves on). Logged with loss null and ``reason``, counted, and
        kept out of the loss and reward averages (they read steps with a loss / rewards)."""
        self.step += 1
        self.empty_steps += 1
        if self.dist.is_main:
            log.warning("%s step %d skipped: %s on any rank (%d such step(s) so far)", self.stage,
                        self.step, reason, self.empty_steps)
        return {"stage": self.stage, "step": self.step, "loss": None, "skipped": reason,
                "empty_steps": self.empty_steps, "lr": self.scheduler.get_last_lr()[0],
                "grad_norm": None, "tokens": 0, "tokens_per_s": 0.0, **phase.metrics(),
                "peak_mem_gb": peak_memory_gb(self.dist.device), "samples_skipped": self.failures.total}

    # -- one optimizer update ----------------------------------------------------------------
    def update(self, loss: torch.Tensor) -> tuple[bool, torch.Tensor, float]:
        """Backward, average gradients over ranks, clip, and step unless anything is
        non-finite on any rank. Returns (applied, grad norm, lr used)."""
        if self.ds is not None:
            return self._update_deepspeed(loss)
        loss.backward()
        allreduce_gradients(self.params, self.dist.world_size if self.dist.backend else 1)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
        if self.dist.backend is not None:
            flag = finite.to(torch.float32)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = flag > 0
        # One host read per update, after the backward: whether to apply it at all.
        ok = bool(finite)
        lr = self.scheduler.get_last_lr()[0]
        if ok:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return self._count_nonfinite(ok), grad_norm, lr

    def _update_deepspeed(self, loss: torch.Tensor) -> tuple[bool, torch.Tensor, float]:
        """DeepSpeed reduces, clips (``gradient_clipping``) and steps; it skips an update whose
        gradients overflow (non-finite) and then does not advance the schedule. A non-finite
        loss on any rank skips the backward on all of them."""
        flag = torch.isfinite(loss.detach()).to(torch.float32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        lr = self.scheduler.get_last_lr()[0]
        ok = bool(flag > 0)
        grad_norm = torch.tensor(float("nan"))
        if ok:
            self.ds.backward(loss)
            self.ds.step()
            ok = not bool(getattr(self.ds.optimizer, "overflow", False))
            norm = self.ds.get_global_grad_norm()
            grad_norm = torch.as_tensor(norm if norm is not None else float("nan"), dtype=torch.float32)
        return self._count_nonfinite(ok), grad_norm, lr

    def _count_nonfinite(self, ok: bool) -> bool:
        if ok:
            self.nonfinite_in_row = 0
            return True
        self.nonfinite_in_row += 1
        self.nonfinite_total += 1
        log.warning("%s step %d: non-finite loss or gradient, update skipped (%d in a row)",
                    self.stage, self.step + 1, self.nonfinite_in_row)
        if self.nonfinite_in_row >= self.cfg.optim.max_nonfinite_steps:
            raise NonFiniteError(
                f"{self.nonfinite_in_row} non-finite updates in a row in stage {self.stage!r} "
                f"(config key 'optim.max_nonfinite_steps'); last good checkpoint: "
                f"{latest_checkpoint(self.ckpt_dir)}")
        return False

    @abc.abstractmethod
    def train_step(self, batch) -> dict:
        """One step on ``batch`` (a list of ``ClipSample | SampleFailure``); its metrics."""

    # -- checkpoints -------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        """JSON state saved with the checkpoint (beyond weights, optimizer, scheduler, RNG);
        ``layout``: how the optimizer state is kept (a resume under another one re-maps it)."""
        return {"stage": self.stage, "step": self.step, "layout": self.layout()}

    def layout(self) -> dict:
        from visioncoach.trainer.reshard import layout_of

        return layout_of(self.ds, self.cfg.dist.zero_stage, self.dist.world_size if self.dist.backend else 1)

    def load_trainer_state(self, state: dict) -> None:
        self.step = int(state["step"])

    def save(self) -> Path | None:
        """Checkpoint (atomic, see ``checkpoint.save_checkpoint``). Under DeepSpeed every rank
        first writes its optimizer/parameter partitions into a staging folder that moves into
        the checkpoint, and ZeRO-3 gathers the weights for the transformers-loadable copy
        (written by rank 0 with the processor, and the merged LoRA export when asked for)."""
        if self.dist.backend is not None:
            dist.barrier()
        path = None
        staging = None
        if self.ds is not None:
            # Named after rank 0 (pid, host), so a later run knows when it is a dead writer's.
            name = [temp_name("deepspeed", self.step) if self.dist.is_main else None]
            dist.broadcast_object_list(name, src=0)
            staging = self.ckpt_dir / name[0]
            self.ds.save_checkpoint(str(staging), tag="state", save_latest=False)
            dist.barrier()
        with full_parameters(self.model):
            if self.dist.is_main:
                names = [n for n, p in self.model.named_parameters() if p.requires_grad]
                path = save_checkpoint(self.ckpt_dir, self.model, None if self.ds else self.optimizer,
                                       None if self.ds else self.scheduler, self.trainer_state(),
                                       extra={"param_names": names},
                                       move_in={"deepspeed": staging} if staging else None,
                                       keep=self.cfg.log.keep_checkpoints, processor=self.processor,
                                       export_merged=self.cfg.log.export_merged)
                log.info("checkpoint %s", path)
        if self.dist.backend is not None:
            dist.barrier()
        return path

    def maybe_resume(self, resume: str) -> bool:
        """Load ``resume`` (a checkpoint path, or ``auto`` = this stage's latest); True if loaded."""
        if not resume:
            return False
        ckpt = latest_checkpoint(self.ckpt_dir) if resume == "auto" else Path(resume)
        if ckpt is None:
            log.info("resume=auto: no %s checkpoint in %s, starting the stage fresh", self.stage,
                     self.ckpt_dir)
            return False
        from visioncoach.trainer import reshard

        saved, current = reshard.checkpoint_layout(ckpt), self.layout()
        if reshard.needs_reshard(saved, current):
            log.warning("resuming %s, written by %s, with %s: weights, AdamW moments and step, "
                        "schedule and RNG re-mapped from its consolidated state; the data position "
                        "is the step (the rest of the epoch in another order when the process "
                        "count differs)", ckpt, reshard.describe(saved), reshard.describe(current))
            names = [n for n, p in self.model.named_parameters() if p.requires_grad]
            state = reshard.apply_full_state(self, ckpt, reshard.read_full_state(ckpt, names))
        elif self.ds is not None:
            # DeepSpeed restores weights, optimizer partitions and the schedule; we restore RNG.
            # Its loader unpickles with weights_only=False: ours (weights_only=True) instead.
            self.ds.checkpoint_engine.load = lambda path, map_location=None: safe_load(
                path, map_location, deepspeed=True)
            self.ds.load_checkpoint(str(ckpt / "deepspeed"), tag="state", load_optimizer_states=True,
                                    load_lr_scheduler_states=True)
            state = load_checkpoint(ckpt, None, None, None)
        else:
            state = load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler)
        if state.get("stage", self.stage) != self.stage:
            raise ValueError(f"checkpoint {ckpt} is from stage {state.get('stage')!r}, "
                             f"not {self.stage!r} (config key 'log.resume')")
        self.load_trainer_state(state)
        log.info("resumed %s from %s at step %d", self.stage, ckpt, self.step)
        return True

    # -- the stage ---------------------------------------------------------------------------
    def progress_fields(self, history: list[dict]) -> dict:
        """What the progress bar shows: the running loss over the last 10 steps."""
        recent = [m["loss"] for m in history[-10:] if m.get("loss") is not None]
        return {"loss": f"{sum(recent) / len(recent):.3f}"} if recent else {}

    def log_step(self, m: dict) -> None:
        log.info("%s step %d/%d loss %s lr %.2e grad %s tok/s %.0f", self.stage, m["step"],
                 self.steps, f"{m['loss']:.4f}" if m.get("loss") is not None else "skipped",
                 m["lr"], f"{m['grad_norm']:.3f}" if m.get("grad_norm") is not None else "-",
                 m["tokens_per_s"])

    def run(self) -> list[dict]:
        history = []
        batches = self._batches()
        main = self.dist.is_main
        prof = StepProfiler(self.cfg.log.profile_steps, self.out_dir / "profile", self.stage, enabled=main)
        steplog = StepLog(self, enabled=main)
        try:
            while self.step < self.steps:
                index = self.step
                prof.before(index)
                m = self.train_step(next(batches))
                prof.after(index)
                history.append(m)
                steplog.write(m, history)
                if self.step % self.cfg.log.checkpoint_every == 0 or self.step == self.steps:
                    self.save()
        finally:
            steplog.close()
        if self.ds is not None:
            # The stage is over: remove DeepSpeed's hooks from the model, so the next stage's
            # engine is the only one managing it (two ZeRO-3 engines would both release params).
            release_deepspeed(self.ds, self.model)
            self.ds = None
        if self.failures.total:
            log.warning("%s: %s", self.stage, self.failures.summary())
        return history
