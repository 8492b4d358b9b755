"""Textual hints appended to the question when a visual prompt is applied (paper Alg. 1, line 9:
q' = q (+) hint(v)). One table, one entry per VP type; ``raw`` has no hint."""

from __future__ import annotations

__all__ = ["VP_HINTS", "add_hint"]

VP_HINTS: dict[str, str] = {
    "api_prompt": ("Hint: in the key frames, a red-to-yellow heatmap overlay highlights the "
                   "regions most relevant to the question."),
    "circle": "Hint: in the key frames, the key objects are marked with red circles.",
    "darken": ("Hint: in the key frames, the regions outside the key objects are darkened, "
               "so the key objects stand out."),
    "numpro": ("Hint: each key frame shows its frame number as red digits in the bottom-right "
               "corner."),
    "raw": "",
}


def add_hint(question: str, vp_type: str) -> str:
    """The question with ``vp_type``'s hint appended on a new line (unchanged for ``raw``)."""
    if vp_type not in VP_HINTS:
        raise ValueError(f"unknown visual prompt type {vp_type!r}; known: {sorted(VP_HINTS)}")
    hint = VP_HINTS[vp_type]
    if not hint:
        return question
    return f"{question.rstrip()}\n{hint}"
