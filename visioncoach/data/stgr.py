"""STGR-format datasets (Open-o3-Video's STGR-RL / STGR-SFT): read, validate up front, find files.

A dataset is a JSON list of records or JSONL (one record a line). Records carry the reward
fields (``visioncoach.rewards.records``: task, answer, key_frames, key_items, segments,
image_size) plus ``id``, ``source``, ``question``, and either ``video_path`` (a video record) or
``image_path`` + ``image_size`` (an image record: visual QA on one image, about 5k per released
file), and for SFT ``reasoning_process``. ``frame_size`` is not in the files: it is the frame
size after resizing, recorded when the sample's frames are prepared.

As released, records hold quirks that are normalised on reading: an integer ``id`` (made a
string), ``null`` values (dropped: top-level keys, objects and boxes inside ``key_items``), an
empty ``image_size`` on video records (dropped). A record that is still invalid is skipped and
counted with its file:line (``skipped``), or, with ``strict``, every problem is reported
together and loading fails. A missing media file (a partial download, one bad file among
37k) is counted and the record dropped, unless ``strict``.

Files. The released layout has one folder per source (STR_plm_*, other STR_*, videor1, TVG,
timerft, videoespresso, gqa images), so each record's files are found through ``Sources``:
the first ``data.sources`` entry whose ``match`` glob matches the record's ``source`` gives its
media folder (``video_path`` / ``image_path`` are relative to it) and its key-frame folder
(``key_frames[].path``); records matching no entry use ``data.video_root`` /
``data.key_frame_root``. With no entries at all, everything is relative to the video root or,
when that is empty, to the dataset file's folder. A source that matches no entry when there is
no fallback is an error naming it, before anything trains.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from visioncoach.rewards.records import validate as validate_reward_fields

log = logging.getLogger(__name__)

MAX_REPORTED = 50
MAX_KEY_FRAME_TIME = 7 * 24 * 3600.0


class DatasetError(ValueError):
    """Problems in a dataset file; ``problems`` lists every one as 'file:line: record i: ...'."""

    def __init__(self, path: Path, problems: list[str]):
        self.problems = problems
        shown = problems[:MAX_REPORTED]
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        super().__init__(f"{len(problems)} problem(s) in dataset {path}:\n  " + "\n  ".join(shown) + more)


@dataclass(frozen=True)
class Source:
    match: str          # fnmatch glob on the record's ``source``
    media: Path
    key_frames: Path


class Sources:
    """Where a record's files are (module docstring). ``entries``: ``data.sources``
    (``config.SourceConfig``: match, media, key_frames); ``root`` / ``key_frame_root``: the
    fallbacks ("" = none)."""

    def __init__(self, entries: Sequence = (), root: str | Path = "", key_frame_root: str | Path = ""):
        self.entries = [Source(e.match, Path(e.media), Path(e.key_frames or key_frame_root or e.media))
                        for e in entries]
        self.fallback = (Source("*", Path(root), Path(key_frame_root or root)) if str(root) else None)

    def for_source(self, source: str) -> Source | None:
        for e in self.entries:
            if fnmatch.fnmatchcase(source, e.match):
                return e
        return self.fallback


@dataclass
class STGRDataset:
    path: Path
    records: list[dict]
    homes: list[Source]                 # where each record's files are
    lines: list[int]                    # the record's line in the file
    missing_videos: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)   # invalid records, 'file:line: reason'

    def __len__(self) -> int:
        return len(self.records)

    def is_image(self, i: int) -> bool:
        return "video_path" not in self.records[i]

    def media(self, i: int) -> Path:
        """The record's video or image file."""
        rec = self.records[i]
        return self.homes[i].media / rec.get("video_path", rec.get("image_path", ""))

    def video(self, i: int) -> Path:
        return self.media(i)

    def key_frame_image(self, i: int, key_frame: dict) -> Path | None:
        """The image file of one of the record's key frames, when the record names one and it
        exists (else the frame is decoded from the video at its time)."""
        name = key_frame.get("path")
        if not isinstance(name, str) or not name:
            return None
        p = self.homes[i].key_frames / name
        return p if p.is_file() else None

    def where(self, i: int) -> str:
        return f"{self.path}:{self.lines[i]}"


def _read(path: Path) -> list[tuple[int, object]]:
    """(line number, parsed record) for every record of a JSON list or a JSONL file."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        # Walk the array with raw_decode to know where each record starts (for line numbers).
        dec = json.JSONDecoder()
        pos = text.index("[") + 1
        out = []
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text):
                raise DatasetError(path, [f"{path}:{text.count(chr(10), 0, pos) + 1}: unterminated JSON list"])
            if text[pos] == "]":
                return out
            line = text.count("\n", 0, pos) + 1
            try:
                obj, pos = dec.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise DatasetError(path, [f"{path}:{exc.lineno}: record {len(out)}: invalid JSON ({exc.msg})"]) from None
            out.append((line, obj))
    out, problems = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{n}: invalid JSON ({exc.msg})")
    if problems:
        raise DatasetError(path, problems)
    return out


def normalize_record(rec: object) -> object:
    """The released files' quirks undone (module docstring); anything else is left for the check."""
    if not isinstance(rec, dict):
        return rec
    rec = {k: v for k, v in rec.items() if v is not None}
    if isinstance(rec.get("id"), int) and not isinstance(rec["id"], bool):
        rec["id"] = str(rec["id"])
    items = rec.get("key_items")
    if isinstance(items, dict):
        clean = {}
        for idx, objects in items.items():
            if not isinstance(objects, dict):
                continue
            objs = {name: [b for b in boxes if b is not None] for name, boxes in objects.items()
                    if boxes is not None}
            clean[idx] = {n: b for n, b in objs.items() if not isinstance(b, list) or b}
        rec["key_items"] = clean
    if "video_path" in rec and rec.get("image_size") in ([], {}, ""):
        del rec["image_size"]
    return rec


def _check(rec: object, index: int, sft: bool) -> str | None:
    if not isinstance(rec, dict):
        return f"record {index}: must be an object, got {type(rec).__name__}"
    media = "video_path" if "video_path" in rec or "image_path" not in rec else "image_path"
    for name in ("id", "question", media) + (("reasoning_process",) if sft else ()):
        if name not in rec:
            return f"record {index}: field {name!r} is required" + (
                " (or 'image_path' for an image record)" if name == "video_path" else "")
        if not isinstance(rec[name], str) or not rec[name]:
            return f"record {index}: field {name!r} must be a non-empty string, got {rec[name]!r}"
    if media == "image_path" and "image_size" not in rec:
        return f"record {index}: an image record needs 'image_size' [W, H] (its boxes are in its pixels)"
    if "source" in rec and not isinstance(rec["source"], str):
        return f"record {index}: field 'source' must be a string, got {rec['source']!r}"
    for k, kf in enumerate(rec.get("key_frames") or []):
        t = kf.get("time") if isinstance(kf, dict) else None
        # A time a decoder can seek to: a video longer than a week is not a training clip, and
        # beyond that the stream's int64 timestamps overflow.
        if isinstance(t, (int, float)) and not isinstance(t, bool) and not 0 <= t <= MAX_KEY_FRAME_TIME:
            return f"record {index}: field 'key_frames[{k}].time' must be seconds in [0, {MAX_KEY_FRAME_TIME:g}], got {t!r}"
    try:
        # frame_size comes later (after resizing); any valid value lets the rest be checked.
        validate_reward_fields({**rec, "frame_size": [1, 1]}, index)
    except ValueError as exc:
        return str(exc).replace(f"sample {index}:", f"record {index}:")
    return None


def load_stgr(path: str | Path, video_root: str | Path | None = None, *, sft: bool = False,
              strict: bool = False, sources: Sequence = (), key_frame_root: str | Path = "") -> STGRDataset:
    """Read an STGR dataset, normalise and validate its records, and find their files (module
    docstring). ``video_root`` defaults to the file's folder when ``sources`` is empty."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} not found (config key 'data.dataset')")
    root = video_root or ("" if sources else path.parent)
    where = Sources(sources, root, key_frame_root)
    items = [(line, normalize_record(rec)) for line, rec in _read(path)]
    problems, seen, valid = [], {}, []
    for i, (line, rec) in enumerate(items):
        msg = _check(rec, i, sft)
        if msg is None and rec["id"] in seen:
            msg = f"record {i}: duplicate id {rec['id']!r} (first at record {seen[rec['id']]})"
        if msg:
            problems.append(f"{path}:{line}: {msg}")
        else:
            seen[rec["id"]] = i
            valid.append((line, rec))
    if problems and strict:
        raise DatasetError(path, problems)
    if problems:
        log.warning("%d of %d records skipped as invalid (data.strict=false); first: %s",
                    len(problems), len(items), problems[0])
    unmatched: dict[str, int] = {}
    for _, rec in valid:
        if where.for_source(rec.get("source", "")) is None:
            unmatched[rec.get("source", "")] = unmatched.get(rec.get("source", ""), 0) + 1
    if unmatched:
        raise DatasetError(path, [f"source {s!r} ({n} record(s)) matches no data.sources entry and "
                                  "data.video_root is empty: add an entry for it or set data.video_root"
                                  for s, n in sorted(unmatched.items())])
    records, homes, lines, missing = [], [], [], []
    for line, rec in valid:
        home = where.for_source(rec.get("source", ""))
        media = home.media / rec.get("video_path", rec.get("image_path", ""))
        if media.is_file():
            records.append(rec)
            homes.append(home)
            lines.append(line)
        else:
            kind = "video" if "video_path" in rec else "image"
            missing.append(f"{path}:{line}: {rec['id']}: {kind} {media} not found")
    if missing:
        if strict:
            raise DatasetError(path, missing)
        log.warning("%d of %d records skipped: media file missing (first: %s)", len(missing),
                    len(items), missing[0])
    if not records:
        raise DatasetError(path, ["no usable records"] + problems[:5] + missing[:5])
    return STGRDataset(path, records, homes, lines, missing, problems)


def load_configured(data_cfg, seed: int, *, sft: bool, dist_info=None) -> STGRDataset:
    """The dataset of ``data.dataset`` with the config's sources, roots and strictness; for
    ``synthetic``, the bundled generator's (rank 0 writes it first, the others wait)."""
    path = data_cfg.dataset
    if path == "synthetic":
        from visioncoach.data.synthetic import ensure_synthetic

        if dist_info is None or dist_info.is_main:
            ensure_synthetic(data_cfg.synthetic_samples, seed, tasks=data_cfg.synthetic_tasks)
        if dist_info is not None and dist_info.backend is not None:
            import torch.distributed as dist

            dist.barrier()
        path = ensure_synthetic(data_cfg.synthetic_samples, seed, tasks=data_cfg.synthetic_tasks)
    return load_stgr(path, data_cfg.video_root or None, sft=sft, strict=data_cfg.strict,
                     sources=data_cfg.sources, key_frame_root=data_cfg.key_frame_root)
