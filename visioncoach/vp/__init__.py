"""Visual prompts (VisionCoach appendix C.1): rendering on key frames, hint texts, CLIP heatmaps.

``render_vp`` (Triton on CUDA, PyTorch elsewhere; see ``visioncoach.kernels.vp_render``) draws
``darken`` / ``circle`` / ``numpro`` / ``api_prompt`` / ``raw`` on a batch of key frames;
``add_hint`` appends the matching text hint to the question; ``ClipRelevance`` (imported lazily,
it pulls in transformers) computes the query-conditioned heatmaps ``api_prompt`` blends in.
"""

from visioncoach.kernels.vp_render import (DIGIT_GLYPHS, VP_TYPES, default_digit_scale,
                                           default_pad, default_thickness, render_vp,
                                           render_vp_reference)
from visioncoach.vp.hints import VP_HINTS, add_hint

__all__ = [
    "VP_TYPES", "VP_HINTS", "DIGIT_GLYPHS", "add_hint", "render_vp", "render_vp_reference",
    "default_pad", "default_thickness", "default_digit_scale", "ClipRelevance",
]


def __getattr__(name):
    if name == "ClipRelevance":
        from visioncoach.vp.heatmap import ClipRelevance

        return ClipRelevance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
