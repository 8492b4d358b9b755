"""The shared fixtures: real Qwen2.5 tokenizer offline and the tiny random-weight Qwen2.5-VL."""

import pytest
import torch

from visioncoach.models.tiny import IMAGE_PAD_ID, VIDEO_PAD_ID, VISION_END_ID, VISION_START_ID


def test_tokenizer_is_qwen25(tokenizer):
    assert tokenizer("Hello, world!").input_ids == [9707, 11, 1879, 0]
    ids = tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                           "<|video_pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    assert ids == [VISION_START_ID, VISION_END_ID, IMAGE_PAD_ID, VIDEO_PAD_ID, 151644, 151645, 151643]
    assert len(tokenizer) == 151665
    text = "<think><obj>red ball</obj><box>[12, 30, 56, 77]</box>at<t>3.5</t>s</think>é 中文"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    # Special tokens are single ids, never split.
    assert tokenizer("<|video_pad|><|video_pad|>").input_ids == [VIDEO_PAD_ID, VIDEO_PAD_ID]


def test_tokenizer_built_offline_from_package_file(tmp_path, monkeypatch):
    from visioncoach.models import tokenizer as tok_mod

    monkeypatch.setenv("VISIONCOACH_CACHE", str(tmp_path))
    tok = tok_mod.qwen25_tokenizer()  # cold cache: converts the BPE file, then caches it
    assert list(tmp_path.glob("qwen25-tokenizer-*.json"))
    assert tok("Hello, world!").input_ids == [9707, 11, 1879, 0]


def _video_inputs(processor, frames=4, h=56, w=84, seed=0):
    g = torch.Generator().manual_seed(seed)
    video = torch.randint(0, 256, (frames, 3, h, w), dtype=torch.uint8, generator=g)
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}]}]
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return processor(text=[text], videos=[video], return_tensors="pt",
                     videos_kwargs={"do_sample_frames": False})


def test_tiny_model_forward_backward_with_video(tiny_model, processor):
    inputs = _video_inputs(processor)
    n_video_tokens = int((inputs["input_ids"] == VIDEO_PAD_ID).sum())
    t, h, w = inputs["video_grid_thw"][0].tolist()
    assert n_video_tokens == t * h * w // 4  # 2x2 spatial merge
    out = tiny_model(**inputs, labels=inputs["input_ids"])
    assert out.logits.shape == (1, inputs["input_ids"].shape[1], 151936)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    vision_grad = tiny_model.model.visual.patch_embed.proj.weight.grad
    lm_grad = tiny_model.lm_head.weight.grad
    assert vision_grad is not None and vision_grad.abs().sum() > 0  # gradient reaches the vision tower
    assert lm_grad.abs().sum() > 0


def test_tiny_model_video_changes_output(tiny_model, processor):
    a = _video_inputs(processor, seed=0)
    b = _video_inputs(processor, seed=1)
    with torch.no_grad():
        la = tiny_model(**a).logits[0, -1]
        lb = tiny_model(**b).logits[0, -1]
    assert not torch.allclose(la, lb)


def test_tiny_model_generate_with_video(tiny_model, processor):
    inputs = _video_inputs(processor)
    prompt_len = inputs["input_ids"].shape[1]
    out = tiny_model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, prompt_len + 6) or (out[0, -1] == 151645)
    assert torch.equal(out[0, :prompt_len], inputs["input_ids"][0])
    again = tiny_model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, again)  # greedy is deterministic


def test_tiny_model_is_seeded():
    from visioncoach.models.tiny import build_tiny_model

    a, b = build_tiny_model(seed=3), build_tiny_model(seed=3)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na
    c = build_tiny_model(seed=4)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_tiny_config_rejects_bad_head_dim():
    from visioncoach.models.tiny import tiny_qwen25_vl_config

    with pytest.raises(ValueError, match="M-RoPE"):
        tiny_qwen25_vl_config(hidden_size=12, num_heads=4)
