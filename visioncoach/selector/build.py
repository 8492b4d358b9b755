"""Build VP-Selector pseudo-labels: ``python -m visioncoach.selector.build``.

Section 3.3 "Training data collection" (eq. 3) and appendix C.2 (Figure 6). For every STGR
record with key frames:

1. decode its key frames and read its key objects (``key_items``); a record without key
   objects gets them from the key-object extraction prompt (Figure 10) sent to
   ``--key-object-reasoner`` (default: the first ``--reasoner``);
2. render every candidate visual prompt on the key frames (``frames.render_candidates``);
3. ask every proxy reasoner (Figure 9 prompt) about every candidate;
4. score each reply (``scoring.score_reply``: answer correctness, spatial IoU, object
   consistency) and derive the label (``scoring.derive_label``): among the types where every
   reasoner answered correctly, the highest mean of (IoU + object score) / 2.

Output: one JSON line per sample with every per-type, per-reasoner score (labels can be
re-derived with other rules) and ``status``: ``labelled``, ``dropped`` (no type had all
reasoners correct; label null) or ``skipped`` (a bad record: no key frames, an undecodable
video, a record the scorer rejects; ``reason`` says why). A sample whose reasoner could not
be reached (``ReasonerUnavailable`` after the retries) is not written, so the next run
retries it; a run in which that happened to every sample it tried (all reasoners down, a
wrong URL) writes nothing and exits 1 with one ``error:`` line, where bad flags or files
exit 2. ``OUT.meta.json`` holds the settings and the cumulative counts.

Resumable: ids already in ``--out`` are skipped. Each line is written with one ``write``
and flushed and fsynced; a crash can only leave a partial last line, which the next run
cuts off (and ``selector.train`` skips any unparsable line).

Concurrency: ``--workers`` samples are processed at once (each sample's calls run in turn
in its worker); each HTTP reasoner further caps its requests in flight
(``max_concurrency``), and a local model answers one request at a time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from visioncoach.selector.cli import HelpFormatter
from visioncoach.selector.frames import load_key_frames, render_candidates, resolve_vp_types
from visioncoach.selector.reasoners import (Reasoner, ReasonerRequest, ReasonerUnavailable,
                                            distinct_names, reasoner_from_spec)
from visioncoach.selector.scoring import (DEFAULT_ROUGE_THRESHOLD, DEFAULT_TAU, FUZZY_MIN_RATIO,
                                          SIM_EXACT, SIM_FUZZY_MAX, SIM_JACCARD_MAX,
                                          SIM_SUBSTRING, derive_label, parse_key_objects,
                                          score_reply)
from visioncoach.selector.templates import (BOX_SCALE, PROXY_PROMPT_VERSION, key_object_prompt,
                                            proxy_reasoner_prompt)
from visioncoach.vp.render import HeatmapFn

log = logging.getLogger("visioncoach.selector.build")

__all__ = ["BuildOptions", "BuildStats", "run_build", "label_sample", "read_done", "main"]


@dataclass
class BuildOptions:
    vp_types: list[str]
    rouge_threshold: float = DEFAULT_ROUGE_THRESHOLD
    tau: float = DEFAULT_TAU
    max_side: Optional[int] = 768
    workers: int = 4
    keep_replies: bool = False
    darken_factor: float = 0.3
    decoder: str = "pyav"
    progress: bool = True


@dataclass
class BuildStats:
    labelled: int = 0
    dropped: int = 0
    skipped: int = 0            # bad records, written with status "skipped"
    failed: int = 0             # reasoner unreachable: not written, retried next run
    already_done: int = 0       # in the output before this run
    malformed_replies: int = 0
    key_objects_extracted: int = 0
    labels: dict = field(default_factory=dict)
    # Why the last unreachable-reasoner failure happened (not a count: a plain attribute, not
    # a field, so it stays out of the cumulative counts in OUT.meta.json).
    last_failure = ""

    def add(self, other: dict) -> None:
        for k, v in other.items():
            if k == "labels":
                for lab, n in v.items():
                    self.labels[lab] = self.labels.get(lab, 0) + n
            elif k != "already_done":
                setattr(self, k, getattr(self, k) + v)


def read_done(path: Path) -> set[str]:
    """Ids already written to ``path``. A partial last line (crash mid-write) is cut off; an
    unparsable line elsewhere is an error naming its line."""
    if not path.is_file():
        return set()
    data = path.read_bytes()
    done, pos, n = set(), 0, 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        n += 1
        line = data[pos:] if end < 0 else data[pos:end]
        try:
            rec = json.loads(line) if line.strip() else None
            if rec is not None and not (isinstance(rec, dict) and isinstance(rec.get("id"), str)):
                raise ValueError("not an object with a string 'id'")
        except ValueError as exc:
            if end < 0 or data[end + 1:].strip() == b"":
                log.warning("%s:%d: partial last line (interrupted write) removed", path, n)
                with open(path, "r+b") as f:
                    f.truncate(pos)
                return done
            raise ValueError(f"{path}:{n}: not a build output line ({exc}); "
                             "pass another --out or remove the line") from None
        if end < 0:  # complete JSON without its newline: finish the line
            with open(path, "ab") as f:
                f.write(b"\n")
        if rec is not None:
            done.add(rec["id"])
        pos = len(data) if end < 0 else end + 1
    return done


def _key_objects(rec: dict, kf, extractor: Optional[Reasoner]) -> tuple[list[str], str, bool]:
    """(names, source, malformed): annotated names, else Figure 10 extraction."""
    names = kf.object_names()
    if names:
        return names, "annotation", False
    if extractor is None:
        return [], "none", False
    reply = extractor.complete(ReasonerRequest(
        prompt=key_object_prompt(rec["question"], str(rec.get("answer", ""))),
        meta={"id": rec["id"], "purpose": "key_objects"}))
    got = parse_key_objects(reply)
    return (got or []), "extracted", got is None


def label_sample(rec: dict, video: Path, reasoners: Sequence[Reasoner], opts: BuildOptions, *,
                 key_object_reasoner: Optional[Reasoner] = None,
                 heatmap_fn: Optional[HeatmapFn] = None) -> tuple[dict, dict]:
    """(output line, counts) for one record. Raises ``ReasonerUnavailable``; bad records give
    a ``skipped`` line."""
    from visioncoach.data.decode import DecodeError

    base = {"id": rec["id"], "video": str(video.resolve()), "question": rec["question"],
            "task": rec.get("task"), "answer": rec.get("answer")}
    counts: dict = {}
    try:
        kf = load_key_frames(rec, video, max_side=opts.max_side, backend=opts.decoder)
    except (DecodeError, ValueError, KeyError, TypeError) as exc:
        return {**base, "status": "skipped", "label": None, "reason": str(exc)}, {"skipped": 1}
    key_objects, source, bad = _key_objects(rec, kf, key_object_reasoner)
    counts["key_objects_extracted"] = int(source == "extracted" and not bad)
    counts["malformed_replies"] = int(bad)
    rendered = render_candidates(kf, opts.vp_types, rec["question"], heatmap_fn,
                                 darken_factor=opts.darken_factor)
    key_boxes = [[b for bs in objs.values() for b in bs] for objs in kf.objects]
    prompt = proxy_reasoner_prompt(rec["question"], rec.get("task", ""), len(kf.times))
    labels_txt = [f"Key frame {i + 1} at {t:.1f}s:" for i, t in enumerate(kf.times)]
    scores: dict = {}
    replies: dict = {}
    for vp in opts.vp_types:
        images = list(rendered[vp].cpu().numpy())
        scores[vp], replies[vp] = {}, {}
        for r in reasoners:
            reply = r.complete(ReasonerRequest(prompt, images, list(kf.times), labels_txt,
                                               {"id": rec["id"], "vp_type": vp, "purpose": "answer"}))
            try:
                s = score_reply(reply, rec, kf.times, key_boxes, key_objects,
                                rouge_threshold=opts.rouge_threshold, tau=opts.tau)
            except ValueError as exc:   # the record itself is unusable for scoring
                return ({**base, "status": "skipped", "label": None, "reason": f"scoring: {exc}"},
                        {"skipped": 1})
            counts["malformed_replies"] += int(s.error is not None)
            scores[vp][r.name] = s.to_dict()
            replies[vp][r.name] = reply
    names = [r.name for r in reasoners]
    label, label_score = derive_label(scores, opts.vp_types, names)
    summary = {}
    for vp in opts.vp_types:
        per = [scores[vp][n] for n in names]
        summary[vp] = {"all_correct": all(s["correct"] for s in per),
                       "accuracy": round(sum(s["correct"] for s in per) / len(per), 6),
                       "grounding": round(sum((s["iou"] + s["object"]) / 2 for s in per) / len(per), 6)}
    line = {**base, "key_times": list(kf.times), "key_objects": key_objects,
            "key_objects_source": source, "status": "labelled" if label else "dropped",
            "label": label, "label_score": None if label_score is None else round(label_score, 6),
            "summary": summary, "scores": scores}
    if opts.keep_replies:
        line["replies"] = replies
    counts["labelled" if label else "dropped"] = 1
    if label:
        counts["labels"] = {label: 1}
    return line, counts


def _append_line(f, line: dict) -> None:
    f.write(json.dumps(line, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def run_build(dataset, reasoners: Sequence[Reasoner], out: str | Path, opts: BuildOptions, *,
              key_object_reasoner: Optional[Reasoner] = None,
              heatmap_fn: Optional[HeatmapFn] = None, limit: Optional[int] = None,
              settings: Optional[dict] = None) -> BuildStats:
    """Label ``dataset`` (an ``STGRDataset``) into the JSONL ``out`` (module docstring)."""
    from tqdm import tqdm

    if not reasoners:
        raise ValueError("--reasoner: at least one proxy reasoner is needed")
    distinct_names(reasoners)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta_path = out.with_name(out.name + ".meta.json")
    names = [r.name for r in reasoners]
    meta = {"prompt_version": PROXY_PROMPT_VERSION, "vp_types": list(opts.vp_types), "reasoners": names,
            "rouge_threshold": opts.rouge_threshold, "tau": opts.tau, "box_scale": BOX_SCALE,
            "object_similarity": {"exact": SIM_EXACT, "substring": SIM_SUBSTRING,
                                  "fuzzy_min_ratio": FUZZY_MIN_RATIO, "fuzzy_max": SIM_FUZZY_MAX,
                                  "jaccard_max": SIM_JACCARD_MAX},
            **(settings or {})}
    totals = BuildStats()
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        for key, flag in (("vp_types", "--vp-types"), ("reasoners", "--reasoner names")):
            if old.get(key) != meta[key]:
                raise ValueError(f"{out} was built with {key} {old.get(key)}, this run has {meta[key]} "
                                 f"({flag}); use another --out to build with different settings")
        totals.add({k: v for k, v in old.get("counts", {}).items() if k in asdict(totals)})
    done = read_done(out)
    todo = [i for i in range(len(dataset)) if dataset.records[i]["id"] not in done]
    if limit is not None:
        todo = todo[:max(0, limit)]
    stats = BuildStats(already_done=len(done))
    log.info("%d samples to label (%d already in %s), %d VP types x %d reasoners", len(todo),
             len(done), out, len(opts.vp_types), len(reasoners))
    heat_lock = threading.Lock()
    locked_heatmap = None
    if heatmap_fn is not None:
        def locked_heatmap(frames, question):
            with heat_lock:
                return heatmap_fn(frames, question)

    def job(i: int):
        rec = dataset.records[i]
        return label_sample(rec, dataset.video(i), reasoners, opts,
                            key_object_reasoner=key_object_reasoner, heatmap_fn=locked_heatmap)

    bar = tqdm(total=len(todo), desc="pseudo-labels", disable=None if opts.progress else True)
    with open(out, "a", encoding="utf-8") as f, ThreadPoolExecutor(max(1, opts.workers)) as pool:
        pending, it = {}, iter(todo)
        while True:
            while len(pending) < 2 * max(1, opts.workers):
                i = next(it, None)
                if i is None:
                    break
                pending[pool.submit(job, i)] = i
            if not pending:
                break
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                i = pending.pop(fut)
                try:
                    line, counts = fut.result()
                except ReasonerUnavailable as exc:
                    stats.failed += 1
                    stats.last_failure = str(exc)
                    log.warning("sample %d (%s): %s; not written, retried on the next run", i,
                                dataset.records[i]["id"], exc)
                else:
                    if line["status"] == "skipped":
                        log.warning("sample %d (%s) skipped: %s", i, line["id"], line["reason"])
                    _append_line(f, line)
                    stats.add(counts)
                bar.update(1)
                bar.set_postfix(labelled=stats.labelled, dropped=stats.dropped, failed=stats.failed)
    bar.close()
    totals.add({k: v for k, v in asdict(stats).items() if k != "failed"})
    cumulative = {k: v for k, v in asdict(totals).items() if k not in ("failed", "already_done")}
    meta["counts"] = {**cumulative, "failed_last_run": stats.failed}
    tmp = meta_path.with_name(meta_path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_path)
    log.info("this run: %d labelled, %d dropped (no VP type with every reasoner correct), %d skipped "
             "(bad records), %d failed (reasoner unavailable), %d malformed replies; labels %s",
             stats.labelled, stats.dropped, stats.skipped, stats.failed, stats.malformed_replies,
             stats.labels)
    return stats


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m visioncoach.selector.build",
                                description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="STGR dataset (JSON list or JSONL) with key frames and boxes")
    p.add_argument("--video-root", default=None, help="folder video_path is relative to (default: the data file's)")
    p.add_argument("--out", required=True, help="output JSONL (appended to; resumable)")
    p.add_argument("--reasoner", action="append", required=True, metavar="SPEC",
                   help="proxy reasoner, repeatable: http:name=N,base_url=URL,model=M[,api_key_env=VAR,...] | "
                        "local:name=N[,path=DIR,...] | import:module:factory[,key=value...]")
    p.add_argument("--key-object-reasoner", default=None, metavar="SPEC",
                   help="reasoner for key-object extraction (Figure 10) of records without key objects "
                        "(default: the first --reasoner)")
    p.add_argument("--vp-types", nargs="+", default=None,
                   help="candidate visual prompts (default: all; api_prompt only with --clip-path)")
    p.add_argument("--clip-path", default=None, help="local CLIP checkpoint folder for api_prompt heatmaps")
    p.add_argument("--rouge-threshold", type=float, default=DEFAULT_ROUGE_THRESHOLD,
                   help="open-ended answers are correct at ROUGE (or tIoU / IoU) >= this")
    p.add_argument("--tau", type=float, default=DEFAULT_TAU,
                   help="seconds between a claim's time and a key frame for its boxes to count")
    p.add_argument("--max-side", type=int, default=768, help="key frames are decoded at most this long side")
    p.add_argument("--darken-factor", type=float, default=0.3,
                   help="darken: pixels outside the key objects are multiplied by this")
    p.add_argument("--workers", type=int, default=4, help="samples processed concurrently")
    p.add_argument("--timeout", type=float, default=60.0, help="HTTP request timeout, seconds")
    p.add_argument("--retries", type=int, default=3, help="HTTP retries after the first attempt")
    p.add_argument("--backoff", type=float, default=1.0, help="first retry delay, doubled each retry")
    p.add_argument("--max-concurrency", type=int, default=4, help="HTTP requests in flight per reasoner")
    p.add_argument("--keep-replies", action="store_true", help="store the raw replies in the output")
    p.add_argument("--limit", type=int, default=None, help="label at most this many new samples (default: all)")
    p.add_argument("--device", default="cpu", help="device for CLIP heatmaps")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    from visioncoach.data.stgr import DatasetError, load_stgr

    def error(msg: str, code: int = 2) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return code

    if args.workers < 1 or args.max_side < 1:
        return error(f"--workers and --max-side must be >= 1, got {args.workers} and {args.max_side}")
    if not 0 <= args.rouge_threshold <= 1 or args.tau < 0:
        return error("--rouge-threshold must be in [0, 1] and --tau >= 0")
    try:
        vp_types = resolve_vp_types(args.vp_types, bool(args.clip_path))
        defaults = {"timeout": args.timeout, "retries": args.retries, "backoff": args.backoff,
                    "max_concurrency": args.max_concurrency}
        reasoners = [reasoner_from_spec(s, defaults) for s in args.reasoner]
        extractor = (reasoner_from_spec(args.key_object_reasoner, defaults, flag="--key-object-reasoner")
                     if args.key_object_reasoner else reasoners[0])
        dataset = load_stgr(args.data, args.video_root)
        heatmap_fn = None
        if args.clip_path:
            from visioncoach.vp.heatmap import clip_heatmap_fn

            heatmap_fn = clip_heatmap_fn(args.clip_path, args.device)
        opts = BuildOptions(vp_types=vp_types, rouge_threshold=args.rouge_threshold, tau=args.tau,
                            max_side=args.max_side, workers=args.workers,
                            keep_replies=args.keep_replies, darken_factor=args.darken_factor,
                            progress=not args.no_progress)
        stats = run_build(dataset, reasoners, args.out, opts, key_object_reasoner=extractor,
                          heatmap_fn=heatmap_fn, limit=args.limit,
                          settings={"data": str(Path(args.data).resolve()), "max_side": args.max_side,
                                    "darken_factor": args.darken_factor})
    except (ValueError, FileNotFoundError, DatasetError) as exc:
        return error(str(exc))
    if stats.failed and not (stats.labelled or stats.dropped or stats.skipped):
        # Nothing was written: a run that "succeeds" here would hide dead servers or wrong URLs.
        return error(f"nothing could be labelled: a reasoner was unreachable for all {stats.failed} "
                     f"sample(s) tried (last: {stats.last_failure}); nothing was written to {args.out}; "
                     "check the --reasoner specs and servers, then rerun", code=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
