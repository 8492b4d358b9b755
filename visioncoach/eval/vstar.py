"""V-STAR spatio-temporal reasoning metrics (paper appendix A.2, eqs. 9-12).

V-STAR asks, per item, *what* (a free-form answer), *when* (a time segment) and *where*
(boxes of the key object) in two orders: chain 1 what-when-where, chain 2 what-where-when.
The answer is shared by both chains; the temporal and visual answers are asked once per chain.
Over the N ground-truth items (every item counts; a missing prediction scores 0 everywhere):

    Acc      = (1/N) sum_i [judge score_i >= 2]          judge scores on 0-3 (``judge.py``)
    m_tIoU_c = (1/N) sum_i IoU(segment_i^c, timestamps_i)        (``segment_iou``)
    m_vIoU_c = (1/N) sum_i vIoU_i^c
    vIoU_i^c = mean over the item's annotated boxes (t, b) of max_{p in P_i^c(t)} IoU(p, b),
               0 when the model gave no box for t; 0 for an item with no annotated box
    AM_c     = (Acc + m_tIoU_c + m_vIoU_c) / 3
    LGM_c    = -(1/3) [ln(1 - Acc + eps) + ln(1 - m_tIoU_c + eps) + ln(1 - m_vIoU_c + eps)]
    mAM      = (AM_1 + AM_2) / 2,   mLGM = (LGM_1 + LGM_2) / 2

with the metrics as fractions in [0, 1] inside the logarithms and eps = 1e-6 (``LGM_EPS``):
the benchmark's own script has no epsilon, so a perfect metric (x = 1) takes ln(0) and
crashes. With eps a perfect metric contributes -ln(1e-6) = 13.8 to the sum, and eps moves
each term by ln(1 + eps / (1 - x)) <= eps / (1 - x): about 1e-6 for metrics away from 1,
1e-3 at x = 0.999, invisible at the reported precision. Everything is reported in percent
(x100), as in Table 2.

Matching a predicted box to an annotated one follows the benchmark (boxes are compared per
annotated frame timestamp, several predicted boxes for one timestamp take the best): a
prediction key is a timestamp in seconds written as a string ("3", "3.0", "12.5") and counts
for an annotated timestamp within 1 ms of it. Boxes are [x1, y1, x2, y2] in original-video
pixels (``visioncoach.predict`` rescales the boxes the model gives in resized-frame pixels).

Ground truth: the released JSON list of items with ``vid``, ``question``, ``answer``,
``timestamps`` [s, e], ``bboxes`` [{``timestamp``, ``frame_index``, ``xmin``, ``ymin``,
``xmax``, ``ymax``}], ``width``, ``height``, ``fps``, ``frame_count``, ``domain`` (the
release's ``temporal_question``, ``spatial_question``, ``spatial_question_2`` are used by
``visioncoach.predict``). Predictions: JSONL, one line per item::

    {"id": <index of the item in the ground truth, optional>, "vid": ..., "answer": "...",
     "judge_score": 0-3 (optional: absent = judged by the configured judge),
     "chain1": {"segment": [s, e], "boxes": {"<timestamp>": [x1, y1, x2, y2] or [[...], ...]}},
     "chain2": {...}}

Without ``id`` a line is matched by ``vid``, which must then name exactly one item.
"""

from __future__ import annotations

import math
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from visioncoach.eval.common import (EvalInputError, Problems, finite_box, finite_number, finite_pair,
                                     format_table, read_json, read_jsonl)
from visioncoach.eval.judge import CORRECT_SCORE, MAX_SCORE, ExactMatchJudge, Judge
from visioncoach.grounding import Box
from visioncoach.rewards.reference import box_iou, segment_iou

__all__ = ["LGM_EPS", "TIMESTAMP_TOLERANCE", "CHAINS", "VStarItem", "read_ground_truth",
           "arithmetic_mean", "log_geometric_mean", "summarize", "visual_iou", "evaluate", "table"]

LGM_EPS = 1e-6
TIMESTAMP_TOLERANCE = 1e-3   # seconds: a predicted box key matches an annotated timestamp
CHAINS = ("chain1", "chain2")


@dataclass
class VStarItem:
    vid: str
    question: str
    answer: str
    segment: tuple[float, float]
    boxes: list[tuple[float, Box]]          # (timestamp s, [x1, y1, x2, y2] original pixels)
    width: float
    height: float
    domain: str = ""
    extra: dict = field(default_factory=dict)   # the raw item (questions for predict)


def read_ground_truth(path: str | Path) -> list[VStarItem]:
    """The released V-STAR JSON; a malformed item is an error naming the item index and field."""
    data = read_json(path, "V-STAR ground truth")
    if not isinstance(data, list) or not data:
        raise EvalInputError(f"V-STAR ground truth {path}: expected a non-empty JSON list of items")
    items = []
    for i, raw in enumerate(data):
        def bad(what: str) -> EvalInputError:
            vid = raw.get("vid") if isinstance(raw, dict) else None
            return EvalInputError(f"V-STAR ground truth {path}: item {i} (vid {vid!r}): {what}")
        if not isinstance(raw, dict):
            raise bad("not a JSON object")
        for key in ("vid", "question", "answer"):
            if not isinstance(raw.get(key), str):
                raise bad(f"{key!r} must be a string")
        seg = finite_pair(raw.get("timestamps"))
        if seg is None or seg[0] > seg[1]:
            raise bad("'timestamps' must be [start, end] with start <= end")
        width, height = finite_number(raw.get("width")), finite_number(raw.get("height"))
        if not width or not height or width <= 0 or height <= 0:
            raise bad("'width' and 'height' must be positive numbers")
        if not isinstance(raw.get("bboxes"), list):
            raise bad("'bboxes' must be a list")
        boxes = []
        for j, b in enumerate(raw["bboxes"]):
            t = finite_number(b.get("timestamp")) if isinstance(b, dict) else None
            box = finite_box([b.get(k) for k in ("xmin", "ymin", "xmax", "ymax")]) if isinstance(b, dict) else None
            if t is None or box is None:
                raise bad(f"bboxes[{j}] needs numeric 'timestamp', 'xmin', 'ymin', 'xmax', 'ymax'")
            boxes.append((t, box))
        items.append(VStarItem(raw["vid"], raw["question"], raw["answer"], seg, boxes, width, height,
                               str(raw.get("domain", "")), raw))
    return items


# ---------------------------------------------------------------------------------------
# The aggregate formulas (fractions in, fractions out)
# ---------------------------------------------------------------------------------------

def arithmetic_mean(acc: float, tiou: float, viou: float) -> float:
    """AM (eq. 9)."""
    return (acc + tiou + viou) / 3.0


def log_geometric_mean(acc: float, tiou: float, viou: float, eps: float = LGM_EPS) -> float:
    """LGM (eq. 11): -(1/3) sum ln(1 - x + eps) over the three metrics in [0, 1]."""
    for x in (acc, tiou, viou):
        if not 0.0 <= x <= 1.0:
            raise ValueError(f"LGM takes metrics in [0, 1] (fractions, not percent), got {x}")
    return -(math.log(1 - acc + eps) + math.log(1 - tiou + eps) + math.log(1 - viou + eps)) / 3.0


def summarize(acc: float, chains: dict[str, tuple[float, float]], eps: float = LGM_EPS) -> dict:
    """The reported numbers in percent from Acc and per-chain (m_tIoU, m_vIoU), all fractions."""
    out: dict = {"acc": 100 * acc}
    for name, (tiou, viou) in chains.items():
        out[name] = {"tIoU": 100 * tiou, "vIoU": 100 * viou,
                     "AM": 100 * arithmetic_mean(acc, tiou, viou),
                     "LGM": 100 * log_geometric_mean(acc, tiou, viou, eps)}
    out["mAM"] = sum(out[c]["AM"] for c in chains) / len(chains)
    out["mLGM"] = sum(out[c]["LGM"] for c in chains) / len(chains)
    return out


def visual_iou(gt_boxes: list[tuple[float, Box]], pred_boxes: dict[float, list[Box]]) -> float:
    """vIoU of one item and chain: mean over annotated (t, box) of the best IoU among the
    predicted boxes for t (0 when none); 0 when the item has no annotated box."""
    if not gt_boxes:
        return 0.0
    total = 0.0
    for t, gt in gt_boxes:
        cands = [b for k, bs in pred_boxes.items() if abs(k - t) <= TIMESTAMP_TOLERANCE for b in bs]
        total += max((box_iou(b, gt) for b in cands), default=0.0)
    return total / len(gt_boxes)


# ---------------------------------------------------------------------------------------
# Predictions
# ---------------------------------------------------------------------------------------

@dataclass
class _ItemScore:
    judge: int = 0
    tiou: dict = field(default_factory=lambda: dict.fromkeys(CHAINS, 0.0))
    viou: dict = field(default_factory=lambda: dict.fromkeys(CHAINS, 0.0))


def _chain_boxes(boxes, where: str, chain: str, problems: Problems) -> dict[float, list[Box]]:
    out: dict[float, list[Box]] = {}
    if boxes is None:
        return out
    if not isinstance(boxes, dict):
        problems.add(where, f"{chain}.boxes is not an object {{timestamp: box}}", "bad boxes")
        return out
    for key, value in boxes.items():
        try:
            t = finite_number(float(key))
        except ValueError:
            t = None
        single = finite_box(value)
        many = ([finite_box(v) for v in value] if isinstance(value, list) and value
                and all(isinstance(v, (list, tuple)) for v in value) else None)
        if t is None or (single is None and (many is None or None in many)):
            problems.add(where, f"{chain}.boxes[{key!r}]: need a timestamp key and [x1, y1, x2, y2] "
                                f"(or a list of them), got {str(value)[:60]}", "bad boxes")
            continue
        out.setdefault(t, []).extend([single] if single is not None else many)
    return out


def _match(rec: dict, items: list[VStarItem], by_vid: dict[str, list[int]]) -> int | str:
    """The item index a prediction is for, or the reason it matches none."""
    if rec.get("id") is not None:
        i = rec["id"]
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(items):
            return f"id {i!r} is not an item index (0..{len(items) - 1})"
        if "vid" in rec and rec["vid"] != items[i].vid:
            return f"id {i} is video {items[i].vid!r} in the ground truth, {rec['vid']!r} here"
        return i
    vid = rec.get("vid")
    hits = by_vid.get(vid, []) if isinstance(vid, str) else []
    if len(hits) != 1:
        return (f"no 'id' and vid {vid!r} names {len(hits)} items" if hits or isinstance(vid, str)
                else "neither 'id' nor 'vid'")
    return hits[0]


def _run_judge(judge: Judge, items: list[VStarItem], to_judge: list[tuple[int, str, str]],
               scores: list[_ItemScore]) -> int:
    """Judge the answers (``judge.workers`` at a time); returns how many got no score.

    A judge failure (endpoint down, no digit in the reply) scores 0 like a wrong answer but is
    the judge's fault, not the prediction's: it is printed and counted in ``judge_failed``,
    not in ``n_bad``.
    """
    def one(task):
        i, _, answer = task
        return judge.score(items[i].question, items[i].answer, answer)

    from tqdm import tqdm

    with ThreadPoolExecutor(max(1, judge.workers)) as pool:
        verdicts = list(tqdm(pool.map(one, to_judge), total=len(to_judge), desc=f"{judge.name} judge",
                             unit="answer", file=sys.stderr, disable=isinstance(judge, ExactMatchJudge)))
    failed = 0
    for (i, where, _), v in zip(to_judge, verdicts):
        if v.score is None:
            failed += 1
            if failed <= 5:
                print(f"{where}: item {i}: the {judge.name} judge gave no score ({v.error}); counted as wrong",
                      file=sys.stderr)
        else:
            scores[i].judge = v.score
    if failed:
        print(f"warning: the {judge.name} judge gave no score for {failed} of {len(to_judge)} answers "
              "(counted as wrong)", file=sys.stderr)
    return failed


def evaluate(gt_path: str | Path, pred_path: str | Path, judge: Judge | None = None,
             eps: float = LGM_EPS) -> tuple[dict, Problems]:
    """Metrics (the ``--out`` JSON) and the problems found in the predictions."""
    items = read_ground_truth(gt_path)
    judge = judge or ExactMatchJudge()
    pred_path = Path(pred_path)
    problems = Problems()
    by_vid: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_vid.setdefault(it.vid, []).append(i)
    matched: dict[int, tuple[int, dict]] = {}
    for lineno, rec in read_jsonl(pred_path, problems):
        i = _match(rec, items, by_vid)
        if isinstance(i, str):
            problems.add(f"{pred_path}:{lineno}", i, "unmatched line")
        else:
            matched[i] = (lineno, rec)   # later lines supersede earlier ones (retries)

    scores = [_ItemScore() for _ in items]
    to_judge: list[tuple[int, str, str]] = []    # (item, where, answer) without a judge_score
    n_bad = 0
    for i, item in enumerate(items):
        if i not in matched:
            problems.add(str(pred_path), f"item {i} ({item.vid}): no prediction", "no prediction")
            n_bad += 1
            continue
        lineno, rec = matched[i]
        where = f"{pred_path}:{lineno}"
        before = len(problems)
        if rec.get("error"):
            problems.add(where, f"item {i}: prediction failed ({str(rec['error'])[:120]})", "prediction failed")
            n_bad += 1
            continue
        s = scores[i]
        if rec.get("judge_score") is not None:
            js = rec["judge_score"]
            if isinstance(js, bool) or not isinstance(js, int) or not 0 <= js <= MAX_SCORE:
                problems.add(where, f"judge_score {js!r} is not an integer 0-{MAX_SCORE}", "bad judge_score")
            else:
                s.judge = js
        elif isinstance(rec.get("answer"), str):
            to_judge.append((i, where, rec["answer"]))
        else:
            problems.add(where, f"item {i}: no 'answer' string and no 'judge_score'", "no answer")
        for chain in CHAINS:
            c = rec.get(chain)
            if c is None:
                continue
            if not isinstance(c, dict):
                problems.add(where, f"{chain} is not an object", "bad chain")
                continue
            if c.get("segment") is not None:
                seg = finite_pair(c["segment"])
                if seg is None:
                    problems.add(where, f"{chain}.segment is not [start, end] of finite numbers", "bad segment")
                else:
                    s.tiou[chain] = segment_iou(seg, item.segment)
            s.viou[chain] = visual_iou(item.boxes, _chain_boxes(c.get("boxes"), where, chain, problems))
        n_bad += len(problems) > before

    judge_failed = _run_judge(judge, items, to_judge, scores)
    n = len(items)
    acc = sum(s.judge >= CORRECT_SCORE for s in scores) / n
    chains = {c: (sum(s.tiou[c] for s in scores) / n, sum(s.viou[c] for s in scores) / n) for c in CHAINS}
    metrics = summarize(acc, chains, eps)
    metrics.update(n=n, n_bad=n_bad, judge=judge.name, n_judged=len(to_judge), judge_failed=judge_failed,
                   lgm_eps=eps, bad=dict(problems.by_reason))
    return metrics, problems


def table(m: dict) -> str:
    rows = [[c, m["acc"], m[c]["tIoU"], m[c]["vIoU"], m[c]["AM"], m[c]["LGM"]] for c in CHAINS]
    rows.append(["mean: mAM, mLGM", m["acc"], "", "", m["mAM"], m["mLGM"]])
    return format_table(
        f"V-STAR ({m['n']} items, {m['n_bad']} with a missing or bad prediction, judge: {m['judge']}, "
        f"LGM eps {m['lgm_eps']:g})", ["chain", "Acc", "tIoU", "vIoU", "AM", "LGM"], rows)
