"""Render every visual-prompt type on real key frames of ../shared/data/videos/cup.mp4 to PNGs.

    python bench/render_vp_examples.py [--video PATH] [--out bench/results/vp_examples]
                                        [--backend auto|torch|triton]

Two of the four uniformly sampled frames serve as key frames, each with a hand-placed box around
the cup (placed by looking at the decoded frames). ``api_prompt`` uses a synthetic Gaussian
heatmap centred on the box: no CLIP weights are available offline here (with a local CLIP
checkpoint, ``visioncoach.vp.ClipRelevance`` produces the real maps). Writes one PNG per type
and key frame, the plain frames, and a contact sheet (rows: key frames, columns: types).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from _common import measure
from visioncoach.data.decode import decode
from visioncoach.vp import add_hint, render_vp, vp_types

VP_TYPES = vp_types()

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VIDEO = ROOT.parent / "shared" / "data" / "videos" / "cup.mp4"
DEFAULT_OUT = ROOT / "bench" / "results" / "vp_examples"

# Key frames (positions among the 4 sampled frames) and the cup's box in each, xyxy pixels of
# the 640x480 frames: upright cup held by a hand (frame 0), tilted cup (frame 2).
KEY_FRAMES = (0, 2)
CUP_BOXES = ((308.0, 120.0, 427.0, 392.0), (336.0, 132.0, 464.0, 357.0))
QUESTION = "What does the person hold up in front of the wall?"


def gaussian_heatmap(boxes: torch.Tensor, H: int, W: int, grid: int = 24) -> torch.Tensor:
    """[F, grid, grid] Gaussian bumps centred on each frame's first box, min-max normalised
    (stands in for the CLIP relevance map; grid 24 = ViT-L/14 at 336 px)."""
    c = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    maps = []
    for x1, y1, x2, y2 in boxes[:, 0].tolist():
        cx, cy = (x1 + x2) / 2 / W, (y1 + y2) / 2 / H
        sx, sy = (x2 - x1) / 2 / W, (y2 - y1) / 2 / H
        g = torch.exp(-0.5 * (((c[None, :] - cx) / sx) ** 2 + ((c[:, None] - cy) / sy) ** 2))
        maps.append((g - g.min()) / (g.max() - g.min()))
    return torch.stack(maps)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--video", type=Path, default=DEFAULT_VIDEO)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    clip = decode(args.video, nframes=4)
    keys = list(KEY_FRAMES)
    frames = clip.frames[keys].to(args.device)                       # [F, H, W, 3] uint8
    F, H, W, _ = frames.shape
    boxes = torch.tensor([[b] for b in CUP_BOXES], dtype=torch.float32)   # [F, 1, 4]
    box_count = torch.ones(F, dtype=torch.int64)
    frame_index = torch.tensor(keys, dtype=torch.int64) + 1          # 1-based position in the clip
    heatmap = gaussian_heatmap(boxes, H, W)
    print(f"{args.video.name}: {len(clip)} frames {tuple(clip.frames.shape[1:3])}, key frames {keys} "
          f"at {[round(float(clip.times[k]), 2) for k in keys]} s, device {args.device}, "
          f"backend {args.backend}")
    print("api_prompt: SYNTHETIC Gaussian heatmap centred on the cup box (no CLIP weights "
          "available offline; use visioncoach.vp.ClipRelevance with a local CLIP checkpoint)")

    args.out.mkdir(parents=True, exist_ok=True)
    rendered = {}
    for t in VP_TYPES:
        # warm-up: Triton compiles (or the interpreter traces) the kernel on the first call
        timing = measure(lambda: render_vp(frames, t, boxes, box_count, frame_index, heatmap,
                                           backend=args.backend),
                         repeats=1, warmup=1, sync=torch.cuda.synchronize if frames.is_cuda else None)
        out, dt = timing.value, timing.min * 1e3
        rendered[t] = out.cpu()
        for i, k in enumerate(keys):
            Image.fromarray(rendered[t][i].numpy()).save(args.out / f"frame{k}_{t}.png")
        changed = (out != frames).any(-1).float().mean().item()
        print(f"  {t:<10} {dt:8.2f} ms for {F} frames  changed pixels {changed:6.1%}  "
              f"hint: {add_hint('', t).strip() or '(none)'}")

    # contact sheet: rows = key frames, columns = VP types, at half size
    sw, sh = W // 2, H // 2
    sheet = Image.new("RGB", (sw * len(VP_TYPES), sh * F), "white")
    for j, t in enumerate(VP_TYPES):
        for i in range(F):
            sheet.paste(Image.fromarray(rendered[t][i].numpy()).resize((sw, sh), Image.BILINEAR),
                        (j * sw, i * sh))
    sheet.save(args.out / "contact_sheet.png")
    print(f"wrote {len(VP_TYPES) * F + 1} PNGs to {args.out} (contact sheet columns: "
          f"{', '.join(VP_TYPES)})")


if __name__ == "__main__":
    main()
