"""Text templates of the VP-Selector pipeline (paper appendix C).

* ``proxy_reasoner_prompt``: the prompt to the proxy reasoners (paper Figure 9). The figure is
  written for 5-option multiple-choice questions; the answer rules are adapted per task (the
  option letters found in the question, or a free-form / time-span / box answer for the other
  STGR tasks). The grounding-tag requirements are verbatim.
* ``key_object_prompt``: key-object extraction from a question and its answer (Figure 10).
* ``selector_instruction``: the selector's own instruction (section 3.3 "we format the input
  (x, q) as an instruction to choose one method from V"); its wording is versioned by
  ``SELECTOR_PROMPT_VERSION``, saved with every trained selector.
"""

from __future__ import annotations

import re
from typing import Sequence

from visioncoach.rewards.records import MCQ_TASKS

__all__ = ["PROXY_PROMPT_VERSION", "SELECTOR_PROMPT_VERSION", "BOX_SCALE", "proxy_reasoner_prompt",
           "key_object_prompt", "selector_instruction", "option_letters"]

PROXY_PROMPT_VERSION = "fig9-v1"
SELECTOR_PROMPT_VERSION = "vp-selector-v1"
# Proxy reasoners write boxes as integers in [0, BOX_SCALE]; x / BOX_SCALE is the normalised
# coordinate (0 and 999 are the frame's edges).
BOX_SCALE = 999

_OPTION = re.compile(r"(?:^|[\s(])([A-H])[.):]\s")

# What the "answer" value must be, for tasks other than multiple choice.
_OPEN_ANSWER = {
    "temporal QA": ("the time span as [start, end] in seconds", "[3.0, 7.5]"),
    "visual QA": ("the bounding box as [x1, y1, x2, y2] with integer coordinates in [0, 999]",
                  "[120, 40, 560, 610]"),
}
_FREE_FORM = ("a short free-form answer (one sentence)", "The man puts the cup on the table.")


def option_letters(question: str) -> list[str]:
    """Option letters listed in an MCQ question ("A. red B. blue" -> [A, B]); A-E if none."""
    found = sorted(set(_OPTION.findall(question)))
    return found if len(found) >= 2 else list("ABCDE")


def _or_list(items: Sequence[str]) -> str:
    quoted = [f'"{x}"' for x in items]
    return ", ".join(quoted[:-1]) + f", or {quoted[-1]}" if len(quoted) > 1 else quoted[0]


def proxy_reasoner_prompt(question: str, task: str, num_frames: int) -> str:
    """The Figure 9 prompt for one question (the K key frames are sent after it, in order,
    each introduced by "Key frame i at T s:")."""
    if task in MCQ_TASKS:
        letters = option_letters(question)
        plain = ", ".join(letters[:-1]) + f", or {letters[-1]}"
        given = f"- A multiple-choice question with {len(letters)} options ({', '.join(letters)})."
        job2 = f"2) Select the correct answer ({plain})."
        answer_key = f'- "answer": a single string with the final answer (must be one of: {_or_list(letters)}).'
        example = letters[0]
        rule = f"- The answer must be exactly one letter: {plain}."
    else:
        what, example = _OPEN_ANSWER.get(task, _FREE_FORM)
        given = "- An open-ended question."
        job2 = "2) Answer the question."
        answer_key = f'- "answer": a single string with the final answer: {what}.'
        rule = f"- The answer must be {what}."
    return f"""You are a spatio-temporal video question answering model.

You will be given:
{given}
- {num_frames} keyframes from a video in chronological order.
Some frames may contain visual prompts (e.g., boxes/circles/darkening/heatmaps
or frame-number overlays).
Use these visual prompts as grounding hints when helpful.

Your job:
1) Produce a short, evidence-grounded reasoning that explicitly cites objects,
bounding boxes, and timestamps using special tags.
{job2}

OUTPUT FORMAT (MUST FOLLOW EXACTLY):
Return ONLY a valid JSON dictionary with exactly two keys: "reasoning" and "answer".
- "reasoning": a single paragraph string that includes grounding tags.
{answer_key}

GROUNDING TAG REQUIREMENTS (MANDATORY):
- Object tag: <obj>...</obj>
- Box tag: <box>[x1, y1, x2, y2]</box>
- Time tag: <t>...</t>                   (seconds)

Each grounding claim in the reasoning MUST include <obj>, <box>, and <t> together.
Use the exact substring pattern:
<obj>OBJECT</obj><box>[x1, y1, x2, y2]</box>at<t>TIME</t>s

Return format:
{{ "reasoning": "...<obj>...</obj><box>...</box>at<t>...</t>s...", "answer": "{example}" }}

Rules:
- The reasoning must not exceed 200 words.
- Use integer box coordinates in [0, 999].
{rule}

Question:
{question.strip()}"""


def key_object_prompt(question: str, answer: str, objects: Sequence[str] = ()) -> str:
    """The Figure 10 prompt (key-object extraction), with the candidate objects (may be empty)."""
    listed = ", ".join(objects) if objects else "(none)"
    return f"""You are given a question, list of candidate visual objects and its answer about a video.

Your task is to identify the key visual object(s) that must be visually grounded
to make the answer correct. Select ONE primary visual object, and optionally up
to TWO secondary visual objects.

[Question]
{question.strip()}

[Extracted objects]
{listed}

[Answer]
{answer.strip()}

Selection rules:
- Prefer selecting object names from [Extracted objects] if they reasonably
match the question and answer.
- Only select a new object NOT in [Extracted objects] if none of the extracted objects
are reasonable.
- If there is NO specific object that needs to be grounded (e.g., abstract, scene-level,
or judgment-based questions),
  return "NONE" as the primary object.
- For "used_object", indicate whether each object (primary and secondary) comes from
[Extracted objects]:
  - "yes" if the object is in [Extracted objects]
  - "no" if the object is newly selected (not in [Extracted objects]) or if primary
  is "NONE"

Output JSON only in the following format:
{{
  "primary": "object name or NONE",
  "secondary": ["object name", ...],
  "used_object": {{
    "primary": "yes" or "no",
    "secondary": ["yes" or "no", ...]  // same length as secondary array
  }}
}}"""


def selector_instruction(question: str, key_objects: Sequence[str] = (),
                         labels: Sequence[str] = ()) -> str:
    """The selector's user text (version ``SELECTOR_PROMPT_VERSION``); the contact sheet of
    the key frames is the image before it."""
    from visioncoach.selector.labels import selector_labels

    labels = tuple(labels) or selector_labels()
    options = ", ".join(labels[:-1]) + f" or {labels[-1]}" if len(labels) > 1 else labels[0]
    lines = ["The image shows key frames of a video in time order.", f"Question: {question.strip()}"]
    objs = [o.strip() for o in key_objects if o and o.strip()]
    if objs:
        lines.append(f"Key object: {', '.join(objs)}")
    lines.append(f"Which visual prompt on the key frames best helps answer the question: {options}? "
                 "Answer with the name only.")
    return "\n".join(lines)
