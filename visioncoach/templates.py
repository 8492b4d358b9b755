"""The policy's text template: one place, used by SFT, RL, the VP-Selector and inference.

Vocabulary used across the package: a *prompt* is what a model is given (the chat text and
its tokens, ``rollout.PromptEmbeds``); a *visual prompt* (``vp``) is VisionCoach's overlay on key
frames, always called that; a *template* is the fixed text a prompt is built from (this
module, ``selector.templates``).

The policy answers ``<think>...</think><answer>...</answer>`` and grounds its evidence inside
think as ``<obj>NAME</obj><box>[x1, y1, x2, y2]</box>at<t>T</t>s`` (boxes in pixels of the
frames it sees, times in seconds): the format ``visioncoach.grounding`` parses and the
rewards score.
"""

from __future__ import annotations

SYSTEM_PROMPT = (
    "You are a video reasoning assistant. Think step by step inside <think></think>, then give "
    "the final answer inside <answer></answer>. While thinking, ground each piece of visual "
    "evidence you use: name the object as <obj>name</obj>, give its bounding box in pixel "
    "coordinates of the frame as <box>[x1, y1, x2, y2]</box> (several boxes may follow one "
    "object), and the moment as at<t>T</t>s with T in seconds, for example "
    "<obj>red ball</obj><box>[12, 40, 88, 120]</box>at<t>3.5</t>s."
)

# What the answer block must contain, per STGR task.
ANSWER_FORMAT = {
    "General video QA MCQ": "Answer with the option letter only.",
    "temporal QA (MCQ)": "Answer with the option letter, then the time span as <t>s</t>s to <t>e</t>s.",
    "temporal QA": "Answer with the time span as <t>s</t>s to <t>e</t>s.",
    "visual QA": "Answer with the bounding box as [x1, y1, x2, y2] in pixels.",
    "General video QA Free-form": "Answer in a short sentence.",
    "temporal-spatial free-form QA": "Answer in a short sentence.",
}


def format_time(t: float) -> str:
    """Seconds as the prompt writes them: one decimal ("3.0", "12.5")."""
    return f"{t:.1f}"


def user_text(question: str, task: str, hint: str = "") -> str:
    """The question, the visual-prompt hint (if any) and the task's answer format."""
    if task not in ANSWER_FORMAT:
        raise ValueError(f"unknown task {task!r}; known: {sorted(ANSWER_FORMAT)}")
    parts = [question.strip()]
    if hint:
        parts.append(hint.strip())
    parts.append(ANSWER_FORMAT[task])
    return " ".join(parts)
