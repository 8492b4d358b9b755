"""Grounded inference on one video: ``python -m visioncoach.infer --model PATH --video V --question Q
[--out DIR]``.

Prints the model's reasoning and answer and writes, under ``--out`` (default ``infer_out``):

* ``<video stem>_grounding.png``: a contact sheet of the sampled frames (what the model saw,
  in time order, captioned with their times) with every grounding claim's boxes and object
  name drawn on the frame nearest the claim's time;
* ``<video stem>_grounding.json``: the raw output, think and answer blocks, parse errors,
  the frames' times, and the claims with their boxes both in the pixels of the frames the
  model saw (``frame_size``, what the model writes) and in original-video pixels.

Boxes. The model writes boxes in pixels of its resized frames (``ModelInputs.frame_size``,
Qwen's smart-resize of the whole frame: no crop, so x and y scale independently); the sheet
draws them on thumbnails of the original frames, scaling x by tile width / frame width and
y by tile height / frame height.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from visioncoach.grounding import Claim, normalize_name, parse
from visioncoach.templates import ANSWER_FORMAT, user_text

__all__ = ["Tile", "ContactSheet", "PALETTE", "nearest_frame", "draw_contact_sheet", "write_grounding", "main"]

# Distinct, saturated colours (Sasha Trubetskoy's list) so boxes stand out on any footage.
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]
BACKGROUND = (24, 24, 24)
CAPTION = (235, 235, 235)


@dataclass
class Tile:
    """Where one frame's thumbnail sits in the sheet (pixels)."""
    x: int
    y: int
    width: int
    height: int


@dataclass
class ContactSheet:
    image: object                 # PIL.Image.Image, RGB
    tiles: list[Tile]             # one per frame
    claim_frames: list[int]       # the frame each claim is drawn on
    colors: dict[str, tuple]      # normalised object name -> RGB


def nearest_frame(times, t: float) -> int:
    """Index of the frame whose time is closest to t (the earlier one on a tie)."""
    return int(np.argmin(np.abs(np.asarray(times, dtype=np.float64) - t)))


def draw_contact_sheet(frames, times, claims: list[Claim], frame_size: tuple[int, int], *,
                       columns: int = 4, tile_width: int = 320, line_width: int = 3,
                       caption_height: int = 18, pad: int = 6) -> ContactSheet:
    """Draw the frames in a grid and each claim's boxes on the frame nearest its time.

    frames: uint8 [F, H, W, 3] (tensor or array), the decoded frames; times: [F] seconds;
    claims: boxes in pixels of a frame of ``frame_size`` = (W, H), the space the model saw.
    Each tile is ``tile_width`` wide with the frames' aspect ratio; a box (x1, y1, x2, y2)
    lands at (tile.x + x1 * tile.width / W, tile.y + y1 * tile.height / H, ...), clipped to
    its tile, outlined ``line_width`` pixels thick inward, with the object name on a filled
    label in the same colour at its top-left corner (one colour per normalised name).
    """
    from PIL import Image, ImageDraw, ImageFont

    arr = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8 or len(arr) == 0:
        raise ValueError(f"frames must be uint8 [F, H, W, 3] with F >= 1, got {arr.shape} {arr.dtype}")
    times = [float(t) for t in times]
    if len(times) != len(arr):
        raise ValueError(f"{len(arr)} frames but {len(times)} times")
    n, h, w = arr.shape[:3]
    cols = min(columns, n)
    rows = -(-n // cols)
    tw, th = tile_width, max(1, round(h * tile_width / w))
    sheet = Image.new("RGB", (pad + cols * (tw + pad), pad + rows * (caption_height + th + pad)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=max(8, caption_height - 6))
    tiles = []
    for i in range(n):
        x = pad + (i % cols) * (tw + pad)
        y = pad + (i // cols) * (caption_height + th + pad) + caption_height
        sheet.paste(Image.fromarray(arr[i]).resize((tw, th), Image.Resampling.BILINEAR), (x, y))
        draw.text((x, y - caption_height + 2), f"frame {i + 1} at {times[i]:.1f}s", fill=CAPTION, font=font)
        tiles.append(Tile(x, y, tw, th))

    colors: dict[str, tuple] = {}
    claim_frames = []
    sx, sy = tw / frame_size[0], th / frame_size[1]
    for c in claims:
        color = colors.setdefault(normalize_name(c.obj), PALETTE[len(colors) % len(PALETTE)])
        k = nearest_frame(times, c.t)
        claim_frames.append(k)
        t = tiles[k]
        for x1, y1, x2, y2 in c.boxes:
            # Tile pixel coordinates, clipped so a box never spills onto a neighbour.
            rect = [min(max(t.x + round(x1 * sx), t.x), t.x + tw - 1),
                    min(max(t.y + round(y1 * sy), t.y), t.y + th - 1),
                    min(max(t.x + round(x2 * sx), t.x), t.x + tw - 1),
                    min(max(t.y + round(y2 * sy), t.y), t.y + th - 1)]
            draw.rectangle(rect, outline=color, width=line_width)
            left, top, right, bottom = draw.textbbox((rect[0], rect[1]), c.obj, font=font)
            label = [rect[0], rect[1], min(right + 4, t.x + tw - 1), min(bottom + 2, t.y + th - 1)]
            draw.rectangle(label, fill=color)
            draw.text((rect[0] + 2, rect[1]), c.obj, fill=(0, 0, 0), font=font)
    return ContactSheet(sheet, tiles, claim_frames, colors)


def write_grounding(out_dir: str | Path, stem: str, output: str, frames, times,
                    frame_size: tuple[int, int], meta: dict | None = None) -> dict:
    """Parse ``output``, draw the contact sheet and write ``<stem>_grounding.{png,json}``.

    Returns the JSON document (with the two paths under ``files``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parsed = parse(output)
    sheet = draw_contact_sheet(frames, times, parsed.claims, frame_size)
    video_h, video_w = (frames.shape[1], frames.shape[2])
    scale = (video_w / frame_size[0], video_h / frame_size[1])
    png, js = out_dir / f"{stem}_grounding.png", out_dir / f"{stem}_grounding.json"
    sheet.image.save(png)
    doc = {
        **(meta or {}),
        "output": output, "think": parsed.think, "answer": parsed.answer, "parse_errors": parsed.errors,
        "frame_size": list(frame_size), "video_size": [int(video_w), int(video_h)],
        "frames": [{"index": i, "time": round(float(t), 3)} for i, t in enumerate(times)],
        "claims": [{"obj": c.obj, "t": c.t, "frame_index": k,
                    "boxes": [list(b) for b in c.boxes],
                    "boxes_video": [[round(b[0] * scale[0], 1), round(b[1] * scale[1], 1),
                                     round(b[2] * scale[0], 1), round(b[3] * scale[1], 1)] for b in c.boxes]}
                   for c, k in zip(parsed.claims, sheet.claim_frames)],
        "files": {"contact_sheet": str(png), "claims": str(js)},
    }
    js.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return doc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m visioncoach.infer",
                                description="Grounded reasoning on one video, with a picture of the claims.")
    p.add_argument("--model", required=True, help="local checkpoint folder (model + processor)")
    p.add_argument("--video", required=True)
    p.add_argument("--question", required=True)
    p.add_argument("--out", default="infer_out", help="folder for the PNG and JSON (default infer_out)")
    p.add_argument("--task", choices=sorted(ANSWER_FORMAT), default="temporal-spatial free-form QA",
                   help="answer format asked for (default: temporal-spatial free-form QA)")
    p.add_argument("--nframes", type=int, default=16)
    p.add_argument("--min-pixels", type=int, default=3136)
    p.add_argument("--max-pixels", type=int, default=100352)
    p.add_argument("--layout", choices=("frames", "video"), default="frames")
    p.add_argument("--max-new-tokens", type=int, default=768)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    p.add_argument("--attn", choices=("auto", "flash_attention_2", "sdpa", "eager"), default="auto")
    p.add_argument("--decoder", choices=("pyav", "dali", "auto"), default="pyav")
    return p


def main(argv: list[str] | None = None) -> int:
    from visioncoach.data.decode import DecodeError
    from visioncoach.rollout.session import load_session

    args = build_parser().parse_args(argv)
    try:
        session = load_session(args.model, device=args.device, dtype=args.dtype, attn=args.attn,
                             nframes=args.nframes, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                             layout=args.layout, max_new_tokens=args.max_new_tokens, decoder=args.decoder)
        clip = session.decode(args.video)
    except (FileNotFoundError, DecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    output, frame_size, _ = session.generate(clip, user_text(args.question, args.task))
    doc = write_grounding(args.out, Path(args.video).stem, output, clip.frames, clip.times, frame_size,
                          {"video": str(args.video), "question": args.question})
    print("Reasoning:")
    print((doc["think"] if doc["think"] is not None else output).strip())
    print("\nAnswer:")
    print((doc["answer"] or "(no <answer> block)").strip())
    print(f"\n{len(doc['claims'])} grounding claim(s); contact sheet {doc['files']['contact_sheet']}, "
          f"claims {doc['files']['claims']}")
    if doc["parse_errors"]:
        print(f"format problems: {'; '.join(doc['parse_errors'][:5])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
