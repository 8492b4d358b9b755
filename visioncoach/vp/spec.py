"""The visual-prompt table: one row per type, the one place every other module reads.

A row (``VPSpec``) says what a visual prompt needs and how it is drawn:

* ``needs``: the per-frame input its renderer takes, ``"boxes"`` (key-object boxes, pixel
  xyxy), ``"frame_index"`` (the frame's number in the prompt), ``"heatmap"`` (a relevance map;
  these come from a local CLIP checkpoint, ``vp.clip_path`` / ``--clip-path``) or None;
* ``kernel`` / ``reference``: the fast renderer (``backend``-aware, Triton on CUDA) and its
  plain PyTorch specification, both ``fn(frames, <input>, **options)`` -> new uint8 frames;
  a type without a kernel always renders with its reference;
* ``options``: which of ``render_vp``'s keyword options the renderer takes;
* ``hint``: the text appended to the question (Algorithm 1 line 9: q' = q + hint(v));
* ``aliases``: other names a VP-Selector may write for it (``selector.labels``).

Adding a visual prompt is its kernel (or a torch function) plus one ``register_vp_type`` row:
the config check (``vp.types``, ``vp.selector=fixed:<type>``), the chooser, ``render_vp``, the
hints, the selector's labels and the pseudo-label build all read this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

from visioncoach.kernels.vp_circle import vp_circle, vp_circle_reference
from visioncoach.kernels.vp_common import check_frames, copy_frames
from visioncoach.kernels.vp_darken import vp_darken, vp_darken_reference
from visioncoach.kernels.vp_frame_number import vp_frame_number, vp_frame_number_reference
from visioncoach.kernels.vp_heatmap import vp_heatmap_blend, vp_heatmap_blend_reference

__all__ = ["VPSpec", "register_vp_type", "unregister_vp_type", "vp_spec", "vp_types", "add_hint",
           "clip_required", "renderable", "selector_mode_ok", "SELECTOR_MODES", "RAW"]

Need = Optional[Literal["boxes", "frame_index", "heatmap"]]
RAW = "raw"
# ``vp.selector`` values besides fixed:<type> (``vp.chooser.VPChooser``).
SELECTOR_MODES = ("model", "gating", "random", "none")


@dataclass(frozen=True)
class VPSpec:
    name: str
    needs: Need
    hint: str
    reference: Callable
    kernel: Optional[Callable] = None
    options: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()

    @property
    def needs_clip(self) -> bool:
        return self.needs == "heatmap"


def _raw(frames):
    check_frames(frames)
    return copy_frames(frames)


_TABLE: dict[str, VPSpec] = {}


def register_vp_type(spec: VPSpec) -> VPSpec:
    """Add a visual prompt type (a name already in the table is an error)."""
    if spec.name in _TABLE:
        raise ValueError(f"visual prompt type {spec.name!r} is already registered")
    if spec.needs not in (None, "boxes", "frame_index", "heatmap"):
        raise ValueError(f"visual prompt {spec.name!r}: needs must be boxes, frame_index, heatmap "
                         f"or None, got {spec.needs!r}")
    _TABLE[spec.name] = spec
    return spec


def unregister_vp_type(name: str) -> None:
    _TABLE.pop(name, None)


def vp_types() -> tuple[str, ...]:
    """Every registered type, in registration order (the paper's pool first)."""
    return tuple(_TABLE)


def vp_spec(name: str) -> VPSpec:
    spec = _TABLE.get(name)
    if spec is None:
        raise ValueError(f"unknown visual prompt type {name!r}; known: {list(_TABLE)}")
    return spec


def add_hint(question: str, vp_type: str) -> str:
    """The question with ``vp_type``'s hint appended on a new line (unchanged for ``raw``)."""
    hint = vp_spec(vp_type).hint
    return f"{question.rstrip()}\n{hint}" if hint else question


def clip_required(vp_type: str, where: str) -> str:
    """The one message for a type that needs a CLIP heatmap when none is configured; ``where``
    names the config key or flag that would provide it."""
    return (f"visual prompt {vp_type!r} needs a local CLIP checkpoint for its heatmap: set {where} "
            f"(or leave {vp_type} out)")


def renderable(types, have_heatmaps: bool) -> list[str]:
    """The types of ``types`` this run can draw (those needing CLIP only with heatmaps)."""
    return [t for t in types if have_heatmaps or not vp_spec(t).needs_clip]


def selector_mode_ok(mode: str) -> bool:
    """Whether ``mode`` is a valid ``vp.selector``: a mode or fixed:<registered type>."""
    return mode in SELECTOR_MODES or (mode.startswith("fixed:") and mode[len("fixed:"):] in _TABLE)


# The paper's candidate pool V (section 3.3, appendix C.1), in the order the selector lists it.
register_vp_type(VPSpec(
    "api_prompt", needs="heatmap", kernel=vp_heatmap_blend, reference=vp_heatmap_blend_reference,
    options=("alpha",),
    hint=("Hint: in the key frames, a red-to-yellow heatmap overlay highlights the regions most "
          "relevant to the question."),
    aliases=("api prompt", "apiprompt", "api", "attention", "heatmap", "heat map",
             "attention prompt", "attention map")))
register_vp_type(VPSpec(
    "circle", needs="boxes", kernel=vp_circle, reference=vp_circle_reference, options=("thickness",),
    hint="Hint: in the key frames, the key objects are marked with red circles.",
    aliases=("circle", "circles", "red circle", "red circles", "circled")))
register_vp_type(VPSpec(
    "darken", needs="boxes", kernel=vp_darken, reference=vp_darken_reference,
    options=("darken_factor", "pad"),
    hint=("Hint: in the key frames, the regions outside the key objects are darkened, so the key "
          "objects stand out."),
    aliases=("darken", "darkened", "darkening", "dark")))
register_vp_type(VPSpec(
    "numpro", needs="frame_index", kernel=vp_frame_number, reference=vp_frame_number_reference,
    options=("digit_scale",),
    hint="Hint: the frames show their frame numbers as red digits in the bottom-right corner.",
    aliases=("numpro", "num pro", "frame number", "frame numbers", "frame numbering", "numbering",
             "frame index", "number")))
register_vp_type(VPSpec(
    RAW, needs=None, reference=_raw, hint="",
    aliases=("raw", "none", "no prompt", "no visual prompt", "original")))
