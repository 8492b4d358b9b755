"""Model inputs (visioncoach.processor) against transformers' Qwen2.5-VL processor, and both
layouts feeding the tiny Qwen2.5-VL."""


import pytest
import torch

from visioncoach import processor as P
from visioncoach.data.decode import decode
from visioncoach.templates import user_text
from shared_data import VIDEOS  # noqa: E402

CUP = VIDEOS / "cup.mp4"
MIN_PIX, MAX_PIX = 3136, 16 * 28 * 28


@pytest.fixture(scope="module")
def clip():
    return decode(CUP, nframes=4, key_times=[2.0])


def _hf_inputs(processor, messages, images=None, videos=None):
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    kw = {"images": images} if images is not None else {
        "videos": videos, "videos_kwargs": {"do_sample_frames": False}}
    return processor(text=[text], return_tensors="pt", **kw)


def test_smart_resize_matches_budget():
    assert P.smart_resize(480, 640, MIN_PIX, 100352) == (252, 364)
    h, w = P.smart_resize(61, 97, MIN_PIX, MAX_PIX)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= MAX_PIX


def test_frames_layout_equals_transformers_processor(clip, tokenizer, processor):
    question = user_text("What does the hand hold?", "General video QA Free-form")
    ours = P.build_inputs(clip.frames, clip.times, clip.duration, question, tokenizer,
                          layout="frames", min_pixels=MIN_PIX, max_pixels=MAX_PIX)
    content = []
    for i, t in enumerate(clip.times.tolist()):
        content += [{"type": "text", "text": f"Frame {i + 1} at {t:.1f}s:"}, {"type": "image"}]
    content.append({"type": "text", "text": f"The video is in total {clip.duration:.1f} seconds. {question}"})
    messages = [{"role": "system", "content": P.SYSTEM_PROMPT}, {"role": "user", "content": content}]
    hf = _hf_inputs(processor, messages, images=list(clip.frames.permute(0, 3, 1, 2)))
    assert torch.equal(ours.tensors["input_ids"], hf["input_ids"])
    assert torch.equal(ours.tensors["mm_token_type_ids"], hf["mm_token_type_ids"])
    assert torch.equal(ours.tensors["image_grid_thw"], hf["image_grid_thw"])
    # Same bicubic+antialias resize of the same uint8 frames, then the same normalisation:
    # equal up to fp32 rounding of the folded normalisation (a few ulps of values ~2).
    diff = (ours.tensors["pixel_values"] - hf["pixel_values"]).abs().max().item()
    assert diff <= 4e-6, diff
    h, w = P.smart_resize(*clip.frames.shape[1:3], MIN_PIX, MAX_PIX)
    assert ours.frame_size == (w, h)


def test_video_layout_equals_transformers_processor(clip, tokenizer, processor):
    frames = clip.frames[:4]
    question = user_text("What moves?", "General video QA Free-form")
    ours = P.build_inputs(frames, clip.times[:4], clip.duration, question, tokenizer, layout="video",
                          min_pixels=MIN_PIX, max_pixels=MAX_PIX)
    messages = [{"role": "system", "content": P.SYSTEM_PROMPT},
                {"role": "user", "content": [{"type": "video"}, {"type": "text", "text":
                 f"The video is in total {clip.duration:.1f} seconds. {question}"}]}]
    hf = _hf_inputs(processor, messages, videos=[frames.permute(0, 3, 1, 2)])
    assert torch.equal(ours.tensors["input_ids"], hf["input_ids"])
    assert torch.equal(ours.tensors["video_grid_thw"], hf["video_grid_thw"])
    diff = (ours.tensors["pixel_values_videos"] - hf["pixel_values_videos"]).abs().max().item()
    assert diff <= 4e-6, diff


@pytest.mark.parametrize("layout", ["frames", "video"])
def test_both_layouts_feed_the_tiny_model(layout, clip, tokenizer, tiny_model):
    inputs = P.build_inputs(clip.frames, clip.times, clip.duration,
                            user_text("Which object is held?", "General video QA MCQ"), tokenizer,
                            layout=layout, min_pixels=MIN_PIX, max_pixels=MAX_PIX)
    t = inputs.tensors
    out = tiny_model(**t, labels=t["input_ids"])
    assert torch.isfinite(out.loss)
    pad = "<|image_pad|>" if layout == "frames" else "<|video_pad|>"
    assert int((t["input_ids"] == tokenizer.convert_tokens_to_ids(pad)).sum()) == inputs.num_vision_tokens
    with torch.no_grad():
        g = tiny_model.generate(**t, max_new_tokens=3, do_sample=False)
    assert g.shape[1] <= t["input_ids"].shape[1] + 3


def test_odd_frame_count_in_video_layout_is_padded(clip, tokenizer):
    inputs = P.build_inputs(clip.frames[:3], clip.times[:3], clip.duration, "q?", tokenizer,
                            layout="video", min_pixels=MIN_PIX, max_pixels=MAX_PIX)
    assert inputs.tensors["video_grid_thw"][0, 0].item() == 2


def test_bad_inputs(tokenizer):
    with pytest.raises(ValueError, match="layout"):
        P.build_inputs(torch.zeros(1, 28, 28, 3, dtype=torch.uint8), torch.zeros(1), 1.0, "q",
                       tokenizer, layout="tubes")
    with pytest.raises(ValueError, match="uint8"):
        P.build_inputs(torch.zeros(1, 28, 28, 3), torch.zeros(1), 1.0, "q", tokenizer)
    with pytest.raises(ValueError, match="one time per frame"):
        P.build_inputs(torch.zeros(2, 28, 28, 3, dtype=torch.uint8), torch.zeros(1), 1.0, "q", tokenizer)
    with pytest.raises(ValueError, match="unknown task"):
        user_text("q", "dance QA")
