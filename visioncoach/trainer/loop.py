"""The training loop: one readable step function per stage, around a shared harness.

Harness: AdamW, warm-up + cosine (or linear/constant) schedule, gradient clipping, DDP when
launched with several processes, a deterministic resumable data position, atomic
checkpoints, per-step JSONL metrics with per-phase timings, tokens/s and peak memory, and
non-finite steps skipped (and counted; several in a row stop the run with a clear message).

Stages: SFT cold start (token NLL of the reference reasoning). The RL stage (VisionCoach
Algorithm 1) is not implemented yet.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist

from visioncoach.data.loader import ClipDataset, FailureCounter, make_loader, split_failures
from visioncoach.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from visioncoach.trainer.sft import build_sft_example, sft_loss

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


def _peak_mem_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class SFTRunner:
    """Runs ``steps`` SFT steps on ``dataset`` (an ``STGRDataset`` with reasoning), resumable."""

    def __init__(self, cfg, dist_info, model, tokenizer, dataset, out_dir: Path):
        self.cfg, self.dist, self.tokenizer, self.dataset = cfg, dist_info, tokenizer, dataset
        self.out_dir = out_dir
        self.raw_model = model
        if dist_info.backend is not None and dist_info.world_size > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[dist_info.local_rank] if dist_info.device.type == "cuda" else None)
        else:
            self.model = model
        o = cfg.optim
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=o.sft_lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay)
        per_epoch = max(1, math.ceil(len(dataset) / dist_info.world_size / cfg.data.batch_size))
        self.steps = o.sft_steps if o.sft_steps > 0 else per_epoch
        self.steps_per_epoch = per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(o.scheduler, self.steps, int(o.warmup_ratio * self.steps)))
        self.clips = ClipDataset(dataset, cfg.data.nframes, backend=cfg.data.decoder)
        self.failures = FailureCounter()
        self.step = 0
        self.nonfinite_in_row = 0
        self.metrics_path = out_dir / "metrics.jsonl"

    # -- data ------------------------------------------------------------------------------
    def _batches(self):
        """Endless batches from the resumable position (epoch, batch within epoch)."""
        cfg = self.cfg
        while True:
            epoch, within = divmod(self.step, self.steps_per_epoch)
            loader = make_loader(self.clips, batch_size=cfg.data.batch_size, rank=self.dist.rank,
                                 world=self.dist.world_size, shuffle=cfg.data.shuffle, seed=cfg.seed,
                                 num_workers=cfg.data.num_workers)
            loader.sampler.set_epoch(epoch, start=within * cfg.data.batch_size)
            for batch in loader:
                yield batch
                if self.step % self.steps_per_epoch == 0:
                    break  # epoch boundary: rebuild the permutation for the next epoch

    # -- one step --------------------------------------------------------------------------
    def train_step(self, batch) -> dict:
        cfg, dev = self.cfg, self.dist.device
        t0 = time.perf_counter()
        samples = split_failures(batch, self.failures)
        examples = [build_sft_example(s, self.tokenizer, layout=cfg.data.layout,
                                      min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels,
                                      device=dev) for s in samples]
        t1 = time.perf_counter()
        self.model.train()
        if examples:
            loss, n_tok = sft_loss(self.model, examples)
        else:  # every sample of this rank failed: contribute zero, keep collectives in step
            loss = sum(p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad)
            n_tok = 0
        loss.backward()
        t2 = time.perf_counter()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
        if self.dist.backend is not None:
            flag = finite.to(torch.float32)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = flag > 0
        # One host read per step, after the backward: whether to apply the update at all.
        ok = bool(finite)
        lr = self.scheduler.get_last_lr()[0]
        if ok:
            self.optimizer.step()
            self.nonfinite_in_row = 0
        else:
            self.nonfinite_in_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        t3 = time.perf_counter()
        self.step += 1
        if not ok:
            log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)",
                        self.step, self.nonfinite_in_row)
            if self.nonfinite_in_row >= cfg.optim.max_nonfinite_steps:
                raise NonFiniteError(
                    f"{self.nonfinite_in_row} non-finite steps in a row (config key "
                    f"'optim.max_nonfinite_steps'); last good checkpoint: {latest_checkpoint(self.out_dir)}")
        return {"stage": "sft", "step": self.step, "loss": float(loss.detach()) if ok else None,
                "skipped": not ok, "lr": lr, "grad_norm": float(grad_norm) if ok else None,
                "tokens": n_tok, "tokens_per_s": n_tok / max(t2 - t1, 1e-9),
                "time_data_s": t1 - t0, "time_fwd_bwd_s": t2 - t1, "time_optim_s": t3 - t2,
                "peak_mem_gb": _peak_mem_gb(dev), "samples_skipped": self.failures.total}

    # -- checkpoints -------------------------------------------------------------------------
    def save(self) -> Path | None:
        if self.dist.backend is not None:
            dist.barrier()
        path = None
        if self.dist.is_main:
            path = save_checkpoint(self.out_dir / "checkpoints", self.raw_model, self.optimizer,
                                   self.scheduler, {"stage": "sft", "step": self.step})
            log.info("checkpoint %s", path)
        if self.dist.backend is not None:
            dist.barrier()
        return path

    def maybe_resume(self, resume: str) -> None:
        if not resume:
            return
        ckpt = latest_checkpoint(self.out_dir / "checkpoints") if resume == "auto" else Path(resume)
        if ckpt is None:
            log.info("resume=auto: no checkpoint in %s, starting fresh", self.out_dir / "checkpoints")
            return
        state = load_checkpoint(ckpt, self.raw_model, self.optimizer, self.scheduler)
        self.step = int(state["step"])
        log.info("resumed from %s at step %d", ckpt, self.step)

    # -- the stage ---------------------------------------------------------------------------
    def run(self) -> list[dict]:
        history = []
        batches = self._batches()
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") if self.dist.is_main else _NullFile() as mf:
            while self.step < self.steps:
                m = self.train_step(next(batches))
                history.append(m)
                if self.dist.is_main:
                    mf.write(json.dumps(m) + "\n")
                    mf.flush()
                    if m["step"] % self.cfg.log.every_steps == 0:
                        log.info("sft step %d/%d loss %s lr %.2e grad %s tok/s %.0f", m["step"],
                                 self.steps, f"{m['loss']:.4f}" if m["loss"] is not None else "skipped",
                                 m["lr"], f"{m['grad_norm']:.3f}" if m["grad_norm"] is not None else "-",
                                 m["tokens_per_s"])
                if self.step % self.cfg.log.checkpoint_every == 0 or self.step == self.steps:
                    self.save()
        if self.failures.total:
            log.warning("sft: %s", self.failures.summary())
        return history


class _NullFile:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, _):
        pass

    def flush(self):
        pass
