"""See exactly what the model is trained on: ``python -m visioncoach.data.preview [--config FILE]
[--section.key=value ...] [--stage sft|rl] [--n N] [--start I] --out DIR``.

For records ``start`` .. ``start + n - 1`` of the configured dataset, through the training code
path (``ClipDataset`` with the reward targets, the prompt budget, ``sample_inputs``,
``templates.sft_target``; no second implementation, no model), writes:

* ``DIR/preview.jsonl``, one line per record: ``index``, ``id``, ``task``, ``source``, ``media``
  (files opened: the video or image, key-frame images), ``frame_times`` (seconds of every model
  frame, in order), ``key_frame_times``, ``key_frames_from`` (per key frame: ``image`` read from
  its file or ``decoded`` from the video), ``frame_size`` ([W, H] at model resolution),
  ``prompt`` (the chat text with one vision placeholder per image, as the tokenizer sees it),
  ``target`` (SFT: the exact target text; RL: null), ``gt_boxes`` (``{"<time>": {"<object>":
  [[x1, y1, x2, y2], ...]}}`` in model pixels), ``prompt_tokens``, ``frames_dropped`` (by the
  prompt budget) and ``skipped`` (null, or why training would skip it);
* ``DIR/<index>.png``: a contact sheet of the model frames with the ground-truth boxes and
  object names drawn on the frame nearest each annotated time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["preview_record", "main"]


def _tokenizer(model_cfg):
    """The policy's tokenizer, without loading the model (offline)."""
    if not model_cfg.path:
        from visioncoach.models.tokenizer import qwen25_tokenizer

        return qwen25_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_cfg.path, local_files_only=True)


def preview_record(clips, i: int, tokenizer, cfg) -> tuple[dict, object | None]:
    """(the preview line of record ``i``, the contact sheet image or None when skipped)."""
    from visioncoach.data.loader import SampleFailure
    from visioncoach.grounding import Claim
    from visioncoach.processor import fit_prompt_budget, prompt_text, resize_frames, sample_inputs, sample_layout
    from visioncoach.templates import sft_target, user_text
    from visioncoach.utils.contact_sheet import draw_contact_sheet

    data = clips.data
    rec = data.records[i]
    line = {"index": i, "id": rec["id"], "task": rec["task"], "source": rec.get("source", ""),
            "where": data.where(i), "media": None, "frame_times": None, "key_frame_times": None,
            "key_frames_from": None, "frame_size": None, "prompt": None, "target": None,
            "gt_boxes": None, "prompt_tokens": None, "frames_dropped": 0, "skipped": None}
    s = clips[i]
    if isinstance(s, SampleFailure):
        line["skipped"] = s.reason
        return line, None
    line["media"] = {"media": s.meta["media"], "key_frame_images": s.meta["key_frame_images"]}
    line["key_frames_from"] = [k["from"] for k in s.meta["key_frames"]]
    try:
        s = fit_prompt_budget(s, tokenizer, cfg.data)
    except ValueError as exc:
        line["skipped"] = str(exc)
        return line, None
    inputs = sample_inputs(s, s.frames, rec["question"], tokenizer, cfg.data)
    text = user_text(rec["question"], rec["task"])
    line.update(
        frame_times=[round(float(t), 3) for t in s.times],
        key_frame_times=[round(float(t), 3) for t in s.times[s.is_key]],
        frame_size=list(inputs.frame_size),
        prompt=prompt_text(s.frames.shape, s.times, s.duration, text, tokenizer, layout=sample_layout(s, cfg.data),
                           min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels),
        prompt_tokens=int(inputs.tensors["input_ids"].shape[1]),
        frames_dropped=s.meta.get("frames_dropped", 0),
        target=sft_target(rec, inputs.frame_size) if cfg.stage != "rl" else None,
        gt_boxes={str(round(kf.time, 3)): {n: [list(b) for b in bs] for n, bs in zip(kf.names, kf.boxes)}
                  for kf in s.reward_record.frames})
    claims = [Claim(n, list(bs), kf.time) for kf in s.reward_record.frames for n, bs in zip(kf.names, kf.boxes)]
    frames = resize_frames(s.frames, cfg.data.min_pixels, cfg.data.max_pixels)
    sheet = draw_contact_sheet(frames, s.times.tolist(), claims, inputs.frame_size)
    return line, sheet.image


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m visioncoach.data.preview", description=__doc__.split("\n\n")[0],
                                epilog="Other arguments are config overrides (--config FILE, --section.key=value), "
                                       "as for torchrun -m visioncoach.train.")
    p.add_argument("--stage", choices=("sft", "rl"), default=None,
                   help="what to preview: SFT (with its target text) or RL (default: the config's first stage)")
    p.add_argument("--n", type=int, default=8, help="records to preview")
    p.add_argument("--start", type=int, default=0, help="index of the first record")
    p.add_argument("--out", required=True, help="output folder")
    return p


def main(argv: list[str] | None = None) -> int:
    from visioncoach import config as config_lib
    from visioncoach.data.loader import ClipDataset
    from visioncoach.data.stgr import DatasetError, load_configured
    from visioncoach.rewards.records import RewardTargets

    args, overrides = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.n < 1 or args.start < 0:
        print("error: --n must be >= 1 and --start >= 0", file=sys.stderr)
        return 2
    try:
        cfg = config_lib.load_config(overrides)
    except config_lib.ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    cfg.stage = args.stage or ("rl" if cfg.stage == "rl" else "sft")
    try:
        dataset = load_configured(cfg.data, config_lib.synthetic_seed(cfg), sft=cfg.stage == "sft")
        tokenizer = _tokenizer(cfg.model)
    except (DatasetError, FileNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    clips = ClipDataset(dataset, cfg.data.nframes, backend=cfg.data.decoder,
                        targets=RewardTargets((cfg.data.min_pixels, cfg.data.max_pixels)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(args.start, min(len(dataset), args.start + args.n)):
        line, image = preview_record(clips, i, tokenizer, cfg)
        if image is not None:
            image.save(out / f"{i}.png")
        lines.append(line)
    (out / "preview.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines),
                                       encoding="utf-8")
    skipped = sum(x["skipped"] is not None for x in lines)
    print(f"previewed {len(lines)} record(s) of {dataset.path} ({cfg.stage}; {skipped} would be skipped, "
          f"{len(dataset.skipped)} invalid and {len(dataset.missing_videos)} without media in the file) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
