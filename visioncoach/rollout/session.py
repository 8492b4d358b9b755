"""A loaded policy for greedy generation on videos: benchmark prediction (``visioncoach.predict``),
grounded inference on one video (``visioncoach.infer``) and the local answer judge
(``visioncoach.eval.judge``) all run through one ``Session``.

Greedy decoding goes through the rollout engine (``generate_group`` with G = 1), so the vision
features of a clip can be reused for every prompt on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from visioncoach.data.decode import DecodedClip, decode
from visioncoach.processor import build_inputs
from visioncoach.rollout.generate import generate_group
from visioncoach.rollout.prompt import VisionFeatures

__all__ = ["Session", "load_session", "resolve_device"]



@dataclass
class Session:
    """A loaded policy with everything one greedy generation needs."""
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    nframes: int = 16
    min_pixels: int = 3136
    max_pixels: int = 100352
    layout: str = "frames"
    max_new_tokens: int = 768
    decoder: str = "pyav"
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 151643
    source: str = ""   # which folder the given path resolved to (visioncoach.models.resolve)

    def decode(self, path: str | Path, key_times: tuple[float, ...] = ()) -> DecodedClip:
        """``nframes`` uniform frames, plus frames at ``key_times`` (marked ``is_key``)."""
        return decode(path, nframes=self.nframes, key_times=key_times, backend=self.decoder)

    def _complete(self, inputs, vision: VisionFeatures | None, max_new_tokens: int):
        group = generate_group(self.model, inputs, 1, greedy=True, max_new_tokens=max_new_tokens,
                               eos_token_ids=self.eos_token_ids, pad_token_id=self.pad_token_id,
                               vision=vision, logprobs=False)
        n = int(group.lengths[0])
        return self.tokenizer.decode(group.tokens[0, :n].tolist(), skip_special_tokens=True), group.vision

    def generate(self, clip: DecodedClip, text: str, vision: VisionFeatures | None = None
                 ) -> tuple[str, tuple[int, int], VisionFeatures]:
        """Greedy answer to ``text`` (a ``templates.user_text``) on the clip's frames.

        Returns (output text, [W, H] of the frames the model saw (its boxes' pixel space),
        the visual features to pass back for the next prompt on the same clip).
        """
        inputs = build_inputs(clip.frames.to(self.device), clip.times, clip.duration, text, self.tokenizer,
                              layout=self.layout, min_pixels=self.min_pixels, max_pixels=self.max_pixels,
                              dtype=self.model.dtype)
        out, vision = self._complete(inputs, vision, self.max_new_tokens)
        return out, inputs.frame_size, vision

    def generate_text(self, messages: list[dict], max_new_tokens: int) -> str:
        """Greedy reply to a text-only chat (the local answer judge)."""
        ids = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        input_ids = torch.tensor([ids], dtype=torch.int64, device=self.device)
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        return self._complete(inputs, VisionFeatures(), max_new_tokens)[0]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_session(path: str | Path, *, device: str = "auto", dtype: str = "auto", attn: str = "auto",
               **options) -> Session:
    """The policy of a local folder as a ``Session``: a ``from_pretrained`` folder (model +
    processor) or a training checkpoint, stage or run folder (``visioncoach.models.resolve``,
    through ``build_policy``; a folder that is none is a ``ModelDirError``, a
    ``FileNotFoundError``, raised before anything loads). ``Session.source`` says which folder
    was loaded. ``options`` are ``Session`` fields (nframes, min_pixels, max_pixels, ...)."""
    from visioncoach.config import DataConfig, ModelConfig
    from visioncoach.models.policy import build_policy
    from visioncoach.models.resolve import ModelDirError

    if not str(path):
        raise ModelDirError("--model must be a local checkpoint folder")
    dev = resolve_device(device)
    # Unset pixel bounds (None) are the checkpoint's: its processor holds the ones it was
    # trained with (a tiny run trains at 12,544 pixels a frame, the paper at 100,352).
    given = {k: options.pop(k) for k in ("min_pixels", "max_pixels") if options.get(k) is not None}
    options.pop("min_pixels", None), options.pop("max_pixels", None)
    # None: load_model_dir keeps the saved processor's bounds.
    data = DataConfig(min_pixels=given.get("min_pixels"), max_pixels=given.get("max_pixels"))
    model, processor, info = build_policy(
        ModelConfig(path=str(path), attn_implementation=attn, dtype=dtype, gradient_checkpointing=False),
        data, dev)
    model.eval()
    tokenizer = processor.tokenizer
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    eos += [t for t in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")) if t is not None]
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else tokenizer.pad_token_id
    size = getattr(getattr(processor, "image_processor", None), "size", None) or {}
    pixels = {"min_pixels": given.get("min_pixels", _size_value(size, "shortest_edge", 3136)),
              "max_pixels": given.get("max_pixels", _size_value(size, "longest_edge", 100352))}
    return Session(model, tokenizer, dev, eos_token_ids=tuple(sorted(set(eos))), pad_token_id=pad,
                   source=info["source"], **pixels, **options)


def _size_value(size, key: str, default: int) -> int:
    """A pixel bound of a Qwen2-VL image processor's ``size`` (``shortest_edge`` = min pixels,
    ``longest_edge`` = max pixels: transformers' names), or ``default``."""
    value = size.get(key) if hasattr(size, "get") else getattr(size, key, None)
    return int(value) if value else default
