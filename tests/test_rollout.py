"""The GSPO rollout engine (visioncoach.rollout) on the tiny Qwen2.5-VL: greedy equality with
transformers' generate in both layouts (EOS stop and padding included), one vision-encoder
pass and one prefill per group, sampling semantics (top-p as TopPLogitsWarper, reproducible
with a generator), and the teacher-forced log-prob pass that reuses the prompt embeddings."""


import pytest
import torch

from visioncoach import processor as P
from visioncoach.data.decode import decode
from visioncoach.templates import user_text
from visioncoach.rollout import (
    completion_hidden_states, completion_logprobs, encode_vision, generate_group, prompt_embeds,
    sample_tokens, top_p_mask,
)
from visioncoach.utils.profiling import CallCounter
from shared_data import VIDEOS  # noqa: E402

CUP = VIDEOS / "cup.mp4"
MIN_PIX, MAX_PIX = 3136, 16 * 28 * 28
PAD = 151643
N = 12  # new tokens


@pytest.fixture(scope="module")
def model():
    from visioncoach.models.tiny import build_tiny_model

    return build_tiny_model(seed=0).eval()


@pytest.fixture(scope="module")
def clip():
    return decode(CUP, nframes=4, key_times=[2.0])


@pytest.fixture(scope="module")
def inputs(clip, tokenizer):
    question = user_text("What does the hand hold?", "General video QA Free-form")
    return {layout: P.build_inputs(clip.frames, clip.times, clip.duration, question, tokenizer,
                                   layout=layout, min_pixels=MIN_PIX, max_pixels=MAX_PIX)
            for layout in ("frames", "video")}


def _hf_greedy(model, inp, n, eos=None):
    with torch.no_grad():
        out = model.generate(**inp.tensors, do_sample=False, max_new_tokens=n, eos_token_id=eos,
                             pad_token_id=PAD)
    return out[0, inp.tensors["input_ids"].shape[1]:]


@pytest.fixture(scope="module")
def hf_greedy(model, inputs):
    return {layout: _hf_greedy(model, inp, N) for layout, inp in inputs.items()}


def _group(model, inp, G, **kw):
    kw.setdefault("max_new_tokens", N)
    kw.setdefault("pad_token_id", PAD)
    kw.setdefault("eos_token_ids", None)
    return generate_group(model, inp, G, **kw)


# ----------------------------------------------------------------------------- greedy == HF

@pytest.mark.parametrize("layout", ["frames", "video"])
def test_greedy_equals_hf_generate(layout, model, inputs, hf_greedy):
    ref = hf_greedy[layout]
    assert ref.shape == (N,)
    for G in (1, 3):
        g = _group(model, inputs[layout], G, greedy=True)
        assert torch.equal(g.tokens, ref.expand(G, -1)), (G, g.tokens, ref)
        assert g.lengths.tolist() == [N] * G and not g.finished.any()
        assert g.prompt_length == inputs[layout].tensors["input_ids"].shape[1]


@pytest.mark.parametrize("layout", ["frames", "video"])
def test_greedy_eos_stop_equals_hf_generate(layout, model, inputs, hf_greedy):
    # Make the token greedy decoding produces at step 3 an EOS: both must stop there.
    eos = int(hf_greedy[layout][2])
    stop = hf_greedy[layout].tolist().index(eos) + 1          # 3 unless it appeared earlier
    ref = _hf_greedy(model, inputs[layout], N, eos=[eos, 151645])
    assert ref.shape == (stop,) and int(ref[-1]) == eos
    for G in (1, 3):
        g = _group(model, inputs[layout], G, greedy=True, eos_token_ids=[eos, 151645])
        assert torch.equal(g.tokens, ref.expand(G, -1))
        assert g.lengths.tolist() == [stop] * G and g.finished.all()
        assert g.steps == stop                                # CPU checks every step
    # The explicit filled-slot mask (what flash-attention needs) gives the same tokens.
    g = _group(model, inputs[layout], 2, greedy=True, kv_mask=True)
    assert torch.equal(g.tokens, hf_greedy[layout].expand(2, -1))


def test_sampling_stops_rows_at_eos_and_pads(model, inputs):
    inp = inputs["frames"]
    free = _group(model, inp, 4, generator=torch.Generator().manual_seed(3))
    # An EOS set from tokens the rows drew: the same random stream, so each row is the free
    # row cut after its first EOS, then padding; rows without one run to max_new_tokens.
    eos = {int(free.tokens[0, 2]), int(free.tokens[1, 5])}
    g = _group(model, inp, 4, generator=torch.Generator().manual_seed(3), eos_token_ids=eos)
    for r in range(4):
        row = free.tokens[r].tolist()
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), N)
        assert g.lengths[r] == cut and bool(g.finished[r]) == (cut < N or row[-1] in eos)
        assert g.tokens[r, :cut].tolist() == row[:cut]
        assert (g.tokens[r, cut:] == PAD).all() and (g.logprobs[r, cut:] == 0).all()
        assert torch.equal(g.logprobs[r, :cut], free.logprobs[r, :cut])
    assert g.tokens.shape[1] == int(g.lengths.max())
    assert torch.equal(g.mask, torch.arange(g.tokens.shape[1])[None] < g.lengths[:, None])


# ----------------------------------------------------------------------------- encoder / prefill once

def test_vision_encoder_and_prefill_run_once_per_group(model, inputs):
    inp = inputs["frames"]
    for G in (1, 4):
        with CallCounter(model.model.visual) as vis, \
                CallCounter(model.model.language_model, min_seq=2) as prefill:
            g = _group(model, inp, G, max_new_tokens=4, generator=torch.Generator().manual_seed(0))
        assert vis.calls == 1, G
        assert (prefill.calls, prefill.rows) == (1, 1), G        # one prompt row, not G
    with CallCounter(model.model.visual) as vis:
        again = _group(model, inp, 4, max_new_tokens=4, vision=g.vision,
                       generator=torch.Generator().manual_seed(0))
        _group(model, inp, 2, max_new_tokens=2, prompt=g.prompt)
    assert vis.calls == 0
    assert torch.equal(again.tokens, g.tokens)


def test_prompt_embeds_equal_the_models_own(model, inputs):
    # What Qwen2_5_VLModel.forward feeds its language model, captured by a hook.
    for layout, inp in inputs.items():
        seen = {}
        lm = model.model.language_model
        h = lm.register_forward_pre_hook(
            lambda m, a, kw: seen.update(kw), with_kwargs=True)
        try:
            with torch.no_grad():
                model(**inp.tensors)
        finally:
            h.remove()
        with torch.no_grad():
            pe = prompt_embeds(model, inp, encode_vision(model, inp))
        assert torch.equal(pe.inputs_embeds, seen["inputs_embeds"]), layout
        assert torch.equal(pe.position_ids, seen["position_ids"]), layout
        assert int(pe.rope_deltas) == int(pe.position_ids.max()) + 1 - pe.length


# ----------------------------------------------------------------------------- sampling

def test_sampling_reproducible_rows_differ_and_tiny_top_p_is_greedy(model, inputs, hf_greedy):
    inp = inputs["video"]
    a = _group(model, inp, 4, generator=torch.Generator().manual_seed(7))
    b = _group(model, inp, 4, generator=torch.Generator().manual_seed(7))
    c = _group(model, inp, 4, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(a.tokens[i], a.tokens[j])
    assert (a.lengths == N).all() and not a.finished.any()
    g = _group(model, inp, 3, top_p=1e-9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(g.tokens, hf_greedy["video"].expand(3, -1))


def _nucleus_float64(scores, top_p):
    """The definition, in float64: keep a token iff the mass of the more likely ones < top_p."""
    p, order = torch.sort(scores.double().softmax(-1), descending=True)
    above = torch.cat([torch.zeros_like(p[:, :1]), p.cumsum(-1)[:, :-1]], 1)
    keep = above < top_p
    keep[:, 0] = True
    return torch.zeros_like(keep).scatter_(-1, order, keep)


@pytest.mark.parametrize("scale", [0.05, 1.0, 6.0])
def test_top_p_mask_semantics(scale):
    from transformers.generation.logits_process import TopPLogitsWarper

    gen = torch.Generator().manual_seed(int(scale * 100))
    scores = torch.randn(3, 151936, generator=gen) * scale
    for top_p in (0.95, 0.5, 0.999, 1e-9):
        exact = _nucleus_float64(scores, top_p)
        hf = torch.isfinite(TopPLogitsWarper(top_p)(None, scores))
        for method in ("radix", "sort"):
            mask = top_p_mask(scores, top_p, method=method)
            # at most a near-tie at the boundary differs from the float64 definition, and a
            # few from transformers' float32 accumulation (it sums from the least likely up)
            assert (mask != exact).sum(-1).max() <= 1, (scale, top_p, method)
            assert (mask != hf).sum(-1).max() <= 8, (scale, top_p, method)
            assert mask[torch.arange(3), scores.argmax(-1)].all()
        assert (top_p_mask(scores, top_p) != exact).sum(-1).max() <= 1
    assert top_p_mask(scores, 1e-9).sum(-1).tolist() == [1] * 3
    assert top_p_mask(scores, 1.0).all()


def test_sampled_frequencies_follow_the_nucleus():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]))
    # top_p 0.8: {0.4, 0.3, 0.15} (mass 0.85), renormalised; with temperature 2 the same rule
    # applies to softmax(logits / 2). (radix: fewer draws, its histograms are per row)
    for temperature, top_p in ((1.0, 0.8), (2.0, 0.8), (1.0, 1.0)):
        p = torch.softmax(logits / temperature, 0)
        order = p.argsort(descending=True)
        k = int((p[order].cumsum(0) < top_p).sum()) + 1
        want = torch.zeros_like(p)
        want[order[:k]] = p[order[:k]]
        want /= want.sum()
        for method, draws, tol in (("sort", 40000, 0.01), ("radix", 1000, 0.06)):
            tok, lp = sample_tokens(logits.expand(draws, -1), temperature=temperature, top_p=top_p,
                                    generator=torch.Generator().manual_seed(1), top_p_method=method)
            freq = torch.bincount(tok, minlength=5).float() / tok.numel()
            assert (freq - want).abs().max() < tol, (temperature, top_p, method, freq, want)
            assert freq[want == 0].sum() == 0
            # log-probs are the model's (raw logits), whatever the warping
            assert torch.allclose(lp, logits.log_softmax(0)[tok])


# ----------------------------------------------------------------------------- log-prob reuse

def test_teacher_forced_logprobs_reuse_prompt_and_match_generation(model, inputs):
    inp = inputs["frames"]
    g = _group(model, inp, 3, generator=torch.Generator().manual_seed(5),
               eos_token_ids=None)
    with CallCounter(model.model.visual) as vis, torch.no_grad():
        h = completion_hidden_states(model, g.prompt, g.tokens, g.lengths)
        full = completion_hidden_states(model, g.prompt, g.tokens, g.lengths, share_prompt=False)
        lp_helper = completion_logprobs(model, g.prompt, g.tokens, g.lengths)
    assert vis.calls == 0
    assert h.shape == (3, g.tokens.shape[1], model.config.text_config.hidden_size)
    for hidden in (h, full):
        lp = model.lm_head(hidden).log_softmax(-1).gather(-1, g.tokens[..., None]).squeeze(-1)
        assert torch.allclose(lp, g.logprobs, atol=1e-5, rtol=0), (lp - g.logprobs).abs().max()
    assert torch.allclose(lp_helper, g.logprobs, atol=1e-5, rtol=0)

    # Against the full model (vision tower included) on the concatenated ids of one row.
    t = dict(inp.tensors)
    ids = torch.cat([t["input_ids"], g.tokens[:1]], 1)
    t.update(input_ids=ids, attention_mask=torch.ones_like(ids),
             mm_token_type_ids=torch.cat([t["mm_token_type_ids"], torch.zeros_like(g.tokens[:1])], 1))
    with torch.no_grad():
        logits = model(**t).logits[0, g.prompt_length - 1:-1]
    ref = logits.log_softmax(-1).gather(-1, g.tokens[0, :, None]).squeeze(-1)
    assert torch.allclose(ref, g.logprobs[0], atol=1e-5, rtol=0)


def test_teacher_forced_pass_backpropagates_and_trims_to_lengths(model, inputs):
    inp = inputs["video"]
    g = _group(model, inp, 2, max_new_tokens=6, generator=torch.Generator().manual_seed(2))
    lengths = torch.tensor([6, 3])
    model.zero_grad()
    lp = completion_logprobs(model, g.prompt, g.tokens, lengths)
    assert (lp[1, 3:] == 0).all() and torch.allclose(lp[0], g.logprobs[0], atol=1e-5, rtol=0)
    lp.sum().backward()
    w = model.model.language_model.layers[0].self_attn.q_proj.weight
    assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
    assert model.model.visual.patch_embed.proj.weight.grad is None   # no vision tower
    model.zero_grad()


def test_training_mode_with_checkpointing_still_decodes(inputs, hf_greedy):
    from visioncoach.models.tiny import build_tiny_model

    m = build_tiny_model(seed=0)
    m.activation_checkpointing_enable()
    m.train()
    m.model.visual.eval()                                # a frozen tower kept in eval
    g = _group(m, inputs["frames"], 2, greedy=True, max_new_tokens=5)
    assert m.training and m.model.language_model.training and not m.model.visual.training
    assert torch.equal(g.tokens, hf_greedy["frames"][:5].expand(2, -1))
    lp = completion_logprobs(m, g.prompt, g.tokens)      # falls back to the full forward
    assert torch.allclose(lp, g.logprobs, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- logprobs=False

_VOCAB_REDUCTIONS = frozenset({"logsumexp", "log_softmax", "softmax", "_log_softmax", "_softmax"})


class _VocabReductions(torch.overrides.TorchFunctionMode):
    """Counts log-softmax / logsumexp / softmax calls on tensors whose last dim is ``vocab``,
    whichever spelling is used (torch.*, Tensor.*, F.*)."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.calls = vocab, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        x = args[0] if args else None
        if (getattr(func, "__name__", "") in _VOCAB_REDUCTIONS and isinstance(x, torch.Tensor)
                and x.dim() and x.shape[-1] == self.vocab):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_sample_tokens_without_logprobs_same_tokens_on_awkward_logits():
    gen = torch.Generator().manual_seed(3)
    ties = torch.zeros(3, 7)
    ties[:, [2, 5]] = 1.0                              # argmax takes the first of equal maxima
    cases = {
        "ties": ties,
        "neg_inf": torch.tensor([[-float("inf"), 0.5, -float("inf")], [2.0, -float("inf"), 2.0]]),
        "one_token": torch.randn(4, 1, generator=gen),
        "no_rows": torch.randn(0, 9, generator=gen),
        "bf16": torch.randn(5, 33, generator=gen).bfloat16(),
        "vocab": torch.randn(2, 151936, generator=gen) * 4,
    }
    for name, logits in cases.items():
        tok, lp = sample_tokens(logits, greedy=True)
        tok_only, none = sample_tokens(logits, greedy=True, logprobs=False)
        assert none is None and torch.equal(tok_only, tok), name
        assert torch.equal(tok, logits.float().argmax(-1)), name
        assert lp.shape == tok.shape and lp.dtype == torch.float32, name
        if logits.shape[1] > 1:
            for temperature, top_p in ((1.0, 0.9), (0.7, 1.0)):
                kw = {"temperature": temperature, "top_p": top_p}
                a, lp_a = sample_tokens(logits, generator=torch.Generator().manual_seed(1), **kw)
                b, none = sample_tokens(logits, generator=torch.Generator().manual_seed(1),
                                        logprobs=False, **kw)
                assert none is None and torch.equal(a, b), (name, kw)
                assert lp_a.shape == a.shape, (name, kw)


@pytest.mark.parametrize("layout", ["frames", "video"])
def test_greedy_without_logprobs_same_tokens_and_no_vocab_log_softmax(layout, model, inputs, hf_greedy):
    vocab = model.config.text_config.vocab_size
    eos = int(hf_greedy[layout][4])                    # stop early on some rows' paths
    for G, eos_ids in ((1, None), (3, None), (2, [eos, 151645])):
        with _VocabReductions(vocab) as with_lp:
            full = _group(model, inputs[layout], G, greedy=True, eos_token_ids=eos_ids)
        with _VocabReductions(vocab) as without_lp:
            fast = _group(model, inputs[layout], G, greedy=True, eos_token_ids=eos_ids, logprobs=False)
        assert fast.logprobs is None and full.logprobs.shape == full.tokens.shape
        assert torch.equal(fast.tokens, full.tokens), (G, fast.tokens, full.tokens)
        assert torch.equal(fast.lengths, full.lengths) and torch.equal(fast.finished, full.finished)
        assert fast.steps == full.steps
        assert with_lp.calls >= full.steps                # the counter sees the per-step logsumexp
        assert without_lp.calls == 0, without_lp.calls
        if eos_ids is None:
            assert torch.equal(fast.tokens, hf_greedy[layout].expand(G, -1))


def test_sampled_rollout_unchanged_by_the_switch(model, inputs):
    """RL keeps its log-probs (the default); turning them off changes no token."""
    inp = inputs["frames"]
    kw = {"max_new_tokens": 6, "temperature": 0.8, "top_p": 0.9}
    a = _group(model, inp, 3, generator=torch.Generator().manual_seed(11), **kw)
    b = _group(model, inp, 3, generator=torch.Generator().manual_seed(11), logprobs=False, **kw)
    assert b.logprobs is None and torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
    with torch.no_grad():
        ref = completion_logprobs(model, a.prompt, a.tokens, a.lengths)
    assert torch.allclose(ref, a.logprobs, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- errors, GPU

def test_bad_arguments(model, inputs):
    inp = inputs["frames"]
    with pytest.raises(ValueError, match="G >= 1"):
        _group(model, inp, 0)
    with pytest.raises(ValueError, match="top_p"):
        _group(model, inp, 1, top_p=0.0, max_new_tokens=1)
    with pytest.raises(ValueError, match="temperature"):
        _group(model, inp, 1, temperature=0.0, max_new_tokens=1)
    with torch.no_grad():
        vision = encode_vision(model, inp)
    from visioncoach.rollout import VisionFeatures

    with pytest.raises(ValueError, match="do not match"):
        prompt_embeds(model, inp, VisionFeatures(image=vision.image[:-1]))
    with pytest.raises(ValueError, match="no image features"):
        prompt_embeds(model, inp, VisionFeatures())


@pytest.mark.gpu
def test_compiled_decode_on_cuda_equals_eager(inputs):
    from visioncoach.models.tiny import build_tiny_model

    m = build_tiny_model(seed=0).cuda().eval()
    inp = inputs["frames"].to("cuda")
    eager = _group(m, inp, 4, greedy=True, max_new_tokens=16)
    for _ in range(2):  # second call: same cache buffers, graphs replayed
        compiled = _group(m, inp, 4, greedy=True, max_new_tokens=16, compile_decode=True)
        assert torch.equal(compiled.tokens, eager.tokens)
    gen = torch.Generator("cuda").manual_seed(0)
    s = _group(m, inp, 4, max_new_tokens=16, compile_decode=True, generator=gen)
    assert s.tokens.shape == (4, 16)
