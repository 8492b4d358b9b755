"""Shared pieces of the metric modules: tolerant JSONL reading, value checks, table and JSON output.

Two kinds of bad input, treated differently on purpose:

* Ground truth and side files (annotations, durations) are trusted inputs: anything
  unreadable there is an ``EvalInputError`` naming file and line, raised before any metric
  is computed, because a metric over a silently shortened ground truth is wrong.
* Prediction files come from models and crashed runs: a line that is not JSON, lacks its id,
  holds NaN or a malformed value is a *bad prediction*. It scores as wrong (IoU 0, answer
  incorrect), is counted, and is reported as ``file:line: reason``; evaluation never stops
  on it.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from visioncoach.grounding import Box
from visioncoach.utils.files import write_text_atomic

__all__ = ["EvalInputError", "Problems", "read_jsonl", "read_json", "finite_number", "finite_pair",
           "finite_box", "index_predictions", "format_table", "write_json", "default_out_path",
           "answer_text"]

# How many problem lines a report prints before summarising the rest by reason.
_SHOWN_PROBLEMS = 20


class EvalInputError(ValueError):
    """An unreadable evaluation input; the message names the file and, where known, the line."""


@dataclass
class Problems:
    """Bad prediction lines and values: ``file:line: reason`` messages plus counts by reason."""
    messages: list[str] = field(default_factory=list)
    by_reason: Counter = field(default_factory=Counter)

    def add(self, where: str, reason: str, kind: str | None = None) -> None:
        """Record one problem; ``kind`` (default: ``reason``) is the key it is counted under."""
        self.messages.append(f"{where}: {reason}")
        self.by_reason[kind or reason] += 1

    def __len__(self) -> int:
        return len(self.messages)

    def report(self, stream=None) -> None:
        """Print the first problems and a count per reason to ``stream`` (stderr)."""
        stream = stream or sys.stderr
        if not self.messages:
            return
        print(f"{len(self.messages)} problem(s) in the predictions:", file=stream)
        for msg in self.messages[:_SHOWN_PROBLEMS]:
            print(f"  {msg}", file=stream)
        if len(self.messages) > _SHOWN_PROBLEMS:
            print(f"  ... and {len(self.messages) - _SHOWN_PROBLEMS} more; by reason:", file=stream)
            for reason, n in self.by_reason.most_common():
                print(f"    {n:6d}  {reason}", file=stream)


def _open_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise EvalInputError(f"{what} {path}: file not found") from None
    except OSError as exc:
        raise EvalInputError(f"{what} {path}: cannot read ({exc.strerror or exc})") from None


def read_jsonl(path: str | Path, problems: Problems, what: str = "predictions"
               ) -> list[tuple[int, dict]]:
    """``(line number, object)`` for every line of a JSONL file that holds a JSON object.

    Blank lines are skipped; a line that is not UTF-8, not JSON or not an object is added to
    ``problems`` as ``file:line`` and skipped. Python's ``json`` accepts ``NaN`` and
    ``Infinity``; the value checks below reject them where a number is used.
    A missing or unreadable file is an ``EvalInputError``.
    """
    path = Path(path)
    out = []
    for lineno, raw in enumerate(_open_bytes(path, what).split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            problems.add(where, f"not UTF-8 (byte {exc.start})", "not UTF-8")
            continue
        except json.JSONDecodeError as exc:
            problems.add(where, f"not JSON ({exc.msg} at column {exc.colno})", "not JSON")
            continue
        if not isinstance(obj, dict):
            problems.add(where, f"a JSON {type(obj).__name__}, not an object", "not a JSON object")
            continue
        out.append((lineno, obj))
    return out


def read_json(path: str | Path, what: str):
    """A whole JSON document; errors name ``file:line:column``."""
    path = Path(path)
    data = _open_bytes(path, what)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise EvalInputError(f"{what} {path}:{line}: not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise EvalInputError(f"{what} {path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None


def finite_number(v) -> float | None:
    """``v`` as a float if it is a finite JSON number (bools are not numbers), else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def finite_pair(v) -> tuple[float, float] | None:
    """``[s, e]``: a list of two finite numbers, else None (order is kept)."""
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        return None
    a, b = finite_number(v[0]), finite_number(v[1])
    return None if a is None or b is None else (a, b)


def finite_box(v) -> Box | None:
    """``[x1, y1, x2, y2]``: a list of four finite numbers, else None (corners as given)."""
    if not isinstance(v, (list, tuple)) or len(v) != 4:
        return None
    nums = [finite_number(x) for x in v]
    return None if any(x is None for x in nums) else tuple(nums)


def index_predictions(records: Iterable[tuple[int, dict]], key: str, path: Path,
                      problems: Problems) -> dict[str, tuple[int, dict]]:
    """Prediction records by ``str(record[key])``; the *last* line of an id wins.

    ``visioncoach.predict`` appends a retried prediction after its failed one, so later lines
    supersede earlier ones. Records without the key are problems.
    """
    out: dict[str, tuple[int, dict]] = {}
    for lineno, rec in records:
        k = rec.get(key)
        if k is None or isinstance(k, (dict, list, bool)) or (isinstance(k, float) and not k.is_integer()):
            problems.add(f"{path}:{lineno}", f"no usable {key!r} field", f"no {key!r}")
            continue
        out[str(int(k)) if isinstance(k, float) else str(k)] = (lineno, rec)
    return out


def format_table(title: str, header: list[str], rows: list[list]) -> str:
    """A plain text table: columns padded to their widest cell, number columns (blanks
    allowed) right-aligned, floats with one decimal."""
    cells = [[str(h) for h in header]] + [[f"{c:.1f}" if isinstance(c, float) else str(c) for c in r]
                                           for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(isinstance(r[i], (int, float)) or r[i] == "" for r in rows) for i in range(len(header))]

    def line(r):
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric))

    rule = "-" * len(line(cells[0]))
    return "\n".join([title, rule, line(cells[0]), rule] + [line(r) for r in cells[1:]] + [rule])


def write_json(path: str | Path, obj: Mapping) -> None:
    """Write ``obj`` as indented JSON, via a temporary file and a rename (no half files)."""
    write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def default_out_path(pred: str | Path) -> Path:
    """``PRED.metrics.json`` beside the predictions when ``--out`` is not given."""
    pred = Path(pred)
    return pred.with_name(pred.name.removesuffix(".jsonl") + ".metrics.json")


def answer_text(output: str) -> str:
    """The part of a model output that answers: the ``<answer>`` block, or the whole text
    when the output has none (models that ignore the format still get scored)."""
    from visioncoach.grounding import parse

    answer = parse(output).answer
    return (answer if answer is not None else output).strip()
