"""Data flow stage 3: decoded (and VP-rendered) frames -> Qwen2.5-VL model inputs.

Everything runs on the device the frames are on: resize (Qwen's smart-resize to multiples of
28, bicubic with antialiasing, as transformers' processor), then one native op
(``visioncoach.ops.patchify_normalize``) for rescale + normalise + patch layout, and the
token sequence is built by expanding each vision placeholder to its merged-patch count.
Two layouts:

* ``frames`` (default; the reference work's): each frame is an image preceded by
  "Frame i at T s:", then "The video is in total N seconds.", then the question.
  Timestamps are explicit text, which is what published checkpoints were trained on.
* ``video``: Qwen2.5-VL's native video input (frames paired along the temporal patch, with
  time-aligned M-RoPE position ids via ``second_per_grid_ts``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as TF

from visioncoach import ops
from visioncoach import templates
from visioncoach.templates import SYSTEM_PROMPT, format_time

PATCH, MERGE, TEMPORAL = 14, 2, 2
FACTOR = PATCH * MERGE


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2.5-VL's resize rule (transformers' implementation): multiples of 28, pixel budget."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as _sr

    return _sr(height, width, factor=FACTOR, min_pixels=min_pixels, max_pixels=max_pixels)


def resize_frames(frames: torch.Tensor, min_pixels: int, max_pixels: int) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> uint8 [F, h, w, 3] with h, w multiples of 28, on the same device."""
    f, h, w, _ = frames.shape
    rh, rw = smart_resize(h, w, min_pixels, max_pixels)
    if (rh, rw) == (h, w):
        return frames
    chw = frames.permute(0, 3, 1, 2)                                     # [F, 3, H, W]
    out = TF.resize(chw, [rh, rw], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return out.permute(0, 2, 3, 1).contiguous()


@dataclass
class ModelInputs:
    """Tensors for ``Qwen2_5_VLForConditionalGeneration`` (batch of one prompt) + metadata."""
    tensors: dict[str, torch.Tensor]
    frame_size: tuple[int, int]   # [W, H] of the frames the model sees: the boxes' pixel space
    num_vision_tokens: int

    def to(self, device) -> "ModelInputs":
        return ModelInputs({k: v.to(device) for k, v in self.tensors.items()}, self.frame_size,
                           self.num_vision_tokens)


def _plan(n: int, h: int, w: int, times: torch.Tensor, duration: float, user_text: str, tokenizer, *,
          layout: str, min_pixels: int, max_pixels: int, system_prompt: str,
          add_generation_prompt: bool):
    """What a prompt of ``n`` frames of h x w pixels is made of, without touching pixels:
    (chat token ids with one placeholder per image/video, the placeholder id, merged-patch
    tokens per placeholder, resized (h, w), frames padded to the temporal patch)."""
    if layout not in ("frames", "video", "image"):
        raise ValueError(f"layout must be 'frames', 'video' or 'image', got {layout!r}")
    if n == 0 or times.shape[0] != n:
        raise ValueError(f"need >= 1 frame and one time per frame, got {n} frames, {times.shape[0]} times")
    if layout == "image" and n != 1:
        raise ValueError(f"layout 'image' takes one image, got {n} frames")
    rh, rw = smart_resize(h, w, min_pixels, max_pixels)
    per_image = (rh // PATCH) * (rw // PATCH) // (MERGE * MERGE)
    times_l = [float(t) for t in times]
    total = f"The video is in total {format_time(duration)} seconds. {user_text}"
    if layout == "image":
        content, pad, counts = [{"type": "image"}, {"type": "text", "text": user_text}], "<|image_pad|>", [per_image]
    elif layout == "frames":
        content = []
        for i, t in enumerate(times_l):
            content += [{"type": "text", "text": f"Frame {i + 1} at {format_time(t)}s:"}, {"type": "image"}]
        content.append({"type": "text", "text": total})
        pad, counts = "<|image_pad|>", [per_image] * n
    else:
        padded = n + n % TEMPORAL   # the last frame repeated to fill the temporal patch, as HF does
        content, pad = [{"type": "video"}, {"type": "text", "text": total}], "<|video_pad|>"
        counts = [padded // TEMPORAL * per_image]
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    ids = tokenizer.apply_chat_template(system + [{"role": "user", "content": content}], tokenize=True,
                                        add_generation_prompt=add_generation_prompt)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids), tokenizer.convert_tokens_to_ids(pad), counts, (rh, rw)


def prompt_token_count(frames_shape, times: torch.Tensor, duration: float, user_text: str, tokenizer, *,
                       layout: str = "frames", min_pixels: int = 3136, max_pixels: int = 100352,
                       system_prompt: str = SYSTEM_PROMPT) -> int:
    """The length of ``build_inputs``' input_ids for frames of shape [F, H, W, 3], without
    resizing or patchifying anything (the prompt budget check, ``data.max_prompt_tokens``)."""
    n, h, w = int(frames_shape[0]), int(frames_shape[1]), int(frames_shape[2])
    ids, pad_id, counts, _ = _plan(n, h, w, times, duration, user_text, tokenizer, layout=layout,
                                   min_pixels=min_pixels, max_pixels=max_pixels,
                                   system_prompt=system_prompt, add_generation_prompt=True)
    return len(ids) - len(counts) + sum(counts)


def prompt_text(frames_shape, times: torch.Tensor, duration: float, user_text: str, tokenizer, *,
                layout: str = "frames", min_pixels: int = 3136, max_pixels: int = 100352,
                system_prompt: str = SYSTEM_PROMPT) -> str:
    """The chat text of ``build_inputs``' prompt as the tokenizer sees it: one vision placeholder
    (``<|image_pad|>`` / ``<|video_pad|>``) per image or video, before it is expanded to its
    merged-patch count (what ``python -m visioncoach.data.preview`` shows)."""
    n, h, w = int(frames_shape[0]), int(frames_shape[1]), int(frames_shape[2])
    ids, *_ = _plan(n, h, w, times, duration, user_text, tokenizer, layout=layout, min_pixels=min_pixels,
                    max_pixels=max_pixels, system_prompt=system_prompt, add_generation_prompt=True)
    return tokenizer.decode(ids)


def build_inputs(frames: torch.Tensor, times: torch.Tensor, duration: float, user_text: str,
                 tokenizer, *, layout: str = "frames", min_pixels: int = 3136,
                 max_pixels: int = 100352, system_prompt: str = SYSTEM_PROMPT,
                 add_generation_prompt: bool = True, dtype: torch.dtype = torch.float32) -> ModelInputs:
    """Model inputs for one clip (or, ``layout="image"``, one image) and question.

    frames: uint8 [F, H, W, 3] (any device); times: [F] seconds; user_text: question with hint
    and answer format (``visioncoach.templates.user_text``).
    """
    if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {tuple(frames.shape)} {frames.dtype}")
    n = frames.shape[0]
    ids, pad_id, counts, (rh, rw) = _plan(n, frames.shape[1], frames.shape[2], times, duration, user_text,
                                          tokenizer, layout=layout, min_pixels=min_pixels,
                                          max_pixels=max_pixels, system_prompt=system_prompt,
                                          add_generation_prompt=add_generation_prompt)
    resized = resize_frames(frames, min_pixels, max_pixels)             # [F, h, w, 3]
    h, w = resized.shape[1:3]
    gh, gw = h // PATCH, w // PATCH
    if layout in ("frames", "image"):
        # Each frame is a still image: repeated over the temporal patch, as the processor does.
        pixels = ops.patchify_normalize(resized.repeat_interleave(TEMPORAL, 0), dtype=dtype)
        grid = torch.tensor([[1, gh, gw]] * n, dtype=torch.int64)
        tensors = {"pixel_values": pixels, "image_grid_thw": grid.to(frames.device)}
        type_id = 1
    else:
        if n % TEMPORAL:
            resized = torch.cat([resized, resized[-1:]], 0)  # pad to the temporal patch, as HF does
        gt = resized.shape[0] // TEMPORAL
        pixels = ops.patchify_normalize(resized, dtype=dtype)
        times_l = [float(t) for t in times]
        # Seconds per temporal patch: the frames' mean spacing times the patch depth.
        spacing = (times_l[-1] - times_l[0]) / (n - 1) if n > 1 else 1.0
        tensors = {"pixel_values_videos": pixels,
                   "video_grid_thw": torch.tensor([[gt, gh, gw]], device=frames.device),
                   "second_per_grid_ts": torch.tensor([TEMPORAL * max(spacing, 1e-3)],
                                                      device=frames.device)}
        type_id = 2
    expanded, types, k = [], [], 0
    for tok in ids:
        if tok == pad_id:
            expanded += [pad_id] * counts[k]
            types += [type_id] * counts[k]
            k += 1
        else:
            expanded.append(tok)
            types.append(0)
    input_ids = torch.tensor([expanded], dtype=torch.int64, device=frames.device)
    tensors.update(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                   mm_token_type_ids=torch.tensor([types], dtype=torch.int64, device=frames.device))
    return ModelInputs(tensors, (w, h), sum(counts))


def sample_layout(sample, data_cfg) -> str:
    """``image`` for an image record's sample, else ``data.layout``."""
    return "image" if getattr(sample, "kind", "video") == "image" else data_cfg.layout


def sample_inputs(sample, frames: torch.Tensor, question: str, tokenizer, data_cfg) -> ModelInputs:
    """Model inputs of a decoded training sample (``data.loader.ClipSample``: its times,
    duration and task) on ``frames`` (its frames, possibly resized or visually prompted) for
    ``question``, with the task's answer format, in ``data_cfg``'s layout and pixel budget."""
    return build_inputs(frames, sample.times, sample.duration, templates.user_text(question, sample.record["task"]),
                        tokenizer, layout=sample_layout(sample, data_cfg), min_pixels=data_cfg.min_pixels,
                        max_pixels=data_cfg.max_pixels)


def fit_prompt_budget(sample, tokenizer, data_cfg):
    """``sample`` (a ``ClipSample``) whose prompt fits ``data.max_prompt_tokens``: as it is, or,
    with ``data.prompt_overflow=drop_frames``, with uniform frames dropped (the kept ones evenly
    spread, key frames always kept) down to ``data.min_frames`` frames in all. Raises ValueError
    (the sample is then skipped and counted) when it cannot fit, or on overflow with ``skip``."""
    import dataclasses

    limit = data_cfg.max_prompt_tokens
    text = templates.user_text(sample.record["question"], sample.record["task"])
    layout = sample_layout(sample, data_cfg)
    _, h, w, _ = sample.frames.shape

    def count(keep: list[int]) -> int:
        return prompt_token_count((len(keep), h, w), sample.times[keep], sample.duration, text, tokenizer,
                                  layout=layout, min_pixels=data_cfg.min_pixels, max_pixels=data_cfg.max_pixels)

    everything = list(range(sample.frames.shape[0]))
    n = count(everything)
    if n <= limit:
        return sample
    over = f"prompt of {n} tokens over data.max_prompt_tokens={limit}"
    if data_cfg.prompt_overflow == "skip" or layout == "image":
        raise ValueError(over)
    key = [i for i in everything if sample.is_key[i]]
    uniform = [i for i in everything if not sample.is_key[i]]

    def keep(k: int) -> list[int]:
        """All key frames and k uniform frames spread evenly over the uniform ones."""
        picked = [uniform[round(j * (len(uniform) - 1) / (k - 1))] for j in range(k)] if k > 1 else (
            [uniform[len(uniform) // 2]] if k == 1 else [])
        return sorted(set(key) | set(picked))

    lo = max(0, data_cfg.min_frames - len(key))          # fewest uniform frames allowed
    if lo >= len(uniform) or count(keep(lo)) > limit:
        raise ValueError(f"{over}, even with {len(keep(min(lo, len(uniform))))} frames "
                         f"(data.min_frames={data_cfg.min_frames})")
    hi = len(uniform) - 1                                 # the most uniform frames that might fit
    while lo < hi:                                        # the token count grows with k
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count(keep(mid)) <= limit else (lo, mid - 1)
    kept = keep(lo)
    return dataclasses.replace(sample, frames=sample.frames[kept], times=sample.times[kept],
                               is_key=sample.is_key[kept],
                               meta={**sample.meta, "frames_dropped": len(everything) - len(kept)})
