"""The worker side of bench/bench_rl_step.py: one process per implementation and case, which
builds its side (``OursWorker``: this project's ``RLRunner``; ``TRLWorker``: TRL's
``GRPOTrainer``) and runs one RL step per "step" line from the parent, reporting per-phase wall
and CPU times, vision-encoder calls and images, tokens, prompt ids and peak RSS as JSON lines.
See bench_rl_step.py's docstring for what each side does and how the parent interleaves them.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

BETA_EXTRA = 0.04   # the paper's KL coefficient, for the beta > 0 row
PHASES = ("gen", "logprob", "bwd_opt", "reward")


class PhaseClock:
    """Wall and CPU seconds per phase name, summed over a step."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def reset(self) -> None:
        self.wall.clear()
        self.cpu.clear()

    def add(self, name: str, wall: float, cpu: float) -> None:
        self.wall[name] = self.wall.get(name, 0.0) + wall
        self.cpu[name] = self.cpu.get(name, 0.0) + cpu

    @contextmanager
    def __call__(self, name: str):
        w0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - w0, time.process_time() - c0)

    def timed(self, name: str, fn):
        def wrapper(*args, **kwargs):
            with self(name):
                return fn(*args, **kwargs)
        return wrapper


class VisionCount:
    """Calls of a vision tower and the images (rows of ``grid_thw``) they encoded."""

    def __init__(self):
        self.calls = self.images = 0

    def attach(self, tower) -> None:
        def hook(module, args, kwargs):
            grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            self.calls += 1
            # A benchmark counter, not a training path: reading the grid's row count is free.
            self.images += int(grid.shape[0]) if grid is not None else 0
        tower.register_forward_pre_hook(hook, with_kwargs=True)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # Linux: KiB


def param_checksum(model) -> float:
    import torch

    with torch.no_grad():
        return float(sum(p.detach().double().sum() for p in model.parameters()))


def bench_config(case: dict, out_dir: str):
    """This project's config for ``case``, as ``python -m visioncoach.train`` would parse it."""
    from visioncoach.config import load_config

    steps = case["steps"]
    over = {"stage": "rl", "output_dir": out_dir, "vp.selector": "none",
            "rollout.num_generations": case["G"], "rollout.max_new_tokens": case["new_tokens"],
            "loss.beta": case["beta"], "loss.updates_per_rollout": case["mu"],
            "optim.rl_steps": steps, "data.num_workers": 0,
            "log.tensorboard": "false", "log.progress": "false", "log.checkpoint_every": 10**6}
    return load_config([f"--{k}={v}" for k, v in over.items()])


def shared_setup(case: dict, out_dir: str):
    """(cfg, dataset, sample, model, processor) exactly as the RL stage builds them."""
    import torch

    from visioncoach.models.policy import build_policy
    from visioncoach.train import prepare_dataset
    from visioncoach.utils.dist import init_distributed

    cfg = bench_config(case, out_dir)
    dist_info = init_distributed(cfg.dist)
    torch.manual_seed(cfg.seed)
    dataset = prepare_dataset(cfg, dist_info)
    model, processor, _ = build_policy(cfg.model, cfg.data, dist_info.device, seed=cfg.seed)
    return cfg, dist_info, dataset, model, processor


class OursWorker:
    def __init__(self, case: dict, out_dir: str):
        from visioncoach.models.access import vision_tower
        from visioncoach.processor import fit_prompt_budget
        from visioncoach.rewards.components import load_reward_fn, with_components
        from visioncoach.trainer import rl
        from visioncoach.utils import profiling

        cfg, dist_info, dataset, model, processor = shared_setup(case, out_dir)
        self.checksum = param_checksum(model)
        reward_fn = with_components(load_reward_fn(cfg.reward.fn), cfg.reward.components)
        self.runner = rl.RLRunner(cfg, dist_info, model, processor.tokenizer, dataset, Path(out_dir),
                                  reward_fn=reward_fn, processor=processor)
        self.runner.eos = []   # no EOS stop: every completion is max_new_tokens long, as TRL's
        self.sample = fit_prompt_budget(self.runner.clips[0], processor.tokenizer, cfg.data)
        self.vision = VisionCount()
        self.vision.attach(vision_tower(model))
        if self.runner.ref_model is not None:
            self.vision.attach(vision_tower(self.runner.ref_model))
        self.tokens = 0
        rollouts = self.runner._rollouts

        def counted_rollouts(inputs, *args, **kwargs):
            group = rollouts(inputs, *args, **kwargs)
            self.tokens += int(group.rollout.lengths.sum())
            self.prompt_ids = inputs.tensors["input_ids"][0].tolist()   # what the policy was given
            return group
        self.runner._rollouts = counted_rollouts
        # The runner's own phase timer, with CPU time kept too (the bench's copy of each phase).
        clock_holder = self
        base = profiling.Phases

        class CPUPhases(base):
            def __init__(self, prefix):
                super().__init__(prefix)
                clock_holder.clock = PhaseClock()

            @contextmanager
            def __call__(self, name, nvtx=None):
                with super().__call__(name, nvtx), clock_holder.clock(name):
                    yield
        rl.Phases = CPUPhases
        self.clock = PhaseClock()
        self.prompt_ids = None

    def info(self) -> dict:
        return {"checksum": self.checksum, "frames": int(self.sample.frames.shape[0])}

    def step(self) -> dict:
        v0, i0, self.tokens = self.vision.calls, self.vision.images, 0
        w0, c0 = time.perf_counter(), time.process_time()
        m = self.runner.train_step([self.sample])
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        if m.get("loss") is None:
            raise RuntimeError(f"ours: the step made no update ({m.get('skipped', 'non-finite loss')})")
        c = self.clock
        # prep (resize + patchify + prompt ids) is ours' share of what TRL's _generate does
        # (its processor call); policy_logprobs includes the loss kernel, as TRL's loss math
        # sits next to its forward (counted in "other" there).
        groups = {"gen": ("prep", "rollout"), "logprob": ("ref_logprobs", "policy_logprobs"),
                  "bwd_opt": ("backward_optim",), "reward": ("reward",)}
        out = {"wall": wall, "cpu": cpu, "vision_calls": self.vision.calls - v0,
               "images": self.vision.images - i0, "tokens": self.tokens, "peak_rss_gb": peak_rss_gb(),
               "prompt_ids": self.prompt_ids}
        for k, names in groups.items():
            out[f"{k}_wall"] = sum(c.wall.get(n, 0.0) for n in names)
            out[f"{k}_cpu"] = sum(c.cpu.get(n, 0.0) for n in names)
        return out


class TRLWorker:
    """Drives ``GRPOTrainer.train()``: a callback blocks at the start of each RL step until the
    parent asks for it, and reports the step when its last update has ended."""

    def __init__(self, case: dict, out_dir: str, send, recv):
        import datasets
        from PIL import Image
        from transformers import TrainerCallback
        from trl import GRPOConfig, GRPOTrainer

        from visioncoach.data.loader import ClipDataset
        from visioncoach.models.access import vision_tower
        from visioncoach.processor import fit_prompt_budget, resize_frames
        from visioncoach.rewards.components import (
            TOTAL,
            load_reward_fn,
            with_components,
        )
        from visioncoach.rewards.records import RewardTargets
        from visioncoach.templates import SYSTEM_PROMPT, format_time, user_text

        cfg, _, dataset, model, processor = shared_setup(case, out_dir)
        attn = model.config._attn_implementation
        model_dir = Path(out_dir) / "model"
        model.save_pretrained(model_dir)   # TRL loads the policy (and reference) from a folder
        del model
        d = cfg.data
        clips = ClipDataset(dataset, d.nframes, backend=d.decoder,
                            targets=RewardTargets((d.min_pixels, d.max_pixels)))
        sample = fit_prompt_budget(clips[0], processor.tokenizer, d)
        record = sample.reward_record
        frames = resize_frames(sample.frames, d.min_pixels, d.max_pixels)   # [F, h, w, 3] uint8
        images = [Image.fromarray(f.numpy()) for f in frames]
        # The same messages as visioncoach.processor's "frames" layout: "Frame i at t s:" + image
        # per frame, the duration line with the question, under the same system prompt.
        content = []
        for i, t in enumerate(sample.times.tolist()):
            content += [{"type": "text", "text": f"Frame {i + 1} at {format_time(t)}s:"}, {"type": "image"}]
        question = user_text(sample.record["question"], sample.record["task"])
        content.append({"type": "text",
                        "text": f"The video is in total {format_time(sample.duration)} seconds. {question}"})
        # System content as blocks too: a dataset column holds one structure.
        prompt = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
                  {"role": "user", "content": content}]
        steps, mu = case["steps"], case["mu"]
        train_set = datasets.Dataset.from_list([{"prompt": prompt, "images": images}] * steps)
        reward_fn = with_components(load_reward_fn(cfg.reward.fn), cfg.reward.components)
        holder = {}

        def visioncoach_reward(prompts, completions, **_):
            texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
            state = holder["trainer"].state
            progress = state.global_step / max(1, state.max_steps)
            return reward_fn(texts, [record] * len(texts), cfg.reward, progress)[TOTAL].tolist()

        n, G = case["new_tokens"], case["G"]
        o, loss = cfg.optim, cfg.loss
        args = GRPOConfig(
            output_dir=str(Path(out_dir) / "trl"), use_cpu=True, bf16=False, fp16=False,
            per_device_train_batch_size=G, gradient_accumulation_steps=1, num_generations=G,
            max_completion_length=n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
            top_k=0, generation_kwargs={"min_new_tokens": n},
            importance_sampling_level="sequence", loss_type="grpo", beta=case["beta"],
            num_iterations=mu, epsilon=loss.eps_low, epsilon_high=loss.eps_high,
            learning_rate=o.lr, weight_decay=o.weight_decay, adam_beta1=o.betas[0],
            adam_beta2=o.betas[1], adam_epsilon=o.eps, max_grad_norm=o.grad_clip,
            optim="adamw_torch_fused", lr_scheduler_type="cosine",
            warmup_steps=int(o.warmup_ratio * steps * mu), max_steps=steps * mu,
            model_init_kwargs={"dtype": "float32", "attn_implementation": attn}, seed=cfg.seed,
            logging_steps=10**6, save_strategy="no", report_to="none", disable_tqdm=True,
            dataloader_num_workers=0, log_completions=False)
        trainer = GRPOTrainer(model=str(model_dir), reward_funcs=visioncoach_reward, args=args,
                              train_dataset=train_set, processing_class=processor)
        holder["trainer"] = trainer
        self.checksum = param_checksum(trainer.model)   # what TRL loaded: the parent compares it with ours
        vision_tower(trainer.model).requires_grad_(False)   # as ours: RL never trains it
        self.vision = VisionCount()
        self.vision.attach(vision_tower(trainer.model))
        if trainer.ref_model is not None:
            self.vision.attach(vision_tower(trainer.ref_model))
        self.clock = PhaseClock()
        self.tokens = 0
        self.prompt_ids = None
        generate = trainer._generate

        def counted_generate(prompts):
            with self.clock("gen"):
                out = generate(prompts)
            prompt_ids, completion_ids = out[0], out[1]
            self.tokens += sum(len(c) for c in completion_ids)
            self.prompt_ids = list(prompt_ids[0])
            return out
        trainer._generate = counted_generate
        trainer._get_per_token_logps_and_entropies = self.clock.timed(
            "logprob", trainer._get_per_token_logps_and_entropies)
        trainer._calculate_rewards = self.clock.timed("reward", trainer._calculate_rewards)
        marks = {}
        backward = trainer.accelerator.backward

        def marked_backward(*a, **kw):
            marks["bwd"] = (time.perf_counter(), time.process_time())
            return backward(*a, **kw)
        trainer.accelerator.backward = marked_backward
        worker = self

        class StepProtocol(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step % mu == 0:
                    if recv() != "step":
                        raise SystemExit(0)
                    worker.clock.reset()   # the timed wrappers hold this object
                    worker.tokens = 0
                    marks["v"] = (worker.vision.calls, worker.vision.images)
                    marks["step"] = (time.perf_counter(), time.process_time())

            def on_step_end(self, args, state, control, **kw):
                w, c = time.perf_counter(), time.process_time()
                worker.clock.add("bwd_opt", w - marks["bwd"][0], c - marks["bwd"][1])
                if state.global_step % mu == 0:
                    out = {"wall": w - marks["step"][0], "cpu": c - marks["step"][1],
                           "vision_calls": worker.vision.calls - marks["v"][0],
                           "images": worker.vision.images - marks["v"][1], "tokens": worker.tokens,
                           "peak_rss_gb": peak_rss_gb(), "prompt_ids": worker.prompt_ids}
                    for k in PHASES:
                        out[f"{k}_wall"] = worker.clock.wall.get(k, 0.0)
                        out[f"{k}_cpu"] = worker.clock.cpu.get(k, 0.0)
                    send({"step": out})

        trainer.add_callback(StepProtocol())
        self.trainer = trainer
        self.frames = len(images)

    def info(self) -> dict:
        return {"checksum": self.checksum, "frames": self.frames}

    def run(self) -> None:
        self.trainer.train()


def worker_main(impl: str, case: dict) -> int:
    """Protocol: JSON lines on the original stdout (everything printed goes to stderr); the
    parent sends "step" or "quit" lines on stdin."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(msg: dict) -> None:
        proto.write(json.dumps(msg) + "\n")

    def recv() -> str:
        return sys.stdin.readline().strip() or "quit"

    import torch

    torch.set_num_threads(case["threads"])
    with tempfile.TemporaryDirectory(prefix=f"bench_rl_step_{impl}_") as out_dir:
        if impl == "ours":
            w = OursWorker(case, out_dir)
            send({"ready": w.info()})
            while recv() == "step":
                send({"step": w.step()})
        else:
            w = TRLWorker(case, out_dir, send, recv)
            send({"ready": w.info()})
            w.run()
            recv()
    return 0
