"""Charades-STA temporal grounding: R@1 at IoU 0.3 / 0.5 / 0.7 and mIoU, in percent.

Ground truth is the benchmark's annotation file as released, one query per line::

    VID start end##query text

(the test split: 3720 queries over 1334 videos). A query's id is its 0-based index among the
file's non-blank lines, which for the released file is its line index.

For query i with ground truth g_i = [s_i, e_i] and prediction p_i (one segment, "R@1"),

    IoU_i = |g_i & p_i| / |g_i | p_i|          (``rewards.reference.segment_iou``)
    R@k   = 100 * (1/N) sum_i [IoU_i >= k]      k in {0.3, 0.5, 0.7}
    mIoU  = 100 * (1/N) sum_i IoU_i

over *every* annotated query (N = 3720 for the test split): a query without a usable
prediction (missing, unparseable, failed, NaN) has IoU 0 and is counted in ``n_bad``, so a
predictor cannot raise its score by skipping hard queries.

562 ground-truth ends of the test split lie past the video's end. With ``--durations FILE``
(JSON ``{vid: seconds}``) each end is clamped, e_i <- max(s_i, min(e_i, duration)); without
it the annotations are used as released. Clamping only ever shortens a ground truth segment,
so it can raise or lower a prediction's IoU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from visioncoach.eval.common import (EvalInputError, Problems, answer_text, finite_number,
                                     finite_pair, format_table, index_predictions, read_json,
                                     read_jsonl)
from visioncoach.grounding import first_segment
from visioncoach.rewards.reference import segment_iou

__all__ = ["IOU_THRESHOLDS", "CharadesQuery", "read_annotations", "read_durations",
           "ground_truth_segments", "load_predictions", "charades_metrics", "evaluate", "table"]

IOU_THRESHOLDS = (0.3, 0.5, 0.7)


@dataclass(frozen=True)
class CharadesQuery:
    vid: str
    start: float
    end: float
    query: str


def read_annotations(path: str | Path) -> list[CharadesQuery]:
    """Parse ``VID start end##query`` lines; any malformed line is an error naming file:line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvalInputError(f"annotation file {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalInputError(f"annotation file {path}: cannot read as UTF-8 text ({exc})") from None
    queries = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        head, sep, query = line.partition("##")
        fields = head.split()
        where = f"annotation file {path}:{lineno}"
        if not sep or len(fields) != 3:
            raise EvalInputError(f"{where}: expected 'VID start end##query', got {line[:80]!r}")
        vid, s, e = fields
        try:
            start, end = finite_number(float(s)), finite_number(float(e))
        except ValueError:
            start = end = None
        if start is None or end is None or start < 0 or end < start:
            raise EvalInputError(f"{where}: start and end must be numbers with 0 <= start <= end, "
                                 f"got {s!r} {e!r}")
        queries.append(CharadesQuery(vid, start, end, query.strip()))
    if not queries:
        raise EvalInputError(f"annotation file {path}: no queries")
    return queries


def read_durations(path: str | Path) -> dict[str, float]:
    """``{vid: seconds}`` with every value a positive finite number."""
    data = read_json(path, "durations file")
    if not isinstance(data, dict):
        raise EvalInputError(f"durations file {path}: expected a JSON object {{vid: seconds}}")
    out = {}
    for vid, sec in data.items():
        v = finite_number(sec)
        if v is None or v <= 0:
            raise EvalInputError(f"durations file {path}: {vid!r} has {sec!r}, not a positive number")
        out[vid] = v
    return out


def ground_truth_segments(queries: list[CharadesQuery], durations: dict[str, float] | None = None,
                          durations_path: str | Path = "--durations") -> list[tuple[float, float]]:
    """Each query's [s, e]; with ``durations``, e clamped to [s, duration of its video]."""
    if durations is None:
        return [(q.start, q.end) for q in queries]
    out = []
    for i, q in enumerate(queries):
        if q.vid not in durations:
            raise EvalInputError(f"durations file {durations_path}: no duration for video {q.vid!r} "
                                 f"(query {i})")
        out.append((q.start, max(q.start, min(q.end, durations[q.vid]))))
    return out


def load_predictions(path: str | Path, queries: list[CharadesQuery], problems: Problems
                     ) -> list[tuple[float, float] | None]:
    """One predicted segment (or None) per query, from ``{"id", "vid", "pred": [s, e], ...}`` lines.

    ``pred`` is what is scored; a record without a ``pred`` key but with ``output`` has its
    segment parsed from the output's answer (``grounding.first_segment``). A record whose
    ``vid`` differs from the annotation's is a prediction for another file: a problem.
    """
    path = Path(path)
    records = index_predictions(read_jsonl(path, problems), "id", path, problems)
    preds: list[tuple[float, float] | None] = [None] * len(queries)
    for key, (lineno, rec) in records.items():
        where = f"{path}:{lineno}"
        try:
            i = int(key)
        except ValueError:
            i = -1
        if not 0 <= i < len(queries):
            problems.add(where, f"id {key!r} is not a query index (0..{len(queries) - 1})", "unknown id")
            continue
        if "vid" in rec and rec["vid"] != queries[i].vid:
            problems.add(where, f"id {i} is video {queries[i].vid!r} in the annotations, "
                                f"{rec['vid']!r} here", "vid mismatch")
            continue
        if rec.get("error"):
            problems.add(where, f"id {i}: prediction failed ({str(rec['error'])[:120]})", "prediction failed")
            continue
        if "pred" in rec:
            seg = finite_pair(rec["pred"])
        elif isinstance(rec.get("output"), str):
            seg = first_segment(answer_text(rec["output"]))
        else:
            problems.add(where, f"id {i}: neither 'pred' nor 'output'", "no pred")
            continue
        if seg is None and rec.get("pred", "") is None:
            problems.add(where, f"id {i}: the model gave no segment", "no segment")
            continue
        if seg is None:
            problems.add(where, f"id {i}: no [start, end] of finite numbers "
                                f"({str(rec.get('pred', 'in the output'))[:60]})", "bad segment")
            continue
        preds[i] = seg
    for i, p in enumerate(preds):
        if p is None and str(i) not in records:
            problems.add(f"{path}", f"id {i} ({queries[i].vid}): no prediction", "no prediction")
    return preds


def charades_metrics(gt: list[tuple[float, float]], preds: list[tuple[float, float] | None]) -> dict:
    """R@0.3/0.5/0.7 and mIoU (percent) over all queries; a None prediction has IoU 0."""
    if len(gt) != len(preds):
        raise ValueError(f"{len(gt)} ground truth segments but {len(preds)} predictions")
    ious = [0.0 if p is None else segment_iou(p, g) for g, p in zip(gt, preds)]
    n = len(ious)
    out = {f"R@{k}": 100.0 * sum(iou >= k for iou in ious) / n for k in IOU_THRESHOLDS}
    out.update(mIoU=100.0 * sum(ious) / n, n=n, n_bad=sum(p is None for p in preds))
    return out


def evaluate(gt_path: str | Path, pred_path: str | Path, durations_path: str | Path | None = None
             ) -> tuple[dict, Problems]:
    """Metrics (the ``--out`` JSON) and the problems found in the predictions."""
    queries = read_annotations(gt_path)
    durations = read_durations(durations_path) if durations_path else None
    gt = ground_truth_segments(queries, durations, durations_path)
    problems = Problems()
    preds = load_predictions(pred_path, queries, problems)
    metrics = charades_metrics(gt, preds)
    metrics["end_clamped"] = durations is not None
    metrics["bad"] = dict(problems.by_reason)
    return metrics, problems


def table(m: dict) -> str:
    return format_table(
        f"Charades-STA ({m['n']} queries, {m['n_bad']} without a usable prediction, "
        f"ground-truth ends {'clamped' if m['end_clamped'] else 'as released'})",
        ["R@0.3", "R@0.5", "R@0.7", "mIoU"], [[m["R@0.3"], m["R@0.5"], m["R@0.7"], m["mIoU"]]])
