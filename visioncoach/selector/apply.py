"""Plug-and-play visual prompting: ``python -m visioncoach.selector.apply``.

Paper Table 6 / appendix C.4 "Inference": the trained VP-Selector picks the visual prompt for
a video and question, the prompt is rendered on the key frames, and the prompted frames (plus
the question with the matching hint) can be given to any reasoner.

    python -m visioncoach.selector.apply --selector DIR --video V --question Q \\
        [--objects NAME ...] [--boxes [K:]x1,y1,x2,y2 ...] [--key-times T ...] \\
        [--base-model DIR] --out OUT

Key frames: at ``--key-times`` (seconds, within the clip: a later time is an error), else
``--num-frames`` uniform frames. Boxes are normalised [0, 1] xyxy; ``K:`` pins a box to key
frame K (0-based), otherwise it applies to every key frame. ``darken`` and ``circle`` are
drawn only on key frames with boxes (a warning names the others); a heatmap type
(``api_prompt``) needs ``--clip-path`` (an error otherwise). ``--base-model`` replaces the
base model ``selector.json`` names (stored as an absolute path when trained) when it moved.

Writes ``OUT/key_frame_NN.png`` (the prompted key frames) and ``OUT/selection.json``, which
records what was drawn, never more: ``selected`` (the selector's choice; ``raw`` when its
``selector_text`` named no label, ``selector_mapped`` false), ``vp_type`` (what was drawn:
the selection when it was drawn on at least one key frame, else ``raw``), ``vp_per_frame``
(per key frame), ``vp_note`` (why they differ), the key-frame times and files, and
``prompted_question``: the question with ``vp_type``'s hint appended
(``visioncoach.vp.add_hint``), so no hint describes marks that are not there.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from visioncoach.selector.cli import HelpFormatter

log = logging.getLogger("visioncoach.selector.apply")

__all__ = ["parse_box_arg", "main"]


def parse_box_arg(text: str, n_frames: Optional[int] = None) -> tuple[Optional[int], tuple[float, float, float, float]]:
    """``[K:]x1,y1,x2,y2`` -> (key frame index or None for all, normalised box); K is checked
    against ``n_frames`` when given."""
    where, _, coords = text.rpartition(":")
    try:
        box = tuple(float(v) for v in coords.split(","))
        k = int(where) if where else None
    except ValueError:
        raise ValueError(f"--boxes {text!r}: expected [K:]x1,y1,x2,y2 with numbers") from None
    if len(box) != 4:
        raise ValueError(f"--boxes {text!r}: expected 4 coordinates, got {len(box)}")
    if not all(0.0 <= v <= 1.0 for v in box):
        raise ValueError(f"--boxes {text!r}: coordinates must be normalised to [0, 1]")
    if k is not None and (k < 0 or (n_frames is not None and k >= n_frames)):
        raise ValueError(f"--boxes {text!r}: key frame {k} out of range (there are {n_frames})")
    return k, box


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m visioncoach.selector.apply",
                                description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--selector", required=True, help="trained selector folder (visioncoach.selector.train --out)")
    p.add_argument("--base-model", default=None, metavar="DIR",
                   help="the selector's base model when it is no longer where selector.json's base_model "
                        "says (a local model folder, or 'tiny'); default: selector.json's")
    p.add_argument("--video", required=True)
    p.add_argument("--question", required=True)
    p.add_argument("--objects", nargs="+", default=[], help="key object names (given to the selector)")
    p.add_argument("--boxes", nargs="+", default=[], metavar="[K:]x1,y1,x2,y2",
                   help="key-object boxes, normalised xyxy; K: pins one to key frame K (0-based)")
    p.add_argument("--key-times", nargs="+", type=float, default=None, help="key-frame times, seconds")
    p.add_argument("--num-frames", type=int, default=4, help="uniform key frames when --key-times is absent")
    p.add_argument("--max-side", type=int, default=None, help="decode frames at most this long side")
    p.add_argument("--clip-path", default=None, help="local CLIP checkpoint (needed if api_prompt is selected)")
    p.add_argument("--device", default="auto", help="auto = cuda if available, else cpu")
    p.add_argument("--out", required=True, help="output folder")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    from PIL import Image

    from visioncoach.data.decode import DecodeError, decode
    from visioncoach.selector.frames import KeyFrames, key_frames_at, render_candidates
    from visioncoach.selector.model import Selector
    from visioncoach.vp.heatmap import clip_heatmap_fn
    from visioncoach.vp.spec import RAW, add_hint, clip_required, vp_spec

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        for b in args.boxes:
            parse_box_arg(b)                       # flag errors before any decoding
        if args.key_times:
            frames, times = key_frames_at(args.video, args.key_times, max_side=args.max_side,
                                          flag="--key-times")
        else:
            if args.num_frames < 1:
                raise ValueError(f"--num-frames must be >= 1, got {args.num_frames}")
            clip = decode(args.video, nframes=args.num_frames, backend="pyav", max_side=args.max_side)
            frames, times = clip.frames.cpu(), clip.times.tolist()
        boxes = [parse_box_arg(b, len(times)) for b in args.boxes]
        selector = Selector(args.selector, device=device, base_model=args.base_model, base_flag="--base-model")
    except (DecodeError, ValueError, FileNotFoundError) as exc:
        # FileNotFoundError includes a selector whose base model folder is bad (ModelDirError).
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = selector.generate_texts([{"question": args.question, "frames": frames,
                                     "key_objects": args.objects}])[0]
    vp = selector.mapper(text)
    mapped = selector.unmapped == 0
    if not mapped:
        log.warning("selector output %r names no visual prompt: using raw", text)
    log.info("selected visual prompt: %s", vp)
    spec = vp_spec(vp)
    if spec.needs_clip and not args.clip_path:
        print(f"error: the selector chose {vp}: " + clip_required(vp, "--clip-path DIR"), file=sys.stderr)
        return 2
    objects = [{"key object": [b for k, b in boxes if k is None or k == i]} for i in range(len(times))]
    # What is drawn on each key frame: a box type only where that frame has boxes (the kernel
    # leaves the others unchanged); the other types on every key frame. selection.json and
    # the hint record this, not the selection, so neither describes marks that are not there.
    drawn = [bool(o["key object"]) if spec.needs == "boxes" else vp != RAW for o in objects]
    per_frame = [vp if d else RAW for d in drawn]
    vp_type, note = (vp if any(drawn) else RAW), ""
    if vp != RAW and not all(drawn):
        missing = [i for i, d in enumerate(drawn) if not d]
        note = (f"{vp} needs key-object boxes (--boxes): nothing drawn, recorded as raw" if not any(drawn)
                else f"{vp} drawn on key frames {[i for i, d in enumerate(drawn) if d]} only; "
                     f"key frames {missing} have no boxes (--boxes K:...) and stay raw")
        log.warning("%s", note)
    kf = KeyFrames(frames, list(times), [o if o["key object"] else {} for o in objects])
    heatmap_fn = clip_heatmap_fn(args.clip_path, device) if spec.needs_clip else None
    prompted = render_candidates(kf, [vp_type], args.question, heatmap_fn)[vp_type].cpu().numpy()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, img in enumerate(prompted):
        name = f"key_frame_{i:02d}.png"
        Image.fromarray(img).save(out / name)
        files.append(name)
    selection = {"vp_type": vp_type, "vp_per_frame": per_frame, "selected": vp, "selector_mapped": mapped,
                 "selector_text": text, "question": args.question,
                 "prompted_question": add_hint(args.question, vp_type), "key_times": [round(t, 3) for t in times],
                 "frames": files, "objects": args.objects, "boxes": [[k, list(b)] for k, b in boxes]}
    if note:
        selection["vp_note"] = note
    (out / "selection.json").write_text(json.dumps(selection, indent=1))
    print(json.dumps({"vp_type": vp_type, "selected": vp, "out": str(out), "frames": len(files)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
