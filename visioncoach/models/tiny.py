"""A tiny random-weight Qwen2.5-VL with the real vocabulary, for tests and the CPU default.

Same architecture as the released models (windowed vision tower, patch merger, M-RoPE text
decoder, 151,936-row embedding and LM head), small widths: builds in about a second on a CPU.
"""

from __future__ import annotations

import logging

import torch

from visioncoach.models.tokenizer import QWEN25_VOCAB_SIZE, qwen25_tokenizer

log = logging.getLogger(__name__)

# Qwen2.5-VL token ids (the released configs).
VISION_START_ID, VISION_END_ID, IMAGE_PAD_ID, VIDEO_PAD_ID = 151652, 151653, 151655, 151656


def tiny_qwen25_vl_config(hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                          num_kv_heads: int = 2, vision_depth: int = 2,
                          vision_hidden_size: int = 32, attn_implementation: str = "sdpa"):
    from transformers import Qwen2_5_VLConfig

    head_dim = hidden_size // num_heads
    if head_dim % 2 or head_dim < 8:
        raise ValueError(f"hidden_size/num_heads = {head_dim} must be even and >= 8 for M-RoPE")
    half = head_dim // 2  # M-RoPE splits the rotary half-dim into (t, h, w) sections
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    text = dict(
        vocab_size=QWEN25_VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
        tie_word_embeddings=False, use_cache=True, bos_token_id=151643, eos_token_id=151645,
        pad_token_id=151643,
    )
    vision = dict(
        depth=vision_depth, hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size,
        num_heads=2, in_chans=3, out_hidden_size=hidden_size, patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2, window_size=112, fullatt_block_indexes=[vision_depth - 1],
        tokens_per_second=2,
    )
    cfg = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=IMAGE_PAD_ID,
        video_token_id=VIDEO_PAD_ID, vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID, tie_word_embeddings=False,
    )
    cfg._attn_implementation = attn_implementation
    return cfg


def build_tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, **config_overrides):
    """Random-weight ``Qwen2_5_VLForConditionalGeneration``, deterministic for a given seed."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = tiny_qwen25_vl_config(**config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = 151643
    model.generation_config.eos_token_id = 151645
    return model.to(dtype)


def build_processor(tokenizer=None, min_pixels: int = 28 * 28 * 4, max_pixels: int = 128 * 28 * 28):
    """Qwen2.5-VL processor (image + video) around the offline tokenizer.

    The defaults bound frames to <= 128 merged tokens (100,352 pixels), the reference setting.
    """
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tokenizer = tokenizer or qwen25_tokenizer()
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        video_processor=Qwen2VLVideoProcessor(size=size, cap_pixels_per_frame=True),
        tokenizer=tokenizer, chat_template=tokenizer.chat_template,
    )
