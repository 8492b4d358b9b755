"""The memory plan (``visioncoach.tools``): parameter counts of the meta-device model against a
hand count from the config, each memory term against a hand-computed value on a tiny model,
the per-layer activation rule against autograd on transformers' own decoder layer, the KV term
against the cache rollout/generate.py allocates, and the command line."""

import dataclasses
import json

import pytest
import torch

from visioncoach.tools import memory_terms as mt
from visioncoach.tools.arch import QWEN25_VL_7B, arch_of, count_params, hf_config, meta_model, tiny_config


def hand_count(t: dict, v: dict, vocab: int) -> dict:
    """Parameters of a Qwen2.5-VL from its config values, module by module."""
    D, I, kv = t["hidden_size"], t["intermediate_size"], t["num_key_value_heads"] * (t["hidden_size"] // t["num_attention_heads"])
    layer = (D * D + D) + 2 * (D * kv + kv) + D * D + 3 * D * I + 2 * D   # q (bias), k, v (bias), o, MLP, 2 norms
    d, i, m = v["hidden_size"], v["intermediate_size"], v["hidden_size"] * v["spatial_merge_size"] ** 2
    block = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * (d * i + i) + (i * d + d)   # norms, qkv, proj, MLP (biases)
    patch = d * 3 * v["temporal_patch_size"] * v["patch_size"] ** 2                      # Conv3d, no bias
    merger = d + (m * m + m) + (m * v["out_hidden_size"] + v["out_hidden_size"])         # ln_q, Linear, Linear
    return {"vision": patch + v["depth"] * block + merger, "embeddings": vocab * D,
            "decoder": t["num_hidden_layers"] * layer + D, "lm_head": vocab * D}


def test_7b_meta_model_counts_equal_the_hand_count():
    counts = count_params(meta_model(hf_config(QWEN25_VL_7B)))
    want = hand_count(QWEN25_VL_7B, QWEN25_VL_7B["vision_config"], 152064)
    assert {k: getattr(counts, k) for k in want} == want
    assert counts.total == 8_292_166_656 and not counts.tied       # the model card's "8.29B"
    assert counts.trained == counts.total - counts.vision == sum(counts.trainable)
    assert counts.largest_module == ("language_model.embed_tokens", 152064 * 3584)
    assert counts.largest_in_layer == 3584 * 18944                  # one MLP projection


def test_tiny_counts_on_the_real_cpu_model_and_on_meta():
    from visioncoach.config import TinyModelConfig
    from visioncoach.models.tiny import build_tiny_model

    real = count_params(build_tiny_model())          # real weights on the CPU, the trainer's default
    meta = count_params(meta_model(tiny_config(TinyModelConfig())))
    t = {"hidden_size": 64, "intermediate_size": 128, "num_key_value_heads": 2, "num_attention_heads": 4,
         "num_hidden_layers": 2}
    v = {"hidden_size": 32, "intermediate_size": 64, "spatial_merge_size": 2, "temporal_patch_size": 2,
         "patch_size": 14, "out_hidden_size": 64, "depth": 2}
    want = hand_count(t, v, 151936)
    assert want == {"vision": 83_616, "embeddings": 9_723_904, "decoder": 74_304, "lm_head": 9_723_904}
    for c in (real, meta):
        assert {k: getattr(c, k) for k in want} == want
    assert real.trainable == meta.trainable and real.frozen == meta.frozen


def _tiny_arch():
    from visioncoach.config import TinyModelConfig

    cfg = tiny_config(TinyModelConfig())
    return arch_of(cfg, "tiny"), count_params(meta_model(cfg)), cfg


def _workload(**kw):
    base = dict(gpus=2, prompt_tokens=100, completion_tokens=20, G=3, prompts=1, top_n=2, frames=2,
                pixels=3136, layout="frames", checkpointing=True, reference=True, reduce_bucket=1000,
                reuse_distance=500, sub_group_size=10 ** 9, reserve_gib=1.0, capacity_gib=10.0)
    return mt.Workload(**{**base, **kw})


def test_every_term_on_the_tiny_model_equals_its_hand_computed_value():
    arch, counts, _ = _tiny_arch()
    t = mt.terms(arch, counts, _workload())
    trained, vision, V = 9_723_904 * 2 + 74_304, 83_616, 151_936   # every size is even: N = 2 halves it
    S, rows = 100 + 20 - 1, [3, 2]                                     # G raw rows, top-2 distilled
    # per token: 2 norms (fp32 input, 1/rms, bf16 normalised, projection input), q/k/v/out, lse, MLP
    saved = 2 * (4 * 64 + 4 + 2 * 64 + 2 * 64) + 2 * 2 * (64 + 32) + 4 * 4 + 8 * 128   # 2456
    want = {
        "params_trained": trained // 2 * 2, "params_vision": vision // 2 * 2,
        "grads": trained // 2 * 2 + 1000 * 2, "optimizer": trained // 2 * 12,
        "ref_replica": (trained + vision) * 2, "ref_partitioned": (trained + vision) // 2 * 2,
        "zero3_gathered": V * 64 * 2, "zero3_grad": V * 64 * 2, "zero3_retained": 500 * 2,
        "rollout_params": (trained + vision) * 2,
        # 2 frames x 16 patches; the attention stage (8 x 32 x 2 + 4 x 32 x 4 = 1024 B) > MLP (576 B);
        # pixel values 1176 per patch in fp32 and bf16
        "vision_acts": 32 * 1024 + 32 * 1176 * 6,
        "prefill_ws": 100 * (1152 + 128),                  # max(MLP 2(192+384), attention 2(128+320+128)) + input
        "kv_prefix": 100 * 2 * (2 * 2 * 16 * 2),           # L x layers x (K + V) x kv x hd x bf16
        "kv_static": 3 * 128 * 2 * 128 + 3 * 128 * 128,    # 120 slots -> one 128 bucket; + one layer's copy
        "kept_rollouts": 2 * (100 * 64 * 2 + 8 * 64 * 2 + 3 * 100 * 8),
        "ref_ws": max(3 * S * (1152 + 128), 3 * S * 256 + 60 * V * 4),   # 60 rows < 441: one chunk
        "act_checkpoints": sum(rows) * S * 2 * 64 * 2,
        # final norm (fp32 input, 1/rms, normalised, output) + cos/sin; the kernel's D, lse, logp, target
        "act_head": sum(rows) * (S * (8 * 64 + 4 + 4 * 16) + 20 * (4 * 64 + 16)),
        "act_layer": 3 * S * (saved + 4 * 128 + 6 * 64) + 64 * 128 * 2 * 2,
        "act_kernel": 60 * V * 6 + 60 * 64 * 2,            # backward: Vc = V (441 x V // 60 > V)
        "opt_step": trained // 2 * 6, "reserve": 2 ** 30,
    }
    assert t == want
    assert set(t) == set(mt.TERMS)
    base = sum(want[k] for k in ("params_trained", "params_vision", "grads", "optimizer", "reserve"))
    ph = mt.phases(t, "partitioned")
    assert ph["policy"] == base + want["ref_partitioned"] + want["kept_rollouts"] + want["act_checkpoints"] + \
        want["act_head"] + want["act_kernel"] + 2 * V * 64 * 2 + 1000       # the head's moment wins here
    assert ph["rollout"] == base + want["ref_partitioned"] + want["rollout_params"] + want["kept_rollouts"] + \
        want["vision_acts"]                                                     # vision beats prefill + KV
    assert mt.phases(t, "replica")["reference"] == base + want["ref_replica"] + want["kept_rollouts"] + want["ref_ws"]


def test_layer_saved_bytes_match_autograd_on_transformers_decoder_layer():
    """The enumeration behind act_layer, against what autograd really keeps for one Qwen2.5-VL
    decoder layer (bf16, CPU), with attention replaced by a stand-in that keeps exactly what
    flash-attn's FlashAttnFunc keeps (q, k, v, out, an fp32 lse per head)."""
    from transformers import AttentionInterface
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (Qwen2_5_VLDecoderLayer,
                                                                      Qwen2_5_VLRMSNorm,
                                                                      Qwen2_5_VLRotaryEmbedding)

    class FlashLike(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out = torch.zeros(q.shape[0], q.shape[2], q.shape[1], q.shape[3], dtype=q.dtype)
            ctx.save_for_backward(q, k, v, out, torch.zeros(q.shape[:3], dtype=torch.float32))
            return out

        @staticmethod
        def backward(ctx, g):
            q, k, v, _, _ = ctx.saved_tensors
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    AttentionInterface.register("flash_like_test", lambda m, q, k, v, mask, **kw: (FlashLike.apply(q, k, v), None))
    arch, _, cfg = _tiny_arch()
    text = cfg.text_config
    text._attn_implementation = "flash_like_test"
    layer = Qwen2_5_VLDecoderLayer(text, 0).to(torch.bfloat16)
    norm = Qwen2_5_VLRMSNorm(64).to(torch.bfloat16)
    B, S = 2, 24
    x = torch.randn(B, S, 64, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = Qwen2_5_VLRotaryEmbedding(text)(x, torch.arange(S).view(1, 1, S).expand(3, B, S))
    shared = {t.untyped_storage().data_ptr() for t in [x, cos, sin, *layer.parameters(), *norm.parameters()]}

    def saved_bytes(fn) -> int:
        seen = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in shared:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(seen.values())

    assert saved_bytes(lambda: layer(x, position_embeddings=(cos, sin))) == B * S * mt.layer_saved_bytes(arch)
    # the final norm: its saved tensors, plus its output (kept by the LM-head kernel) and cos/sin
    assert saved_bytes(lambda: norm(x)) + B * S * (64 * 2 + 4 * 16) == B * S * mt.head_saved_bytes(arch)


@pytest.mark.parametrize("L,T", [(100, 20), (100, 29), (250, 7)])
def test_kv_term_is_the_static_cache_generate_allocates(L, T):
    from visioncoach.models.tiny import build_tiny_model
    from visioncoach.rollout.generate import _CACHE_BUCKET, _group_cache

    arch, counts, _ = _tiny_arch()
    w = _workload(prompt_tokens=L, completion_tokens=T)
    cache = _group_cache(build_tiny_model(), w.G, L + T, torch.bfloat16, torch.device("cpu"), reuse=False)
    allocated = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    slots = -(-(L + T) // _CACHE_BUCKET) * _CACHE_BUCKET
    assert cache.get_max_length() == slots
    one_layer_copy = w.G * slots * 2 * 2 * 16 * 2            # FA2's unpadded K/V of one layer
    assert mt.terms(arch, counts, w)["kv_static"] == allocated + one_layer_copy
    bigger = dataclasses.replace(w, bucket=_CACHE_BUCKET * 4)  # the rule, not a coincidence of sizes
    assert mt.terms(arch, counts, bigger)["kv_static"] == w.G * _CACHE_BUCKET * 4 * 3 * 128


def test_gpus_scale_the_partitioned_terms_only():
    arch, counts, _ = _tiny_arch()
    one, two = (mt.terms(arch, counts, _workload(gpus=n)) for n in (1, 2))
    for k in ("params_trained", "params_vision", "optimizer", "ref_partitioned", "opt_step"):
        assert one[k] == 2 * two[k], k
    assert one["grads"] - 2000 == 2 * (two["grads"] - 2000)        # the IPG bucket is not partitioned
    for k in ("ref_replica", "rollout_params", "act_checkpoints", "act_layer", "kv_static", "zero3_gathered"):
        assert one[k] == two[k], k


def _run(args, tmp_path, capsys):
    from visioncoach.tools.memory_plan import main

    out = tmp_path / "plan.json"
    assert main([*args, "--json", str(out), "--max-prompts", "4", "--max-g", "8"]) == 0
    return capsys.readouterr().out, json.loads(out.read_text())


def test_cli_prints_the_table_writes_json_and_scales_with_gpus(tmp_path, capsys):
    text8, plan8 = _run(["--gpus", "8"], tmp_path, capsys)
    assert "computed, not measured" in text8 and "Qwen2.5-VL-7B" in text8
    for what, _ in mt.TERMS.values():
        assert what in text8
    assert "largest prompts_per_step at G=4" in text8 and "assumptions:" in text8
    assert plan8["computed_not_measured"] and plan8["params"]["total"] == 8_292_166_656
    assert plan8["model"]["arch"]["vocab"] == 152064 and plan8["workload"]["seq"] == 16384 + 768 - 1
    _, plan1 = _run(["--gpus", "1"], tmp_path, capsys)
    t1, t8 = plan1["result"]["terms"], plan8["result"]["terms"]
    assert t1["params_trained"] == 8 * t8["params_trained"] and t1["optimizer"] == 8 * t8["optimizer"]
    assert t1["ref_replica"] == t8["ref_replica"] and t1["act_layer"] == t8["act_layer"]
    peaks = plan8["sweep"]["grid"]["peak_gib"]["partitioned"]
    assert all(a < b for row in peaks for a, b in zip(row, row[1:]))   # more G, more memory
    m = plan8["sweep"]["partitioned"]
    assert m["max_G"] >= 2 and "policy" in m["G_limited_by"]


def test_cli_reads_a_local_config_json_and_refuses_what_it_does_not_plan(tmp_path, capsys):
    _, _, cfg = _tiny_arch()
    folder = tmp_path / "model"
    folder.mkdir()
    cfg.to_json_file(str(folder / "config.json"))
    _, plan = _run([f"--model.path={folder}"], tmp_path, capsys)
    assert plan["params"]["total"] == 83_616 + 9_723_904 * 2 + 74_304
    assert plan["model"]["source"] == str(folder / "config.json")
    from visioncoach.tools.memory_plan import main

    assert main(["--dist.zero_stage=2"]) == 2
    assert "ZeRO-3" in capsys.readouterr().err
