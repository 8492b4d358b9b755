"""Run under torchrun by tests/test_engines_reliability.py (2 processes, gloo, CPU):

    torchrun --nproc_per_node=2 tests/engine_worker.py resume DATA OUT ZERO
    torchrun --nproc_per_node=2 tests/engine_worker.py reference DATA OUT

``resume``: SFT then RL, each straight for 3 steps and stopped after 2 (checkpoint) then
resumed in new runners on a fresh model; the final weights must be equal, on every rank.
``reference``: RL under ZeRO-3; the reference policy holds only this rank's partition and gives
the log-probs of a plain replica. Prints ``OK <mode>`` on success (any failure raises).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from visioncoach.config import load_config
from visioncoach.data.stgr import load_stgr
from visioncoach.models.tiny import build_tiny_model
from visioncoach.models.tokenizer import qwen25_tokenizer
from visioncoach.trainer.distributed import frozen_copy, is_zero3, local_parameter_elements
from visioncoach.trainer.rl import RLRunner
from visioncoach.trainer.sft import SFTRunner
from visioncoach.utils.dist import init_distributed

sys.path.insert(0, str(Path(__file__).parent))   # `make test` runs with PYTHONSAFEPATH=1
from fake_rewards import text_reward as reward  # noqa: E402


def config(zero: int):
    return load_config([f"--{k}={v}" for k, v in {
        "dist.engine": "deepspeed", "dist.zero_stage": zero, "data.num_workers": 0,
        "data.nframes": 2, "data.max_pixels": 12544, "data.shuffle": "false",
        "optim.sft_steps": 3, "optim.rl_steps": 3, "optim.sft_lr": 1e-3, "optim.lr": 1e-3,
        "log.checkpoint_every": 2, "log.progress": "false", "rollout.num_generations": 2,
        "rollout.max_new_tokens": 6, "vp.selector": "gating", "vp.hard_mode": "percentile",
        "vp.hard_threshold": 60, "loss.updates_per_rollout": 2}.items()])


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same_everywhere(ws: list[torch.Tensor]) -> bool:
    s = torch.stack([torch.stack([w.double().sum(), (w.double() ** 2).sum()]) for w in ws])
    out = [torch.zeros_like(s) for _ in range(dist.get_world_size())]
    dist.all_gather(out, s)
    return all(torch.equal(o, s) for o in out)


def straight_vs_resumed(make, out: Path, name: str) -> None:
    straight = make(out / f"{name}-a")
    straight.run()
    first = make(out / f"{name}-b")
    first.steps = 2          # "stopped" after step 2, whose checkpoint is written
    first.run()
    resumed = make(out / f"{name}-b")
    assert resumed.maybe_resume("auto") and resumed.step == 2, resumed.step
    resumed.run()
    a, b = weights(straight.model), weights(resumed.model)
    bad = [n for (n, _), x, y in zip(straight.model.named_parameters(), a, b) if not torch.equal(x, y)]
    assert not bad, f"{name}: resumed weights differ from the straight run: {bad[:5]}"
    assert same_everywhere(b), f"{name}: ranks differ"
    # The run moved the weights (the comparison is not between two untouched models).
    assert any(not torch.equal(x, y) for x, y in zip(a, weights(build_tiny_model(seed=0))))


def resume(data: Path, out: Path, zero: int) -> None:
    cfg, info = config(zero), init_distributed(load_config([]).dist)
    tok = qwen25_tokenizer()
    sft_data, rl_data = load_stgr(data, sft=True), load_stgr(data, sft=False)
    straight_vs_resumed(lambda o: SFTRunner(cfg, info, build_tiny_model(seed=0), tok, sft_data, o), out, "sft")
    straight_vs_resumed(lambda o: RLRunner(cfg, info, build_tiny_model(seed=0), tok, rl_data, o,
                                           reward_fn=reward), out, "rl")


def reference(data: Path, out: Path) -> None:
    cfg, info = config(3), init_distributed(load_config([]).dist)
    model = build_tiny_model(seed=0)
    replica = frozen_copy(model)                         # what every rank held before
    total = sum(p.numel() for p in replica.parameters())
    runner = RLRunner(cfg, info, model, qwen25_tokenizer(), load_stgr(data, sft=False), out,
                      reward_fn=reward)
    ref = runner.ref_model
    assert is_zero3(ref) and ref is not model
    held = local_parameter_elements(ref)
    counts = [None] * info.world_size
    dist.all_gather_object(counts, held)
    # Each rank holds its share (partitions are padded up to a multiple of the world size).
    n_params = len(list(ref.parameters()))
    assert held <= total // info.world_size + n_params, (held, total)
    assert total <= sum(counts) <= total + n_params * info.world_size, (counts, total)
    results = runner.collect([runner.clips[info.rank]], progress=0.0)
    groups, *_ = runner.loss_rows(results)
    got = runner.reference_logprobs(groups)
    with torch.no_grad():
        want = runner.token_logprobs(replica, groups, ref=True)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert local_parameter_elements(ref) == held          # released again after the pass
    if info.is_main:
        (out / "reference.json").write_text(json.dumps({"held": counts, "total": total,
                                                        "max_abs_diff": float((got - want).abs().max())}))


if __name__ == "__main__":
    mode, data, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if mode == "resume":
        resume(data, out, int(sys.argv[4]))
    else:
        reference(data, out)
    print(f"OK {mode}", flush=True)
    dist.destroy_process_group()
