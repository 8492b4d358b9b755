"""Benchmark predictions on raw videos: ``python -m visioncoach.predict --bench {charades,vstar,mcq}
--model PATH --videos DIR --ann FILE --out PRED.jsonl``.

The paper's single inference pathway (section 4): uniform frames of the raw video (no visual
prompt), the training prompt template (``visioncoach.templates``), greedy decoding through our
rollout engine (``generate_group`` with G = 1). ``--vp TYPE`` or ``--selector DIR`` instead
draws a visual prompt on each item and appends its hint (plug-and-play, paper Table 6;
``visioncoach.selector.plug``). Writes one JSONL line per benchmark item, in
the format ``python -m visioncoach.eval`` reads (see ``visioncoach.eval.charades``, ``.vstar``,
``.mcq``), each with the raw model text.

Throughput. Items are grouped by video: each video is decoded once, by a pool of
``--workers`` threads running ahead of the model (PyAV releases the GIL while decoding), and
its frames go through the vision encoder once; every prompt on that video (Charades has
about 2.8 queries a video, V-STAR asks 5 questions an item) reuses the visual features and
pays only its own prefill and decode (``generate_group(vision=...)``).

Resuming. Ids that already have a successful line in ``--out`` are skipped; failed ones are
tried again and their new line is appended (the evaluator takes the last line of an id). A
half-written last line from a killed run is cut off first.

Failures. A video that cannot be decoded, or a prompt the model cannot take, is recorded as
``{..., "error": "<type>: <message>"}`` for each item concerned and the run goes on; the
evaluator counts those items as wrong.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


from visioncoach.data.decode import DecodedClip, DecodeError
from visioncoach.eval import charades as charades_eval
from visioncoach.eval import mcq as mcq_eval
from visioncoach.eval import vstar as vstar_eval
from visioncoach.eval.common import EvalInputError, answer_text
from visioncoach.grounding import Claim, answer_letter, first_segment, parse
from visioncoach.templates import user_text
from visioncoach.vp.spec import add_hint
from visioncoach.rollout.prompt import VisionFeatures
from visioncoach.rollout.session import Session, load_session

__all__ = ["VideoFinder", "Item", "charades_items", "vstar_items", "mcq_items",
           "predict_charades", "predict_vstar", "predict_mcq", "claim_boxes_by_second", "run", "main"]

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")
BENCHES = ("charades", "vstar", "mcq")


# ---------------------------------------------------------------------------------------
# Benchmark items
# ---------------------------------------------------------------------------------------

class VideoFinder:
    """Video files under a folder by name: ``DIR/name``, ``DIR/name.<ext>`` for the usual
    video suffixes, else the first file anywhere below ``DIR`` with that stem (an index built
    once, on the first miss). A name found nowhere maps to ``DIR/name``, which then fails to
    decode with "file not found" and is recorded as that item's failure."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._by_stem: dict[str, Path] | None = None

    def __call__(self, name: str) -> Path:
        direct = self.root / name
        if direct.is_file():
            return direct
        for suffix in VIDEO_SUFFIXES:
            if (p := self.root / f"{name}{suffix}").is_file():
                return p
        if self._by_stem is None:
            self._by_stem = {}
            for p in sorted(self.root.rglob("*")):
                if p.suffix.lower() in VIDEO_SUFFIXES:
                    self._by_stem.setdefault(p.stem, p)
                    self._by_stem.setdefault(p.name, p)
        return self._by_stem.get(Path(name).name, self._by_stem.get(name, direct))


@dataclass
class Item:
    id: int | str
    video: Path
    record: dict       # fields every output line of this item starts with (id, vid, ...)
    data: object       # what the benchmark's predict function reads
    vp: str | None = None   # the visual prompt drawn on its frames (--vp / --selector): hint appended


def _hinted(item: Item, question: str) -> str:
    """``question`` with the hint of the item's visual prompt (``vp.add_hint``), if any."""
    return add_hint(question, item.vp) if item.vp else question


def charades_items(ann: str | Path, find: VideoFinder) -> list[Item]:
    return [Item(i, find(q.vid), {"id": i, "vid": q.vid, "query": q.query}, q)
            for i, q in enumerate(charades_eval.read_annotations(ann))]


def vstar_items(ann: str | Path, find: VideoFinder) -> list[Item]:
    return [Item(i, find(it.vid), {"id": i, "vid": it.vid}, it)
            for i, it in enumerate(vstar_eval.read_ground_truth(ann))]


def mcq_items(ann: str | Path, find: VideoFinder) -> list[Item]:
    return [Item(it.id, find(it.video), {"id": it.id}, it) for it in mcq_eval.read_items(ann, need_inputs=True)]


# ---------------------------------------------------------------------------------------
# Per-benchmark prompting and answer extraction
# ---------------------------------------------------------------------------------------

Vision = VisionFeatures | None


def predict_charades(session: Session, clip: DecodedClip, item: Item, vision: Vision) -> tuple[dict, Vision]:
    """Temporal grounding of one query: the segment is the first span in the answer."""
    q: charades_eval.CharadesQuery = item.data
    text = user_text(_hinted(item, f'Find the moment in the video when this happens: "{q.query}".'),
                     "temporal QA")
    out, _, vision = session.generate(clip, text, vision)
    seg = first_segment(answer_text(out))
    return {**item.record, "pred": list(seg) if seg else None, "output": out}, vision


def predict_mcq(session: Session, clip: DecodedClip, item: Item, vision: Vision) -> tuple[dict, Vision]:
    it: mcq_eval.MCQItem = item.data
    text = user_text(_hinted(item, it.question.strip() + "\n" + "\n".join(it.options)), "General video QA MCQ")
    out, _, vision = session.generate(clip, text, vision)
    return {**item.record, "pred": answer_letter(answer_text(out)), "output": out}, vision


def _rescale(box, src: tuple[float, float], dst: tuple[float, float], ndigits: int = 1) -> list[float]:
    """[x1, y1, x2, y2] from pixels of a frame of size src = (W, H) to one of size dst."""
    sx, sy = dst[0] / src[0], dst[1] / src[1]
    return [round(box[0] * sx, ndigits), round(box[1] * sy, ndigits),
            round(box[2] * sx, ndigits), round(box[3] * sy, ndigits)]


def claim_boxes_by_second(claims: list[Claim], frame_size: tuple[int, int],
                          video_size: tuple[float, float]) -> dict[str, list[list[float]]]:
    """The claims' boxes keyed by whole second ``str(round(t))``, rescaled from the model's
    frame pixels (``frame_size``) to original-video pixels (``video_size``).

    V-STAR's "where" questions ask for a box per whole second and its annotations sit on whole
    seconds; a claim at t counts for the second nearest t. Several boxes on one second are
    kept (the evaluator takes the best).
    """
    out: dict[str, list[list[float]]] = {}
    for c in claims:
        key = str(int(round(c.t)))
        out.setdefault(key, []).extend(_rescale(b, frame_size, video_size) for b in c.boxes)
    return out


def _whole_seconds(segment: tuple[float, float]) -> list[int]:
    """ceil(s)..floor(e), V-STAR's whole seconds of a segment (its midpoint if none)."""
    secs = list(range(math.ceil(segment[0]), math.floor(segment[1]) + 1))
    return secs or [int(round(sum(segment) / 2))]


def predict_vstar(session: Session, clip: DecodedClip, item: Item, vision: Vision) -> tuple[dict, Vision]:
    """The five V-STAR answers of one item: what; chain 1 when -> where; chain 2 where -> when.

    As in the benchmark's released inference, chain 1's "where" is told the annotated whole
    seconds, chain 2's "where" how many boxes to give, and chain 2's "when" the annotated
    boxes without their times (converted to the pixels of the frames the model sees). The
    release's ``temporal_question`` / ``spatial_question`` / ``spatial_question_2`` are used
    where present, else ``question``.
    """
    it: vstar_eval.VStarItem = item.data
    raw = it.extra
    video_size = (it.width, it.height)
    when_q = raw.get("temporal_question") or it.question
    secs = _whole_seconds(it.segment)
    n_boxes = max(1, len(it.boxes))
    outputs: dict[str, str] = {}
    frame_size: tuple[int, int] = (0, 0)   # set by the first answer

    def ask(name: str, question: str, task: str) -> str:
        nonlocal vision, frame_size
        outputs[name], frame_size, vision = session.generate(clip, user_text(_hinted(item, question), task), vision)
        return outputs[name]

    what = ask("what", it.question, "General video QA Free-form")
    seg1 = first_segment(answer_text(ask("when1", when_q, "temporal QA")))
    where1 = ask("where1", f"{raw.get('spatial_question') or it.question} Ground the object with a box "
                           f"at each whole second from {secs[0]} to {secs[-1]} s.",
                 "temporal-spatial free-form QA")
    where2 = ask("where2", f"{raw.get('spatial_question_2') or it.question} Ground the object with a box "
                           f"at the {n_boxes} whole second(s) most related to the question.",
                 "temporal-spatial free-form QA")
    hint = [_rescale(b, video_size, frame_size, 0) for _, b in it.boxes]
    seg2 = first_segment(answer_text(ask(
        "when2", f"{when_q} The key object appears in these boxes (pixels of the frames you see), "
                 f"at unknown times: {json.dumps([[int(v) for v in b] for b in hint])}.", "temporal QA")))
    record = {**item.record, "answer": answer_text(what),
              "chain1": {"segment": list(seg1) if seg1 else None,
                         "boxes": claim_boxes_by_second(parse(where1).claims, frame_size, video_size)},
              "chain2": {"segment": list(seg2) if seg2 else None,
                         "boxes": claim_boxes_by_second(parse(where2).claims, frame_size, video_size)},
              "frame_size": list(frame_size), "outputs": outputs}
    return record, vision


BENCH = {
    "charades": (charades_items, predict_charades),
    "vstar": (vstar_items, predict_vstar),
    "mcq": (mcq_items, predict_mcq),
}


# ---------------------------------------------------------------------------------------
# The resumable loop
# ---------------------------------------------------------------------------------------

def completed_ids(out: Path) -> set[str]:
    """Ids with a successful line in ``out``; cuts a half-written last line off first."""
    if not out.is_file():
        return set()
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        print(f"{out}: dropping a half-written last line ({len(data) - keep} bytes)", file=sys.stderr)
        with out.open("r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    done = set()
    for line in data.splitlines():
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(rec, dict) and "id" in rec and not rec.get("error"):
            done.add(str(rec["id"]))
    return done


def _failure(item: Item, exc: BaseException) -> dict:
    return {**item.record, "error": f"{type(exc).__name__}: {exc}"}


PredictFn = Callable[[Session, DecodedClip, Item, Vision], tuple[dict, Vision]]


def run(session: Session, items: list[Item], predict: PredictFn, out: str | Path, *,
        workers: int = 2, limit: int | None = None, desc: str = "predict") -> dict:
    """Predict every item not yet done, appending lines to ``out``; returns counts."""
    from tqdm import tqdm

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = completed_ids(out)
    todo = [it for it in items if str(it.id) not in done]
    if limit is not None:
        todo = todo[:limit]
    groups: dict[Path, list[Item]] = {}
    for it in todo:
        groups.setdefault(it.video, []).append(it)
    counts = {"total": len(items), "skipped": sum(str(it.id) in done for it in items),
              "written": 0, "failed": 0}
    # Decoding runs ahead in threads for PyAV; DALI decodes in the calling thread (its pipelines
    # belong to the thread and CUDA context that built them).
    threads = workers if session.decoder == "pyav" else 0
    pending: deque[tuple[Path, list[Item], Future | None]] = deque()
    queue = iter(groups.items())

    with ThreadPoolExecutor(max(threads, 1)) as pool, out.open("a", encoding="utf-8") as f, \
            tqdm(total=len(todo), desc=desc, unit="item", file=sys.stderr, dynamic_ncols=True) as bar:
        def submit_next() -> None:
            nxt = next(queue, None)
            if nxt is not None:
                pending.append((*nxt, pool.submit(session.decode, nxt[0]) if threads else None))

        def emit(it: Item, rec: dict) -> None:
            f.write(json.dumps(rec, allow_nan=False) + "\n")
            f.flush()
            counts["written"] += 1
            if "error" in rec:
                counts["failed"] += 1
                bar.write(f"id {it.id} ({it.video}): {rec['error']}", file=sys.stderr)
            bar.update(1)

        for _ in range(max(threads, 1)):
            submit_next()
        while pending:
            video, group, future = pending.popleft()
            submit_next()
            try:
                clip = future.result() if future is not None else session.decode(video)
            except (DecodeError, OSError, RuntimeError, ValueError) as exc:
                for it in group:
                    emit(it, _failure(it, exc))
                continue
            clip = dataclasses.replace(clip, frames=clip.frames.to(session.device))
            vision = None
            for it in group:
                try:
                    rec, vision = predict(session, clip, it, vision)
                except (RuntimeError, ValueError) as exc:   # OOM, prompt too long, ...
                    rec = _failure(it, exc)
                emit(it, rec)
    return counts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m visioncoach.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", required=True, choices=BENCHES)
    p.add_argument("--model", required=True,
                   help="local model folder (model + processor), or a training checkpoint step-N, "
                        "stage folder checkpoints/<stage> or run folder (its latest checkpoint)")
    p.add_argument("--videos", required=True, help="folder holding the benchmark's videos")
    p.add_argument("--ann", required=True, help="annotations: Charades txt, V-STAR JSON or MCQ JSONL")
    p.add_argument("--out", required=True, help="predictions JSONL (appended to; resumable)")
    p.add_argument("--nframes", type=int, default=16, help="uniform frames per video (default 16)")
    p.add_argument("--min-pixels", type=int, default=None,
                   help="pixel floor per frame (default: the checkpoint processor's, as trained)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="pixel budget per frame (default: the checkpoint processor's, as trained)")
    p.add_argument("--layout", choices=("frames", "video"), default="frames")
    p.add_argument("--max-new-tokens", type=int, default=768)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    p.add_argument("--attn", choices=("auto", "flash_attention_2", "sdpa", "eager"), default="auto")
    p.add_argument("--decoder", choices=("pyav", "dali", "auto"), default="pyav")
    p.add_argument("--workers", type=int, default=2, help="decoding threads running ahead (PyAV)")
    p.add_argument("--limit", type=int, help="predict at most this many items of those not done")
    vp = p.add_mutually_exclusive_group()   # plug-and-play visual prompting (Table 6; selector/plug.py)
    vp.add_argument("--vp", metavar="TYPE", help="draw this visual prompt on each item (its hint appended)")
    vp.add_argument("--selector", metavar="DIR", help="a trained VP-Selector picks each item's visual prompt")
    p.add_argument("--numpro-frames", choices=("all", "key"), default="all",
                   help="frame numbers on every frame (paper C.1) or on key frames only")
    p.add_argument("--clip-path", help="local CLIP checkpoint, for api_prompt")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("nframes", "max_new_tokens", "min_pixels", "max_pixels"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            print(f"error: --{flag.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    make_items, predict = BENCH[args.bench]
    try:
        if not os.path.isdir(args.videos):
            raise EvalInputError(f"--videos {args.videos}: not a folder")
        items = make_items(args.ann, VideoFinder(args.videos))
        session = load_session(args.model, device=args.device, dtype=args.dtype, attn=args.attn,
                             nframes=args.nframes, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                             layout=args.layout, max_new_tokens=args.max_new_tokens, decoder=args.decoder)
        plug = _plug_and_play(args, session.device) if args.vp or args.selector else None
    except (EvalInputError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"model: {session.source}")
    counts = run(session, items, plug.wrap(predict) if plug else predict, args.out, workers=args.workers,
                 limit=args.limit, desc=args.bench)
    print(f"{args.out}: {counts['written']} lines written ({counts['failed']} failed), "
          f"{counts['skipped']} already done, {counts['total']} items in {args.ann}")
    if plug is not None:
        print(plug.summary())
    return 0


def _plug_and_play(args, device):
    """The ``--vp`` / ``--selector`` visual prompting of every item (``selector.plug``); a bad
    flag is an ``EvalInputError`` naming it."""
    from visioncoach.selector.plug import PlugAndPlay

    try:
        return PlugAndPlay.build(vp=args.vp, selector=args.selector, clip_path=args.clip_path,
                                 numpro_frames=args.numpro_frames, device=device)
    except ValueError as exc:
        raise EvalInputError(str(exc)) from None


if __name__ == "__main__":
    sys.exit(main())
