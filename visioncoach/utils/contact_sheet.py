"""A contact sheet of video frames with labelled boxes: what ``python -m visioncoach.infer`` writes
for a model's grounding claims and ``python -m visioncoach.data.preview`` for the ground truth.

Boxes are in pixels of the frames the model saw (``frame_size``, Qwen's smart-resize of the
whole frame: no crop, so x and y scale independently); the sheet draws them on thumbnails,
scaling x by tile width / frame width and y by tile height / frame height.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from visioncoach.grounding import Claim, normalize_name

__all__ = ["Tile", "ContactSheet", "PALETTE", "nearest_frame", "draw_contact_sheet"]

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
