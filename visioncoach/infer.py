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
from pathlib import Path


from visioncoach.grounding import parse
from visioncoach.templates import ANSWER_FORMAT, user_text
from visioncoach.utils.contact_sheet import draw_contact_sheet

__all__ = ["write_grounding", "main"]

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
    p.add_argument("--model", required=True,
                   help="local model folder (model + processor), or a training checkpoint step-N, "
                        "stage folder checkpoints/<stage> or run folder (its latest checkpoint)")
    p.add_argument("--video", required=True)
    p.add_argument("--question", required=True)
    p.add_argument("--out", default="infer_out", help="folder for the PNG and JSON (default infer_out)")
    p.add_argument("--task", choices=sorted(ANSWER_FORMAT), default="temporal-spatial free-form QA",
                   help="answer format asked for (default: temporal-spatial free-form QA)")
    p.add_argument("--nframes", type=int, default=16)
    p.add_argument("--min-pixels", type=int, default=None,
                   help="pixel floor per frame (default: the checkpoint processor's, as trained)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="pixel budget per frame (default: the checkpoint processor's, as trained)")
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
    print(f"model: {session.source}")
    try:
        output, frame_size, _ = session.generate(clip, user_text(args.question, args.task))
    except ValueError as exc:   # frames the processor cannot take (an extreme aspect ratio, ...)
        print(f"error: cannot run the model on {args.video}: {exc}", file=sys.stderr)
        return 2
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
