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

import re

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


_BOX_TAG = re.compile(r"<box>(.*?)</box>", re.S)
_LIST = re.compile(r"\[([^\[\]<>]*)\]")
_PLAIN_NUMBER = re.compile(r"\s*[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*")


def boxes_to_pixels(text: str, sx: float, sy: float, *, bare: bool = False) -> str:
    """``text`` with every box ``[x1, y1, x2, y2]`` inside ``<box>`` tags (and, with ``bare``,
    every 4-number list anywhere) mapped to integer pixels of the frame the model sees: x
    multiplied by ``sx``, y by ``sy``, rounded (Python's ``round``: half to even) and written
    without spaces, ``[x1,y1,x2,y2]``, as the reference writes them before tokenizing. Video
    records store normalized [0, 1] boxes (sx, sy = the frame's W, H); image records store
    pixels of the original image (sx, sy = frame W / image W, frame H / image H). Anything that
    is not 4 plain numbers is left as it is."""
    def convert(m: re.Match) -> str:
        parts = m.group(1).split(",")
        if len(parts) != 4 or not all(_PLAIN_NUMBER.fullmatch(p) for p in parts):
            return m.group(0)
        scale = (sx, sy, sx, sy)
        return "[" + ",".join(str(round(float(p) * k)) for p, k in zip(parts, scale)) + "]"

    if bare:
        return _LIST.sub(convert, text)
    return _BOX_TAG.sub(lambda m: "<box>" + _LIST.sub(convert, m.group(1)) + "</box>", text)


def sft_target(record, frame_size: tuple[float, float]) -> str:
    """The SFT target text of an STGR record for frames of ``frame_size`` = (W, H), the
    reference's: ``<think>`` + reasoning + ``</think>\\n<answer>`` + answer + ``</answer>``, its
    boxes in pixels of the model's frames (``boxes_to_pixels``; an image record's answer box
    too, since the visual-QA reward compares boxes in those pixels). A ``reasoning_process``
    that already carries think/answer tags is the whole target as it is."""
    reasoning, answer = record["reasoning_process"], record["answer"]
    if "<think>" in reasoning or "<answer>" in reasoning:
        return reasoning
    w, h = (float(v) for v in frame_size)
    if "video_path" not in record and record.get("image_size"):
        iw, ih = (float(v) for v in record["image_size"])
        sx, sy = w / iw, h / ih
        answer = boxes_to_pixels(answer, sx, sy, bare=True)
    else:
        sx, sy = w, h
    return f"<think>{boxes_to_pixels(reasoning, sx, sy)}</think>\n<answer>{answer}</answer>"
