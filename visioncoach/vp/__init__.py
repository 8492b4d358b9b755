"""Data flow stage 2: visual prompts (VisionCoach section 3.2, appendix C.1), in one home.

* ``spec``: the table of visual-prompt types (what each needs, its renderer, hint, aliases);
* ``render``: ``render_vp`` (the table's kernel, Triton on CUDA, or its PyTorch reference) and
  ``render_key_frames``;
* ``chooser``: ``VPChooser``, which type a hard prompt gets (``vp.selector``);
* ``prompting``: a sample's prompted key frames and model inputs with the hint appended;
* ``heatmap``: CLIP relevance maps for ``api_prompt`` (imported lazily: it pulls in
  transformers' CLIP).
"""

from visioncoach.vp.render import render_key_frames, render_vp, render_vp_reference
from visioncoach.vp.spec import (RAW, VPSpec, add_hint, clip_required, register_vp_type, renderable,
                                 unregister_vp_type, vp_spec, vp_types)

__all__ = [
    "RAW", "VPSpec", "add_hint", "clip_required", "register_vp_type", "render_key_frames",
    "render_vp", "render_vp_reference", "renderable", "unregister_vp_type", "vp_spec", "vp_types",
    "ClipRelevance", "clip_heatmap_fn",
]


def __getattr__(name):
    if name in ("ClipRelevance", "clip_heatmap_fn"):
        from visioncoach.vp import heatmap

        return getattr(heatmap, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
