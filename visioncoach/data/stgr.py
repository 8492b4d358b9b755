"""STGR-format datasets (Open-o3-Video's STGR-RL / STGR-SFT): read, validate up front.

A dataset is a JSON list of records or JSONL (one record a line). Records carry the reward
fields (``visioncoach.rewards.records``: task, answer, key_frames, key_items, segments,
image_size) plus ``id``, ``question``, ``video_path`` (relative to the video root), and for
SFT ``reasoning_process``. ``frame_size`` is not in the files: it is the frame size after
resizing, recorded when the sample's frames are prepared.

Every record is checked before training starts and all problems are reported together, each
with its file, line and record index; a schema problem is a user error to fix, so loading
fails. A missing video file is different (a partial download, one bad file among 37k): it
is counted and the record dropped, unless ``strict``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from visioncoach.rewards.records import validate as validate_reward_fields

log = logging.getLogger(__name__)

MAX_REPORTED = 50


class DatasetError(ValueError):
    """Problems in a dataset file; ``problems`` lists every one as 'file:line: record i: ...'."""

    def __init__(self, path: Path, problems: list[str]):
        self.problems = problems
        shown = problems[:MAX_REPORTED]
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        super().__init__(f"{len(problems)} problem(s) in dataset {path}:\n  " + "\n  ".join(shown) + more)


@dataclass
class STGRDataset:
    path: Path
    video_root: Path
    records: list[dict]
    missing_videos: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def video(self, i: int) -> Path:
        return self.video_root / self.records[i]["video_path"]


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


def _check(rec: object, index: int, sft: bool) -> str | None:
    if not isinstance(rec, dict):
        return f"record {index}: must be an object, got {type(rec).__name__}"
    for name in ("id", "question", "video_path") + (("reasoning_process",) if sft else ()):
        if name not in rec:
            return f"record {index}: field {name!r} is required"
        if not isinstance(rec[name], str) or not rec[name]:
            return f"record {index}: field {name!r} must be a non-empty string, got {rec[name]!r}"
    try:
        # frame_size comes later (after resizing); any valid value lets the rest be checked.
        validate_reward_fields({**rec, "frame_size": [1, 1]}, index)
    except ValueError as exc:
        return str(exc).replace(f"sample {index}:", f"record {index}:")
    return None


def load_stgr(path: str | Path, video_root: str | Path | None = None, *, sft: bool = False,
              strict: bool = False) -> STGRDataset:
    """Read and validate an STGR dataset. ``video_root`` defaults to the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} not found (config key 'data.dataset')")
    root = Path(video_root) if video_root else path.parent
    items = _read(path)
    problems, seen = [], {}
    for i, (line, rec) in enumerate(items):
        msg = _check(rec, i, sft)
        if msg is None and rec["id"] in seen:
            msg = f"record {i}: duplicate id {rec['id']!r} (first at record {seen[rec['id']]})"
        if msg:
            problems.append(f"{path}:{line}: {msg}")
        else:
            seen[rec["id"]] = i
    if problems:
        raise DatasetError(path, problems)
    records, missing = [], []
    for line, rec in items:
        if (root / rec["video_path"]).is_file():
            records.append(rec)
        else:
            missing.append(f"{path}:{line}: {rec['id']}: video {root / rec['video_path']} not found")
    if missing:
        if strict:
            raise DatasetError(path, missing)
        log.warning("%d of %d records skipped: video file missing (first: %s)", len(missing),
                    len(items), missing[0])
    if not records:
        raise DatasetError(path, ["no usable records"] + missing[:5])
    return STGRDataset(path, root, records, missing)
