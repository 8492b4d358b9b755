"""Multiple-choice video QA accuracy (VideoMME, WorldSense, VideoMMMU, PerceptionTest style).

Ground truth (also ``visioncoach.predict --bench mcq``'s input): JSONL, one question a line::

    {"id": "q17" (optional; default: the 0-based index of the line among non-blank lines),
     "video": "relative/or/absolute.mp4", "question": "...",
     "options": ["A. ...", "B. ..."] or ["...", "..."] or {"A": "...", "B": "..."},
     "answer": "B" (or "B. ..."), "category": "..." (optional)}

Predictions: JSONL ``{"id": ..., "pred": "B", "output": "<raw model text>"}``; ``pred`` is
scored, and without a ``pred`` key the letter is read from the output's answer. A prediction's
letter is ``grounding.answer_letter`` (the letter after "Correct Option:" when the text has
one, so Open-o3-Video-style answers are not misread; else ``grounding.option_letter``); the
ground truth's is ``option_letter``. Letters compare case-insensitively.

    acc            = 100 * (1/N) sum_i [pred_i == answer_i]          over all N questions
    acc(category)  = the same over the questions of that category

A question without a usable prediction (missing, failed, no letter) is wrong and counted in
``n_bad``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from visioncoach.eval.common import (EvalInputError, Problems, answer_text, format_table,
                                     index_predictions, read_jsonl)
from visioncoach.grounding import answer_letter, option_letter

__all__ = ["MCQItem", "read_items", "option_lines", "load_predictions", "mcq_metrics", "evaluate", "table"]

NO_CATEGORY = "(none)"
_LABEL = re.compile(r"[(\[]?([A-Za-z])[.):\]]")   # "A." "A)" "(A)" "[A]" "A:" at the start


@dataclass
class MCQItem:
    id: str
    answer: str            # the option letter, upper case
    category: str
    video: str | None
    question: str | None
    options: list[str] | None   # "A. text" lines


def option_lines(options) -> list[str]:
    """Options as "A. text" lines: a dict maps letter -> text; list entries that do not
    already start with their letter label ("A.", "A)", "(A)", "[A]", "A:") get "A. " prefixed
    ("A cat" is an unlabelled option, not option A)."""
    if isinstance(options, dict):
        return [f"{str(k).strip()}. {str(v).strip()}" for k, v in options.items()]
    out = []
    for j, opt in enumerate(options):
        letter = chr(ord("A") + j)
        text = str(opt).strip()
        m = _LABEL.match(text)
        out.append(text if m and m.group(1).upper() == letter else f"{letter}. {text}")
    return out


def read_items(path: str | Path, need_inputs: bool = False) -> list[MCQItem]:
    """Read the questions; a malformed line is an error naming file:line. ``need_inputs``:
    also require ``video``, ``question`` and ``options`` (for prediction)."""
    path = Path(path)
    problems = Problems()
    records = read_jsonl(path, problems, what="MCQ annotation file")
    if problems:
        raise EvalInputError(f"MCQ annotation file {problems.messages[0]}")
    items, seen = [], {}
    for index, (lineno, rec) in enumerate(records):
        where = f"MCQ annotation file {path}:{lineno}"
        qid = str(rec["id"]) if rec.get("id") is not None else str(index)
        if qid in seen:
            raise EvalInputError(f"{where}: id {qid!r} already used on line {seen[qid]}")
        seen[qid] = lineno
        letter = option_letter(rec["answer"]) if isinstance(rec.get("answer"), str) else None
        if letter is None:
            raise EvalInputError(f"{where}: 'answer' must be an option letter ('B' or 'B. ...'), "
                                 f"got {rec.get('answer')!r}")
        options = rec.get("options")
        if need_inputs:
            if not isinstance(rec.get("video"), str) or not isinstance(rec.get("question"), str):
                raise EvalInputError(f"{where}: 'video' and 'question' must be strings")
            if not isinstance(options, (list, dict)) or len(options) < 2:
                raise EvalInputError(f"{where}: 'options' must be a list or object of >= 2 options")
        items.append(MCQItem(qid, letter, str(rec.get("category") or NO_CATEGORY), rec.get("video"),
                             rec.get("question"), option_lines(options) if need_inputs else None))
    if not items:
        raise EvalInputError(f"MCQ annotation file {path}: no questions")
    return items


def load_predictions(path: str | Path, items: list[MCQItem], problems: Problems) -> list[str | None]:
    """The predicted letter (or None) of each item."""
    path = Path(path)
    records = index_predictions(read_jsonl(path, problems), "id", path, problems)
    known = {it.id for it in items}
    for key, (lineno, _) in records.items():
        if key not in known:
            problems.add(f"{path}:{lineno}", f"id {key!r} is not in the annotations", "unknown id")
    preds: list[str | None] = []
    for it in items:
        if it.id not in records:
            problems.add(str(path), f"id {it.id!r}: no prediction", "no prediction")
            preds.append(None)
            continue
        lineno, rec = records[it.id]
        where = f"{path}:{lineno}"
        letter = None
        if rec.get("error"):
            problems.add(where, f"id {it.id!r}: prediction failed ({str(rec['error'])[:120]})",
                         "prediction failed")
        elif "pred" in rec:
            letter = answer_letter(rec["pred"]) if isinstance(rec["pred"], str) else None
            if letter is None:
                problems.add(where, f"id {it.id!r}: 'pred' {str(rec['pred'])[:40]!r} is no option letter",
                             "no letter")
        elif isinstance(rec.get("output"), str):
            letter = answer_letter(answer_text(rec["output"]))
            if letter is None:
                problems.add(where, f"id {it.id!r}: no option letter in the output's answer", "no letter")
        else:
            problems.add(where, f"id {it.id!r}: neither 'pred' nor 'output'", "no pred")
        preds.append(letter)
    return preds


def mcq_metrics(items: list[MCQItem], preds: list[str | None]) -> dict:
    """Accuracy (percent) overall and per category; None predictions are wrong."""
    by_cat: dict[str, list[bool]] = defaultdict(list)
    correct = [p is not None and p == it.answer for it, p in zip(items, preds, strict=True)]
    for it, ok in zip(items, correct):
        by_cat[it.category].append(ok)
    return {"acc": 100.0 * sum(correct) / len(items), "n": len(items),
            "n_bad": sum(p is None for p in preds),
            "per_category": {c: {"acc": 100.0 * sum(v) / len(v), "n": len(v)}
                             for c, v in sorted(by_cat.items())}}


def evaluate(gt_path: str | Path, pred_path: str | Path) -> tuple[dict, Problems]:
    items = read_items(gt_path)
    problems = Problems()
    metrics = mcq_metrics(items, load_predictions(pred_path, items, problems))
    metrics["bad"] = dict(problems.by_reason)
    return metrics, problems


def table(m: dict) -> str:
    rows = [[c, v["n"], v["acc"]] for c, v in m["per_category"].items()]
    rows.append(["overall", m["n"], m["acc"]])
    return format_table(f"Multiple-choice accuracy ({m['n']} questions, {m['n_bad']} without a "
                        "usable prediction)", ["category", "n", "acc"], rows)
