"""RL stage (VisionCoach Algorithm 1): its pieces, and one step against a straightforward
reference implementation (plain full forwards, no KV cache or prefix sharing, the reference
rewards and loss) with the same seeds."""

import copy
import statistics

import numpy as np
import pytest
import torch

from visioncoach.config import load_config
from visioncoach.data.stgr import load_stgr
from visioncoach.data.synthetic import generate
from visioncoach.kernels.gspo_sd_loss import gspo_sd_loss_reference
from visioncoach.models.tiny import build_tiny_model
from visioncoach.processor import build_inputs, resize_frames
from visioncoach.rewards.records import RewardTargets
from visioncoach.templates import user_text
from visioncoach.rollout.sampling import sample_tokens
from visioncoach import algorithm
from visioncoach.trainer import rl
from visioncoach.utils.dist import DistInfo
from visioncoach.vp import add_hint, render_vp_reference
from visioncoach.vp.prompting import key_frame_prompt
from fake_rewards import text_reward as fake_reward  # noqa: E402

CPU = DistInfo(0, 1, 0, torch.device("cpu"), None)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return load_stgr(generate(tmp_path_factory.mktemp("syn"), n=6, seed=5), sft=False)


def _cfg(**over):
    base = {"data.num_workers": 0, "data.nframes": 2, "data.max_pixels": 12544, "rollout.num_generations": 4,
            "rollout.max_new_tokens": 8, "rollout.prompts_per_step": 3, "vp.selector": "gating",
            "vp.hard_mode": "percentile", "vp.hard_threshold": 60, "loss.beta": 0.04,
            "loss.updates_per_rollout": 1, "optim.rl_steps": 2, "optim.lr": 1e-3,
            "log.checkpoint_every": 100,
            # The reference step below writes Algorithm 1 as printed: candidates by the total
            # reward and frame numbers on the key frames (the defaults follow appendices B.2
            # and C.1 instead; tests/test_ablations.py covers both settings).
            "vp.candidate_reward": "total", "vp.numpro_frames": "key"}
    return load_config([f"--{k}={v}" for k, v in {**base, **over}.items()])


# ----------------------------------------------------------------------------- pieces

def test_group_advantages_use_the_unbiased_std():
    r = torch.tensor([0.0, 1.0, 3.0, 4.0])
    expected = (r - 2.0) / (statistics.stdev(r.tolist()) + 1e-4)
    torch.testing.assert_close(algorithm.group_advantages(r), expected)
    assert torch.equal(algorithm.group_advantages(torch.full((4,), 2.5)), torch.zeros(4))
    assert torch.equal(algorithm.group_advantages(torch.tensor([3.0])), torch.zeros(1))


@pytest.mark.parametrize("k", [0, 25, 50, 60, 75, 100])
def test_percentile_bar_is_numpys(k):
    hist = [0.3, 2.0, 1.1, 4.0, 0.0, 2.5, 1.7]
    assert algorithm.hard_threshold("percentile", k, hist) == pytest.approx(np.percentile(hist, k))
    assert algorithm.hard_threshold("absolute", 2.21, hist) == 2.21


def test_candidates_exceed_the_raw_mean_and_top_n_is_by_answer_reward():
    prompted = {"total": torch.tensor([2.0, 3.0, 1.0, 3.5, 2.5]),
                "accuracy": torch.tensor([0.2, 0.5, 1.0, 0.5, 0.9])}
    cand, chosen = algorithm.select_distill(2.0, prompted, top_n=2)
    assert cand == [1, 3, 4]                 # strictly greater than the raw mean
    assert chosen == [1, 4]                  # acc 0.9, then the tie 0.5/0.5 to the earlier one
    assert algorithm.select_distill(5.0, prompted, 2) == ([], [])


def test_vp_chooser_modes():
    from visioncoach.config import VPConfig

    chooser = lambda sel: rl.build_chooser(VPConfig(selector=sel), seed=0, rank=0,  # noqa: E731
                                           device=torch.device("cpu"), have_heatmaps=False)
    avg = {"temporal": 0.5, "spatial": 0.5}
    raw = [{"temporal": 0.1, "spatial": 0.4}, {"temporal": 0.45, "spatial": 0.2},
           {"temporal": 0.9, "spatial": 0.9}, {"temporal": 0.5, "spatial": 0.5}]
    assert chooser("gating").choose(0, [None] * 4, raw, avg) == ["numpro", "darken", "darken", "darken"]
    assert chooser("fixed:circle").choose(0, [None] * 2, raw[:2], avg) == ["circle", "circle"]
    r = chooser("random")
    picks = r.choose(3, [None] * 50, raw * 13, avg)
    assert picks == r.choose(3, [None] * 50, raw * 13, avg)            # seeded by step
    assert set(picks) <= {"circle", "darken", "numpro", "raw"}          # no CLIP: no api_prompt
    assert not chooser("none").active
    with pytest.raises(ValueError, match="vp.selector_path"):
        chooser("model")
    with pytest.raises(ValueError, match="vp.clip_path"):
        chooser("fixed:api_prompt")


def test_key_frame_prompt_renders_only_key_frames(dataset):
    from visioncoach.data.loader import ClipDataset

    clips = ClipDataset(dataset, nframes=3, backend="pyav", targets=RewardTargets((3136, 12544)))
    s = next(c for c in (clips[i] for i in range(len(clips))) if c.reward_record.frames and c.is_key.any())
    frames = resize_frames(s.frames, 3136, 12544)
    out = key_frame_prompt(frames, s.times, s.is_key, s.reward_record, "darken", darken_factor=0.3)
    key = s.is_key.nonzero().flatten()
    assert torch.equal(out[~s.is_key], frames[~s.is_key])
    assert not torch.equal(out[key], frames[key])
    w, h = s.reward_record.frame_size
    for j, k in enumerate(key.tolist()):
        t = float(s.times[k])
        kf = min(s.record["key_frames"], key=lambda f: abs(f["time"] - t))
        boxes = [[b[0] * w, b[1] * h, b[2] * w, b[3] * h]
                 for bs in s.record["key_items"][str(kf["idx"])].values() for b in bs]
        ref = render_vp_reference(frames[k:k + 1], "darken", boxes=torch.tensor([boxes]), darken_factor=0.3)
        assert torch.equal(out[k:k + 1], ref)
    numbered = key_frame_prompt(frames, s.times, s.is_key, s.reward_record, "numpro", darken_factor=0.3)
    assert torch.equal(numbered[key], render_vp_reference(frames[key], "numpro", frame_index=key + 1))
    no_key = torch.zeros_like(s.is_key)
    assert key_frame_prompt(frames, s.times, no_key, s.reward_record, "darken", darken_factor=0.3) is None


# ----------------------------------------------------------------------------- reference step

def _full_inputs(inputs, G, completion=None):
    """The prompt's tensors repeated for G rows, with ``completion`` [G, t] appended."""
    t = {k: v for k, v in inputs.tensors.items()}
    out = {}
    for k, v in t.items():
        if k in ("input_ids", "attention_mask", "mm_token_type_ids"):
            v = v.expand(G, -1)
            if completion is not None:
                extra = completion if k == "input_ids" else (
                    torch.ones_like(completion) if k == "attention_mask" else torch.zeros_like(completion))
                v = torch.cat([v, extra], 1)
            out[k] = v
        elif k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            out[k] = v.repeat(G, *([1] * (v.dim() - 1)))
        else:
            out[k] = v.repeat(G)
    return out


def reference_rollouts(model, inputs, G, max_new, gen, eos, pad):
    """Sampling by a full forward of the whole sequence at every step."""
    done = torch.zeros(G, dtype=torch.bool)
    tokens = torch.zeros(G, 0, dtype=torch.long)
    lengths = torch.zeros(G, dtype=torch.long)
    with torch.no_grad():
        for _ in range(max_new):
            h = model.model(**_full_inputs(inputs, G, tokens)).last_hidden_state[:, -1]
            tok, _ = sample_tokens(model.lm_head(h).float(), temperature=1.0, top_p=0.95, generator=gen,
                                   top_p_method="sort")
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            lengths += ~done
            done |= torch.isin(tok, torch.tensor(eos))
            tokens = torch.cat([tokens, tok[:, None]], 1)
            if done.all():
                break
    return tokens, lengths


def reference_logprobs(model, inputs, tokens, lengths):
    """log p of each completion token from the plain LM-head logits of a full forward [g, T]."""
    g, T = tokens.shape
    L = inputs.tensors["input_ids"].shape[1]
    h = model.model(**_full_inputs(inputs, g, tokens)).last_hidden_state[:, L - 1:L + T - 1]
    lp = model.lm_head(h).float().log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    return torch.where(torch.arange(T)[None] < lengths[:, None], lp, torch.zeros_like(lp))


def reference_step(model, ref_model, tokenizer, samples, cfg, seed_state):
    """Algorithm 1 for one batch, written out plainly."""
    G, N, alpha = cfg.rollout.num_generations, cfg.vp.top_n, cfg.loss.sd_alpha
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id
    gen = torch.Generator().manual_seed(seed_state)
    d = cfg.data
    frames = [resize_frames(s.frames, d.min_pixels, d.max_pixels) for s in samples]
    inputs = [build_inputs(f, s.times, s.duration, user_text(s.record["question"], s.record["task"]), tokenizer,
                           min_pixels=d.min_pixels, max_pixels=d.max_pixels) for s, f in zip(samples, frames)]
    out = {"raw": [], "prompted": {}, "vp": {}, "cand": {}, "S": {}}
    for x in inputs:
        tok, ln = reference_rollouts(model, x, G, cfg.rollout.max_new_tokens, gen, eos, pad)
        texts = [tokenizer.decode(r[:n].tolist(), skip_special_tokens=True) for r, n in zip(tok, ln)]
        out["raw"].append((x, tok, ln, fake_reward(texts, None, None)))
    means = [float(r[3]["total"].mean()) for r in out["raw"]]
    bar = np.percentile(means, cfg.vp.hard_threshold)
    out["hard"] = [m < bar for m in means]
    avg_t = statistics.mean(float(r[3]["temporal"].mean()) for r in out["raw"])
    avg_s = statistics.mean(float(r[3]["spatial"].mean()) for r in out["raw"])
    for i, s in enumerate(samples):
        if not out["hard"][i]:
            continue
        rw = out["raw"][i][3]
        v = "numpro" if avg_t - float(rw["temporal"].mean()) > avg_s - float(rw["spatial"].mean()) else "darken"
        out["vp"][i] = v
        key = s.is_key.nonzero().flatten()
        if key.numel() == 0:
            continue
        f = frames[i].clone()
        if v == "numpro":
            f[key] = render_vp_reference(f[key], "numpro", frame_index=key + 1)
        else:
            w, h = f.shape[2], f.shape[1]
            per = []
            for k in key.tolist():
                t = float(s.times[k])
                kf = [e for e in s.record.get("key_frames") or [] if s.record["key_items"].get(str(e["idx"]))]
                best = min(kf, key=lambda e: abs(e["time"] - t), default=None)
                per.append([] if best is None or abs(best["time"] - t) > 1.0 else
                           [[b[0] * w, b[1] * h, b[2] * w, b[3] * h]
                            for bs in s.record["key_items"][str(best["idx"])].values() for b in bs])
            if not any(per):
                continue
            bmax = max(map(len, per))
            boxes = torch.zeros(len(per), bmax, 4)
            for j, bs in enumerate(per):
                if bs:
                    boxes[j, :len(bs)] = torch.tensor(bs)
            f[key] = render_vp_reference(f[key], "darken", boxes=boxes,
                                         box_count=torch.tensor([len(b) for b in per]),
                                         darken_factor=cfg.vp.darken_factor)
        xp = build_inputs(f, s.times, s.duration, user_text(add_hint(s.record["question"], v), s.record["task"]),
                          tokenizer, min_pixels=d.min_pixels, max_pixels=d.max_pixels)
        out["prompted"][i] = (xp, *reference_rollouts(model, xp, G, cfg.rollout.max_new_tokens, gen, eos, pad))
    for i, (xp, tok, ln) in out["prompted"].items():
        texts = [tokenizer.decode(r[:n].tolist(), skip_special_tokens=True) for r, n in zip(tok, ln)]
        rw = fake_reward(texts, None, None)
        out["prompted"][i] = (xp, tok, ln, rw)
        cand = [g for g in range(G) if float(rw["total"][g]) > means[i]]
        out["cand"][i] = cand
        out["S"][i] = sorted(sorted(cand, key=lambda g: (-float(rw["accuracy"][g]), g))[:N])

    # Loss rows: raw rollouts of every prompt, then the distilled ones.
    B = len(samples)
    rows = [(x, tok, ln) for x, tok, ln, _ in out["raw"]]
    adv, gw, sw = [], [], []
    for _, _, _, rw in out["raw"]:
        r = rw["total"].tolist()
        adv += [(v - statistics.mean(r)) / (statistics.stdev(r) + 1e-4) for v in r]
        gw += [1 / (B * G)] * G
        sw += [0.0] * G
    for i, S in out["S"].items():
        if S:
            xp, tok, ln, _ = out["prompted"][i]
            rows.append((xp, tok[S], ln[S]))
            adv += [0.0] * len(S)
            gw += [0.0] * len(S)
            sw += [alpha / (B * len(S))] * len(S)
    T = max(t.shape[1] for _, t, _ in rows)
    pad_t = lambda x: torch.nn.functional.pad(x, (0, T - x.shape[1]))  # noqa: E731
    logp = torch.cat([pad_t(reference_logprobs(model, x, t, n)) for x, t, n in rows])
    with torch.no_grad():
        ref = torch.cat([pad_t(reference_logprobs(ref_model, x, t, n)) for x, t, n in rows])
    mask = torch.arange(T)[None] < torch.cat([n for _, _, n in rows])[:, None]
    out["loss"], out["stats"] = gspo_sd_loss_reference(
        logp, None, ref, torch.tensor(adv), mask, torch.tensor(gw), torch.tensor(sw),
        eps_low=cfg.loss.eps_low, eps_high=cfg.loss.eps_high, beta=cfg.loss.beta)
    out["rows"] = rows
    return out


def peaked_model():
    """The tiny model with sharper next-token distributions. Random weights give nearly
    uniform ones over 151,936 tokens (each ~7e-6), where two correct implementations whose
    logits differ by float rounding (KV cache vs full forward) draw neighbouring tokens for
    the same uniform number; with a handful of likely tokens they draw the same one."""
    model = build_tiny_model(seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model


def test_one_rl_step_equals_the_reference_implementation(dataset, tokenizer, tmp_path):
    cfg = _cfg()
    model = peaked_model()
    ref_model = copy.deepcopy(model)
    with torch.no_grad():   # a reference that differs from the policy (not in the frozen vision tower)
        g = torch.Generator().manual_seed(1)
        for name, p in ref_model.named_parameters():
            if "visual" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    runner = rl.RLRunner(cfg, CPU, model, tokenizer, dataset, tmp_path, ref_model=ref_model,
                         reward_fn=fake_reward)
    samples = [runner.clips[i] for i in range(3)]
    results = runner.collect(samples, progress=0.0)
    groups, adv, gw, sw = runner.loss_rows(results)
    ref_lp = runner.reference_logprobs(groups)
    loss, stats, mask = runner.loss(groups, adv, gw, sw, None, ref_lp)

    expected = reference_step(model, ref_model, tokenizer, samples, cfg,
                              (cfg.seed * 1_000_003 + 0) * 1_000_003 + 0)
    # Same rollouts and rewards.
    for res, (_, tok, ln, rw) in zip(results, expected["raw"]):
        assert torch.equal(res.raw.rollout.tokens, tok[:, :res.raw.rollout.tokens.shape[1]])
        assert torch.equal(res.raw.rollout.lengths, ln)
        for k in rw:
            torch.testing.assert_close(res.raw.rewards[k], rw[k])
    # Same hard flags, visual prompts, prompted rollouts, candidates and distillation sets.
    assert [r.hard for r in results] == expected["hard"]
    assert any(expected["hard"]) and not all(expected["hard"])
    assert {i: r.vp_type for i, r in enumerate(results) if r.vp_type} == expected["vp"]
    assert {i for i, r in enumerate(results) if r.prompted is not None} == set(expected["prompted"])
    for i, (_, tok, ln, rw) in expected["prompted"].items():
        p = results[i].prompted
        assert torch.equal(p.rollout.tokens, tok[:, :p.rollout.tokens.shape[1]])
        assert torch.equal(p.rollout.lengths, ln)
        assert results[i].candidates == expected["cand"][i]
        assert results[i].distill == expected["S"][i]
    assert sum(len(s) for s in expected["S"].values()) > 0, "the case should exercise distillation"
    # Same loss (and its stats), from different code paths (cache + fused LM head vs plain logits).
    torch.testing.assert_close(loss, expected["loss"].float(), rtol=1e-4, atol=1e-6)
    for k in ("kl_mean", "nll_mean", "ratio_mean"):
        torch.testing.assert_close(stats[k], expected["stats"][k], rtol=1e-4, atol=1e-6)
    assert float(stats["kl_mean"]) > 0 and float(stats["nll_mean"]) > 0


def test_rl_steps_update_the_policy_and_log_metrics(dataset, tokenizer, tmp_path):
    cfg = _cfg(**{"loss.updates_per_rollout": 2, "rollout.prompts_per_step": 2})
    model = peaked_model()
    vis_before = [p.detach().clone() for p in model.model.visual.parameters()]
    lm_before = model.lm_head.weight.detach().clone()
    runner = rl.RLRunner(cfg, CPU, model, tokenizer, dataset, tmp_path, reward_fn=fake_reward)
    history = runner.run()
    assert [m["step"] for m in history] == [1, 2]
    m = history[-1]
    for key in ("reward_total", "reward_spatial", "hard_frac", "vp_counts", "vp_gain", "clip_frac", "kl_mean",
                "nll_mean", "lr", "grad_norm", "tokens_per_s", "time_rollout_s", "time_reward_s",
                "time_policy_logprobs_s", "time_backward_optim_s", "peak_mem_gb"):
        assert key in m, key
    assert m["skipped_updates"] == 0
    # mu = 2: the second update is off-policy, so the ratio moves away from 1.
    assert m["ratio_mean"] != 1.0
    # The language model moved, the vision tower did not (frozen in RL).
    assert not torch.equal(model.lm_head.weight, lm_before)
    assert all(torch.equal(a, b) for a, b in zip(vis_before, model.model.visual.parameters()))
    assert (tmp_path / "checkpoints" / "rl" / "latest").is_file()


def test_rl_resume_continues_exactly(dataset, tokenizer, tmp_path):
    cfg = _cfg(**{"optim.rl_steps": 3, "log.checkpoint_every": 2, "rollout.prompts_per_step": 2,
                  "loss.updates_per_rollout": 2})
    straight = rl.RLRunner(cfg, CPU, peaked_model(), tokenizer, dataset, tmp_path / "a", reward_fn=fake_reward)
    straight.run()
    first = rl.RLRunner(cfg, CPU, peaked_model(), tokenizer, dataset, tmp_path / "b", reward_fn=fake_reward)
    first.steps = 2   # "killed" after step 2, whose checkpoint is written
    first.run()
    other = build_tiny_model(seed=7)    # the weights must come from the checkpoint
    # (the reference policy is the run's starting point, rebuilt the same way as before)
    resumed = rl.RLRunner(cfg, CPU, other, tokenizer, dataset, tmp_path / "b", reward_fn=fake_reward,
                          ref_model=copy.deepcopy(peaked_model()))
    assert resumed.maybe_resume("auto") and resumed.step == 2
    assert resumed.stats.mean_history == first.stats.mean_history and len(resumed.stats.mean_history) == 4
    assert resumed.stats.component_sums == first.stats.component_sums
    resumed.run()
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name


def test_lora_trains_adapters_only_and_the_reference_is_the_base(dataset, tokenizer, tmp_path):
    from visioncoach.config import LoraConfig
    from visioncoach.models.policy import add_lora

    cfg = _cfg(**{"rollout.prompts_per_step": 2, "loss.updates_per_rollout": 2, "optim.lr": 1e-2})
    model = add_lora(peaked_model(), LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    runner = rl.RLRunner(cfg, CPU, model, tokenizer, dataset, tmp_path, reward_fn=fake_reward)
    assert runner.lora and runner.ref_model is None       # no second copy of the weights
    history = runner.run()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert history[-1]["kl_mean"] > 0                      # the adapters moved away from the base
    # The reference log-probs are the base model's (adapters disabled).
    results = runner.collect([runner.clips[0]], progress=0.0)
    groups, *_ = runner.loss_rows(results)
    ref = runner.reference_logprobs(groups)
    base = peaked_model()
    with torch.no_grad():
        expected = torch.cat([reference_logprobs(base, g.group.inputs, g.tokens, g.lengths) for g in groups])
    torch.testing.assert_close(ref, expected, rtol=1e-4, atol=1e-5)
    # Checkpoints hold peft adapters, and loading one restores them.
    ckpt = tmp_path / "checkpoints" / "rl" / "step-00000002" / "model"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "adapter_config.json").is_file()
    fresh = add_lora(peaked_model(), LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    again = rl.RLRunner(cfg, CPU, fresh, tokenizer, dataset, tmp_path, reward_fn=fake_reward)
    assert again.maybe_resume("auto")
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), n


def test_model_selector_gets_question_key_frames_and_objects(dataset, monkeypatch):
    import visioncoach.selector as selector_pkg
    from visioncoach.config import VPConfig
    from visioncoach.data.loader import ClipDataset

    seen = {}

    class FakeSelector(selector_pkg.Selector):
        def __init__(self, path, device):
            seen["init"] = (path, device)

        def predict(self, batch):
            seen["batch"] = batch
            return ["darken", "api_prompt", "raw"][:len(batch)]

    monkeypatch.setattr(selector_pkg, "Selector", FakeSelector)
    chooser = rl.build_chooser(VPConfig(selector="model", selector_path="/sel"), seed=0, rank=0,
                               device=torch.device("cpu"), have_heatmaps=False)
    assert seen["init"] == ("/sel", torch.device("cpu"))
    clips = ClipDataset(dataset, nframes=3, backend="pyav", targets=RewardTargets((3136, 12544)))
    samples = [clips[i] for i in range(3)]
    types = chooser.choose(0, samples, [{}] * 3, {})
    assert types == ["darken", "raw", "raw"]           # api_prompt cannot render without CLIP
    first = seen["batch"][0]
    assert first.question == samples[0].record["question"]
    assert torch.equal(first.frames, samples[0].frames[samples[0].is_key])
    assert set(first.key_objects) == {n for f in samples[0].reward_record.frames for n in f.names} != set()


def test_loss_row_weights_are_eq2_averaged_over_the_batch():
    gw, sw = algorithm.loss_row_weights(2, 4, [0, 2], alpha=0.1)
    assert gw.tolist() == [0.125] * 8 + [0.0, 0.0]
    assert torch.allclose(sw, torch.tensor([0.0] * 8 + [0.025, 0.025]))
    gw, sw = algorithm.loss_row_weights(1, 2, [3], alpha=1.0)
    assert gw.tolist() == [0.5, 0.5, 0, 0, 0] and torch.allclose(sw, torch.tensor([0, 0, 1 / 3, 1 / 3, 1 / 3]))


def test_gating_rule_takes_the_larger_shortfall():
    avg = {"temporal": 0.5, "spatial": 0.5}
    assert algorithm.gating_choice({"temporal": 0.1, "spatial": 0.4}, avg) == "numpro"
    assert algorithm.gating_choice({"temporal": 0.45, "spatial": 0.2}, avg) == "darken"
    assert algorithm.gating_choice({"temporal": 0.5, "spatial": 0.5}, avg) == "darken"      # tie
