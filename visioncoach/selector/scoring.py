"""Scoring proxy-reasoner replies and deriving the VP-Selector pseudo-label (section 3.3,
eq. 3; appendix C.2 "Scoring" and "Pseudo-label selection").

A reply (Figure 9 format) is a JSON object ``{"reasoning": ..., "answer": ...}`` whose
reasoning grounds claims as ``<obj>NAME</obj><box>[x1, y1, x2, y2]</box>at<t>T</t>s`` with
integer box coordinates in [0, 999]. ``score_reply`` returns, per reply:

* ``correct`` (A_k): the answer scored by the project's accuracy reward
  (``visioncoach.rewards.reference.accuracy_reward``): multiple choice -> the exact option
  letter; open-ended -> ROUGE (mean of ROUGE-1/2/L F1) >= ``rouge_threshold``; temporal QA
  -> temporal IoU >= the same threshold; visual QA -> box IoU >= it (the reply's box in
  0-999 coordinates against the record's box).
* ``iou`` (spatial grounding): eq. 13 of the paper (the max-IoU form, Open-o3-Video's spatial
  reward) with 0-999 boxes: each claim's boxes are converted to normalised coordinates
  (v / ``BOX_SCALE``), the claim is matched to the annotated key frame nearest its time when
  |dt| <= ``tau`` seconds, and scores the best IoU of its boxes with that frame's annotated
  boxes (``box_iou``); 0 when no frame is within tau. The mean over claims; 0 without claims
  or without annotated boxes.
* ``object`` (object consistency): each claimed object name against the sample's key objects
  with the hierarchical similarity ``object_similarity``; the mean over claims of the best
  match; 0 without claims or key objects.

Malformed replies (no JSON object, missing or non-string keys) are wrong with all scores 0
and an ``error`` saying why. ``derive_label`` then picks, among the VP types where every
reasoner answered correctly, the one with the highest mean over reasoners of
(iou + object) / 2; None (the sample is dropped) when no type qualifies.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import asdict, dataclass
from typing import Mapping, Optional, Sequence

from visioncoach.grounding import normalize_name, parse
from visioncoach.rewards.reference import accuracy_reward, box_iou
from visioncoach.selector.templates import BOX_SCALE

__all__ = ["ReplyScore", "score_reply", "parse_reply", "object_similarity", "derive_label",
           "parse_key_objects", "SIM_EXACT", "SIM_SUBSTRING", "SIM_FUZZY_MAX", "FUZZY_MIN_RATIO",
           "SIM_JACCARD_MAX", "DEFAULT_ROUGE_THRESHOLD", "DEFAULT_TAU"]

# Hierarchical object similarity: the first level that applies gives the score.
SIM_EXACT = 1.0          # equal after normalisation (lower case, collapsed whitespace)
SIM_SUBSTRING = 0.9      # one name contains the other ("man" / "old man")
FUZZY_MIN_RATIO = 0.8    # difflib ratio at or above this is a fuzzy match ("t-shirt" / "tshirt")
SIM_FUZZY_MAX = 0.8      # ... scored ratio * SIM_FUZZY_MAX, so in [0.64, 0.8)
SIM_JACCARD_MAX = 0.6    # otherwise word-set Jaccard J > 0 scores J * SIM_JACCARD_MAX, in (0, 0.6]

DEFAULT_ROUGE_THRESHOLD = 0.5
DEFAULT_TAU = 1.0        # seconds, the paper's temporal gate of the spatial reward

_JSON_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def object_similarity(pred: str, gt: str) -> float:
    """Similarity of two object names (levels above); 0 for an empty name."""
    a, b = normalize_name(pred), normalize_name(gt)
    if not a or not b:
        return 0.0
    if a == b:
        return SIM_EXACT
    if a in b or b in a:
        return SIM_SUBSTRING
    ratio = difflib.SequenceMatcher(None, a, b).ratio()
    if ratio >= FUZZY_MIN_RATIO:
        return ratio * SIM_FUZZY_MAX
    wa, wb = set(re.findall(r"\w+", a)), set(re.findall(r"\w+", b))
    if wa and wb:
        return SIM_JACCARD_MAX * len(wa & wb) / len(wa | wb)
    return 0.0


def _json_object(text: str) -> Optional[dict]:
    """The first JSON object in a reply: the whole text, a fenced block, or the outermost
    {...} span."""
    if not isinstance(text, str):
        return None
    candidates = [text.strip()] + _JSON_FENCE.findall(text)
    lo, hi = text.find("{"), text.rfind("}")
    if 0 <= lo < hi:
        candidates.append(text[lo:hi + 1])
    for c in candidates:
        try:
            obj = json.loads(c)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def parse_reply(text: str) -> tuple[Optional[str], Optional[str], Optional[str]]:
    """(reasoning, answer, error) of a Figure 9 reply; error is None when well formed."""
    obj = _json_object(text)
    if obj is None:
        return None, None, "no JSON object in the reply"
    reasoning, answer = obj.get("reasoning"), obj.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        return None, None, "JSON has no non-empty string 'answer'"
    if not isinstance(reasoning, str):
        return None, answer, "JSON has no string 'reasoning'"
    return reasoning, answer, None


@dataclass
class ReplyScore:
    correct: bool
    answer_score: float     # the accuracy reward (1/0 for MCQ, ROUGE or IoU otherwise)
    iou: float
    object: float
    n_claims: int
    answer: Optional[str] = None
    error: Optional[str] = None

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def score_reply(text: str, record: Mapping, key_times: Sequence[float],
                key_boxes: Sequence[Sequence[tuple[float, float, float, float]]],
                key_objects: Sequence[str], *, rouge_threshold: float = DEFAULT_ROUGE_THRESHOLD,
                tau: float = DEFAULT_TAU) -> ReplyScore:
    """Score one reply (module docstring). ``key_boxes[k]``: the annotated boxes of key frame k
    (normalised xyxy, all objects); ``key_objects``: the names to match claims against."""
    reasoning, answer, error = parse_reply(text)
    if error is not None:
        return ReplyScore(False, 0.0, 0.0, 0.0, 0, answer, error)
    # The answer in the answer block, boxes in 0-999 space: accuracy_reward's frame_size is
    # that space, so visual QA answers compare with the record's box scaled to it.
    acc = accuracy_reward(f"<answer>{answer}</answer>", {**record, "frame_size": [BOX_SCALE, BOX_SCALE]})
    correct = acc >= 1.0 if _is_mcq(record) else acc >= rouge_threshold
    claims = parse(f"<think>{reasoning}</think><answer>{answer}</answer>").claims
    ious, objs = [], []
    for claim in claims:
        best = 0.0
        if key_times:
            k = min(range(len(key_times)), key=lambda j: abs(key_times[j] - claim.t))
            if abs(key_times[k] - claim.t) <= tau:
                for b in claim.boxes:
                    nb = tuple(v / BOX_SCALE for v in b)
                    for gt in key_boxes[k]:
                        best = max(best, box_iou(nb, tuple(gt)))
        ious.append(best)
        objs.append(max((object_similarity(claim.obj, o) for o in key_objects), default=0.0))
    n = len(claims)
    return ReplyScore(bool(correct), float(acc), sum(ious) / n if n else 0.0,
                      sum(objs) / n if n else 0.0, n, answer, None)


def _is_mcq(record: Mapping) -> bool:
    from visioncoach.rewards.records import MCQ_TASKS

    return record.get("task") in MCQ_TASKS


def derive_label(scores: Mapping[str, Mapping[str, Mapping]], vp_types: Sequence[str],
                 reasoners: Sequence[str]) -> tuple[Optional[str], Optional[float]]:
    """(label, its score) from per-type, per-reasoner score dicts (``ReplyScore.to_dict``):
    among types where every reasoner is correct, the highest mean of (iou + object) / 2;
    ties go to the type listed first in ``vp_types``. (None, None) when no type qualifies."""
    best: tuple[Optional[str], Optional[float]] = (None, None)
    for vp in vp_types:
        per = [scores[vp][r] for r in reasoners]
        if not per or not all(s["correct"] for s in per):
            continue
        g = sum((s["iou"] + s["object"]) / 2 for s in per) / len(per)
        if best[1] is None or g > best[1]:
            best = (vp, g)
    return best


def parse_key_objects(text: str) -> Optional[list[str]]:
    """Key objects from a Figure 10 reply: [primary, *secondary], [] when primary is NONE,
    None when the reply is malformed."""
    obj = _json_object(text)
    if obj is None or not isinstance(obj.get("primary"), str):
        return None
    primary = obj["primary"].strip()
    if not primary or primary.upper() == "NONE":
        return []
    secondary = obj.get("secondary") or []
    if not isinstance(secondary, list):
        secondary = []
    out = [primary] + [s.strip() for s in secondary[:2] if isinstance(s, str) and s.strip()]
    return list(dict.fromkeys(out))
