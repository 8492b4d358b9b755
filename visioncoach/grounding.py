"""Parser for the policy's grounded output (paper section 3.4).

The policy writes ``<think>...</think><answer>...</answer>``. Inside think, a grounding
claim is

    <obj>NAME</obj><box>[x1, y1, x2, y2]</box>[<box>[...]</box> ...] at <t>T</t>s

with boxes in absolute pixels of the frames the model saw and T in seconds. The rewards
(``visioncoach.rewards``) read three things from here:

* the claims (o_m, t_m, b_m) of eqs. 7-8 and 13-15 (``Parsed.claims``),
* the predicted timestamps t_m of eqs. 5-6: every valid ``<t>`` number in think,
  inside claims or in prose (``Parsed.times``),
* ``Parsed.errors``: everything malformed. The format reward is 1 exactly when this list is
  empty (plus, for the temporal-spatial task, at least one claim).

Grammar (decided once here, shared by every reward):

* Blocks: think = first ``<think>`` up to the first ``</think>`` after it; answer likewise.
* Grounding tags ``<obj>``, ``<box>``, ``<t>``: a tag's content runs to the next ``<``, which
  must begin its own closing tag. Anything else (nested tag, end of think, another ``<``)
  makes the tag unclosed. This one rule covers nesting and truncation, and keeps the scan
  linear: no regex here can backtrack over more than one tag's content.
* Numbers: ``[-+]?(\\d+(\\.\\d*)?|\\.\\d+)`` (ASCII digits) with optional surrounding
  whitespace; no exponents, nan or inf. A number is also invalid if it does not fit a
  float32 (|x| > ~3.4e38): numbers are stored rounded to float32, the precision of the
  tensor layout kernels read, and the reference functions see the same rounded values, so
  the batched path and the reference agree bit for bit on every comparison.
* A box is ``[n, n, n, n]`` (exactly 4 numbers); x2 < x1 or y2 < y1 are swapped, nothing is
  clipped.
* A claim: a valid ``<obj>`` (non-blank name), then one or more ``<box>`` tags separated by
  whitespace only, then whitespace, ``at``, whitespace, a ``<t>`` tag (the ``s`` after
  ``</t>`` is optional). A claim keeps its valid boxes; it is dropped with no valid box or
  no valid time. It never extends past the next ``<obj>``.

Two implementations: ``parse`` (one text, plain Python) is the reference; the batch
front-end ``parse_texts`` runs the C++ op ``visioncoach::parse_grounding`` (csrc/grounding.cpp)
over a whole batch and builds the same ``ClaimBatch`` with no per-claim Python work, falling
back to ``parse`` where the extension is missing (``backend="auto"``).
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "Claim", "Parsed", "ClaimBatch", "ParsedBatch", "parse", "parse_batch", "parse_texts",
    "claim_batch", "native_available", "BACKENDS",
    "parse_number", "parse_box", "first_box", "first_segment", "option_letter", "answer_letter",
    "normalize_name", "to_f32",
]

# Atomic group: a failed match never re-splits a digit run (no quadratic backtracking).
_NUM = r"(?>[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
_NUM_FULL = re.compile(rf"\s*+({_NUM})\s*+")
_TAG = re.compile(r"<(/?)(obj|box|t)>")
_AT = re.compile(r"\s*+at\s*+")
_BOX_IN_TEXT = re.compile(
    rf"\[\s*+({_NUM})\s*+,\s*+({_NUM})\s*+,\s*+({_NUM})\s*+,\s*+({_NUM})\s*+\]")
_SEGMENT_IN_TEXT = re.compile(
    rf"\[\s*+({_NUM})\s*+,\s*+({_NUM})\s*+\]"
    rf"|<t>\s*+({_NUM})\s*+</t>\s*+s?\s*+to\s*+<t>\s*+({_NUM})\s*+</t>")

_F32 = struct.Struct("<f")
_MAX_ERRORS = 32
_LETTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_LETTER_END = frozenset(".)]:")
# ASCII-only case folding: with Unicode IGNORECASE, "K" (Kelvin sign) would match "k".
_CORRECT_OPTION = re.compile(r"correct\s*+option\s*+:", re.IGNORECASE | re.ASCII)

Box = tuple[float, float, float, float]


def to_f32(x: float) -> float | None:
    """``x`` rounded to float32 (as a Python float), or None if that is not finite."""
    try:
        y = _F32.unpack(_F32.pack(x))[0]
    except OverflowError:
        return None
    return y if math.isfinite(y) else None


def parse_number(s: str) -> float | None:
    """A plain decimal (optionally surrounded by whitespace) as float32, else None."""
    m = _NUM_FULL.fullmatch(s)
    return to_f32(float(m.group(1))) if m else None


def _order_box(x1: float, y1: float, x2: float, y2: float) -> Box:
    if x2 < x1:
        x1, x2 = x2, x1
    if y2 < y1:
        y1, y2 = y2, y1
    return (x1, y1, x2, y2)


def parse_box(s: str) -> Box | None:
    """The content of a ``<box>`` tag: ``[x1, y1, x2, y2]`` (4 valid numbers), else None."""
    s = s.strip()
    if len(s) < 2 or s[0] != "[" or s[-1] != "]":
        return None
    parts = s[1:-1].split(",")
    if len(parts) != 4:
        return None
    nums = [parse_number(p) for p in parts]
    if any(v is None for v in nums):
        return None
    return _order_box(*nums)


def first_box(text: str) -> Box | None:
    """The first ``[x1, y1, x2, y2]`` in free text (bare or inside ``<box>``), ordered."""
    for m in _BOX_IN_TEXT.finditer(text):
        nums = [to_f32(float(g)) for g in m.groups()]
        if all(v is not None for v in nums):
            return _order_box(*nums)
    return None


def first_segment(text: str) -> tuple[float, float] | None:
    """The first ``[s, e]`` or ``<t>s</t>s to <t>e</t>s`` in free text, ends ordered."""
    for m in _SEGMENT_IN_TEXT.finditer(text):
        groups = m.groups()
        pair = groups[:2] if groups[0] is not None else groups[2:]
        s, e = (to_f32(float(g)) for g in pair)
        if s is not None and e is not None:
            return (s, e) if s <= e else (e, s)
    return None


def option_letter(text: str) -> str | None:
    """The MCQ option letter of an answer, upper-cased, or None.

    After stripping whitespace and one leading ``(`` or ``[``, the first ASCII letter; it
    counts only if followed by the end, ``.``, ``)``, ``]``, ``:`` or whitespace (so
    "Answer: A" has no letter: its first letter is the A of "Answer").
    """
    s = text.strip()
    if s.startswith(("(", "[")):
        s = s[1:]
    for i, c in enumerate(s):
        if c in _LETTERS:
            nxt = s[i + 1:i + 2]
            if nxt == "" or nxt in _LETTER_END or nxt.isspace():
                return c.upper()
            return None
    return None


def answer_letter(text: str) -> str | None:
    """The option letter an MCQ answer (a prediction or a ground truth) gives, upper-cased,
    or None: r_acc of the MCQ tasks compares two of these.

    With a "Correct Option:" marker (case-insensitive, spaces optional around the colon),
    ``option_letter`` of the text after the first marker, so "From <t>3.2</t>s to
    <t>7.5</t>s.\\nCorrect Option: (B)" gives B (Open-o3-Video's temporal-MCQ form); a marker
    with no valid letter after it gives None, not a letter from before it. Without a marker,
    ``option_letter`` of the whole text ("B\\n[3.2, 7.5]", STGR's temporal-MCQ ground truth,
    gives B).
    """
    m = _CORRECT_OPTION.search(text)
    return option_letter(text[m.end():] if m else text)


def normalize_name(name: str) -> str:
    """Object name for identity matching: lower-cased, trimmed, inner whitespace collapsed."""
    return " ".join(name.lower().split())


@dataclass
class Claim:
    """One grounding claim (o_m, t_m, b_m): name as written, valid boxes (pixels), time (s)."""
    obj: str
    boxes: list[Box]
    t: float


@dataclass
class Parsed:
    think: str | None
    answer: str | None
    claims: list[Claim] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class _Errors(list):
    """Error list capped so 100 kB of garbage does not produce 10^4 messages."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0

    def add(self, msg: str) -> None:
        if len(self) < _MAX_ERRORS:
            self.append(msg)
        else:
            self.dropped += 1

    def finish(self) -> list[str]:
        out = list(self)
        if self.dropped:
            out.append(f"... and {self.dropped} more")
        return out


def _block(text: str, name: str) -> tuple[int, int] | None:
    """(content start, content end) of the first <name>...</name>, or None."""
    open_tag, close_tag = f"<{name}>", f"</{name}>"
    start = text.find(open_tag)
    if start < 0:
        return None
    end = text.find(close_tag, start + len(open_tag))
    if end < 0:
        return None
    return start + len(open_tag), end


def _check_structure(text: str, think: tuple[int, int] | None, answer: tuple[int, int] | None,
                     errors: _Errors) -> None:
    # Exactly one of each tag makes "first block" and "the block" the same thing.
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        n = text.count(tag)
        if n != 1:
            errors.add(f"{n} {tag} tags (need exactly 1)")
    if think is None:
        errors.add("no <think>...</think> block")
    if answer is None:
        errors.add("no <answer>...</answer> block")
    if think is None or answer is None:
        return
    ts, te = think
    as_, ae = answer
    if te + len("</think>") > as_ - len("<answer>"):
        errors.add("<answer> block does not follow <think> block")
        return
    outside = (text[:ts - len("<think>")], text[te + len("</think>"):as_ - len("<answer>")],
               text[ae + len("</answer>"):])
    if any(part.strip() for part in outside):
        errors.add("text outside the <think> and <answer> blocks")
    if not text[ts:te].strip():
        errors.add("empty <think> block")
    if not text[as_:ae].strip():
        errors.add("empty <answer> block")


@dataclass
class _Element:
    kind: str          # "obj" | "box" | "t"
    start: int         # index of '<' of the opening tag in think
    end: int           # index just past the closing tag
    value: object      # name (str), Box or float; None when the content is invalid


def _scan_think(think: str, errors: _Errors) -> list[_Element]:
    """Well-closed grounding tags of think in order; malformed ones go to ``errors``."""
    out: list[_Element] = []
    pos = 0
    while True:
        m = _TAG.search(think, pos)
        if m is None:
            return out
        kind = m.group(2)
        if m.group(1):
            errors.add(f"stray </{kind}>")
            pos = m.end()
            continue
        content_start = m.end()
        lt = think.find("<", content_start)
        close = f"</{kind}>"
        if lt < 0 or not think.startswith(close, lt):
            errors.add(f"unclosed <{kind}>")
            pos = content_start
            continue
        content = think[content_start:lt]
        value: object
        if kind == "obj":
            value = content if content.strip() else None
            if value is None:
                errors.add("empty <obj>")
        elif kind == "box":
            value = parse_box(content)
            if value is None:
                errors.add("<box> is not [x1, y1, x2, y2]")
        else:
            value = parse_number(content)
            if value is None:
                errors.add("<t> is not a number")
        end = lt + len(close)
        out.append(_Element(kind, m.start(), end, value))
        pos = end


def _is_blank(s: str, a: int, b: int) -> bool:
    return a == b or s[a:b].isspace()


def _claims(think: str, elements: list[_Element]) -> list[Claim]:
    claims: list[Claim] = []
    n = len(elements)
    for i, el in enumerate(elements):
        if el.kind != "obj" or el.value is None:
            continue
        j, prev_end, boxes, n_box_tags = i + 1, el.end, [], 0
        while j < n and elements[j].kind == "box" and _is_blank(think, prev_end, elements[j].start):
            if elements[j].value is not None:
                boxes.append(elements[j].value)
            n_box_tags += 1
            prev_end = elements[j].end
            j += 1
        if n_box_tags == 0 or j >= n:
            continue
        t_el = elements[j]
        if (t_el.kind == "t" and t_el.value is not None and boxes
                and _AT.fullmatch(think, prev_end, t_el.start)):
            claims.append(Claim(obj=el.value, boxes=boxes, t=t_el.value))
    return claims


def parse(text: str) -> Parsed:
    """Blocks, claims, predicted times and malformations of one output. Never raises."""
    if not isinstance(text, str):
        return Parsed(None, None, errors=[f"not a string: {type(text).__name__}"])
    errors = _Errors()
    think_span = _block(text, "think")
    answer_span = _block(text, "answer")
    _check_structure(text, think_span, answer_span, errors)
    think = text[think_span[0]:think_span[1]] if think_span else None
    answer = text[answer_span[0]:answer_span[1]] if answer_span else None
    claims: list[Claim] = []
    times: list[float] = []
    if think is not None:
        elements = _scan_think(think, errors)
        claims = _claims(think, elements)
        times = [el.value for el in elements if el.kind == "t" and el.value is not None]
    return Parsed(think, answer, claims, times, errors.finish())


# ---------------------------------------------------------------------------------------
# Batched layout for the reward kernels
# ---------------------------------------------------------------------------------------

@dataclass
class ClaimBatch:
    """Claims and predicted times of N rollouts as flat, padded tensors.

    C = total claims, Bmax = most boxes in one claim (>= 1), M = total predicted times.
    Claims and times are ordered by rollout, then by position in the text.

    claim_rollout [C] int64    rollout index of each claim (non-decreasing)
    claim_obj     [C] int64    index into ``names`` (normalized object names, deduplicated)
    claim_t       [C] float32  claim time t_m, seconds
    boxes         [C, Bmax, 4] float32  x1 <= x2, y1 <= y2 pixels; zero past box_count
    box_count     [C] int64    valid boxes of each claim, >= 1
    time_rollout  [M] int64    rollout index of each predicted time (non-decreasing)
    times         [M] float32  every valid <t> number of think (claims and prose)
    """
    n_rollouts: int
    names: list[str]
    claim_rollout: torch.Tensor
    claim_obj: torch.Tensor
    claim_t: torch.Tensor
    boxes: torch.Tensor
    box_count: torch.Tensor
    time_rollout: torch.Tensor
    times: torch.Tensor

    def to(self, device: torch.device | str) -> "ClaimBatch":
        return ClaimBatch(self.n_rollouts, self.names, *(
            getattr(self, f).to(device) for f in (
                "claim_rollout", "claim_obj", "claim_t", "boxes", "box_count",
                "time_rollout", "times")))


def claim_batch(parsed: list[Parsed]) -> ClaimBatch:
    """Pack already-parsed outputs into a ClaimBatch (one Python pass over the claims)."""
    name_ids: dict[str, int] = {}
    claim_rollout: list[int] = []
    claim_obj: list[int] = []
    claim_t: list[float] = []
    box_count: list[int] = []
    flat_boxes: list[Box] = []
    time_rollout: list[int] = []
    times: list[float] = []
    for r, p in enumerate(parsed):
        for c in p.claims:
            claim_rollout.append(r)
            claim_obj.append(name_ids.setdefault(normalize_name(c.obj), len(name_ids)))
            claim_t.append(c.t)
            box_count.append(len(c.boxes))
            flat_boxes.extend(c.boxes)
        times.extend(p.times)
        time_rollout.extend([r] * len(p.times))
    n_claims = len(claim_rollout)
    counts = torch.tensor(box_count, dtype=torch.int64)
    b_max = max(box_count, default=1)
    boxes = torch.zeros(n_claims, b_max, 4, dtype=torch.float32)
    if flat_boxes:
        # Scatter the flat box list into its padded rows: row = claim, column = rank in claim.
        row = torch.repeat_interleave(torch.arange(n_claims), counts)
        first = torch.cumsum(counts, 0) - counts
        col = torch.arange(len(flat_boxes)) - first[row]
        boxes[row, col] = torch.tensor(flat_boxes, dtype=torch.float32)
    return ClaimBatch(
        n_rollouts=len(parsed),
        names=list(name_ids),
        claim_rollout=torch.tensor(claim_rollout, dtype=torch.int64),
        claim_obj=torch.tensor(claim_obj, dtype=torch.int64),
        claim_t=torch.tensor(claim_t, dtype=torch.float32),
        boxes=boxes,
        box_count=counts,
        time_rollout=torch.tensor(time_rollout, dtype=torch.int64),
        times=torch.tensor(times, dtype=torch.float32),
    )


# ---------------------------------------------------------------------------------------
# Batch front-end: the C++ op, with ``parse`` as reference and fallback
# ---------------------------------------------------------------------------------------

BACKENDS = ("auto", "native", "python")

# Loaded at import, not on first use: the module set then does not change under a running
# test (hypothesis draws constants from the loaded modules, so a late import would change
# the examples a derandomized test generates).
try:
    from visioncoach import ops as _ops  # noqa: F401  (loads _C: op schemas, kernels, fakes)
    _native_op = torch.ops.visioncoach.parse_grounding
    _native_error: str | None = None
except (ImportError, AttributeError, RuntimeError) as _exc:  # extension not built, or stale
    _native_op, _native_error = None, f"{type(_exc).__name__}: {_exc}"


def native_available() -> bool:
    """Whether ``parse_texts(backend="native")`` can run (the C++ extension has the op)."""
    return _native_op is not None


@dataclass
class ParsedBatch:
    """A batch of outputs parsed once: what every reward reads, without a ``Parsed`` per text.

    N = number of texts, C = claims, U = distinct object names as written.

    texts       the texts (offsets below index them)
    claims      the ClaimBatch (``parse_batch``)
    raw_names   [U] distinct names as written, in order of first appearance
    claim_name  [C] int64   index into ``raw_names`` of each claim's name (``Claim.obj``)
    blocks      [N, 4] int64 think start, think end, answer start, answer end: content
                offsets in code points (Python str indices) of ``texts[i]``; -1 when absent,
                so ``texts[i][b[0]:b[1]] == parse(texts[i]).think``
    n_errors    [N] int64   ``len(parse(texts[i]).errors)``; 0 exactly when well-formed
    backend     "native" or "python": which parser produced it
    """
    texts: Sequence
    claims: ClaimBatch
    raw_names: list[str]
    claim_name: torch.Tensor
    blocks: torch.Tensor
    n_errors: torch.Tensor
    backend: str

    def _spans(self, col: int) -> list[str | None]:
        return [t[a:b] if a >= 0 else None
                for t, (a, b) in zip(self.texts, self.blocks[:, col:col + 2].tolist())]

    def thinks(self) -> list[str | None]:
        """``parse(t).think`` of every text."""
        return self._spans(0)

    def answers(self) -> list[str | None]:
        """``parse(t).answer`` of every text."""
        return self._spans(2)


def _parse_python(texts: Sequence) -> ParsedBatch:
    parsed = [parse(t) for t in texts]
    raw_ids: dict[str, int] = {}
    claim_name = [raw_ids.setdefault(c.obj, len(raw_ids)) for p in parsed for c in p.claims]
    blocks = []
    for t in texts:
        spans = [_block(t, "think"), _block(t, "answer")] if isinstance(t, str) else [None, None]
        blocks.append([x for span in spans for x in (span or (-1, -1))])
    return ParsedBatch(
        texts=texts, claims=claim_batch(parsed), raw_names=list(raw_ids),
        claim_name=torch.tensor(claim_name, dtype=torch.int64),
        blocks=torch.tensor(blocks, dtype=torch.int64).reshape(len(texts), 4),
        n_errors=torch.tensor([len(p.errors) for p in parsed], dtype=torch.int64),
        backend="python")


def _parse_native(texts: Sequence[str]) -> ParsedBatch:
    (claim_rollout, claim_t, boxes, box_count, claim_name, name_spans, time_rollout, times,
     blocks, n_errors) = _native_op(texts if isinstance(texts, (list, tuple)) else list(texts))
    # Names are normalised here, once per distinct raw name, so normalize_name stays the one
    # definition (Unicode lower-casing and whitespace). Raw names are numbered by first
    # appearance, so assigning normalised ids in that order gives claim_batch's name order.
    raw_names = [texts[r][a:b] for r, a, b in name_spans.tolist()]
    name_ids: dict[str, int] = {}
    raw_to_name = torch.tensor([name_ids.setdefault(normalize_name(n), len(name_ids))
                                for n in raw_names], dtype=torch.int64)            # [U]
    claims = ClaimBatch(
        n_rollouts=len(texts), names=list(name_ids), claim_rollout=claim_rollout,
        claim_obj=raw_to_name[claim_name], claim_t=claim_t, boxes=boxes, box_count=box_count,
        time_rollout=time_rollout, times=times)
    # The op counts every malformation; Parsed.errors keeps _MAX_ERRORS messages plus one
    # "... and k more" line.
    n_errors = torch.where(n_errors > _MAX_ERRORS, _MAX_ERRORS + 1, n_errors)
    return ParsedBatch(texts=texts, claims=claims, raw_names=raw_names, claim_name=claim_name,
                       blocks=blocks, n_errors=n_errors, backend="native")


def parse_texts(texts: Sequence, backend: str = "auto") -> ParsedBatch:
    """Parse a batch of outputs (see ParsedBatch); equal to ``parse`` on each text.

    backend: "native" runs the C++ op (every text must be a str; raises if the extension is
    missing), "python" runs ``parse`` per text, "auto" is native when available, else (and
    for input the op cannot take: non-str items, lone surrogates) python.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "python":
        return _parse_python(texts)
    if backend == "native":
        if _native_op is None:
            raise RuntimeError(f"the native grounding parser is not available ({_native_error})")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text {i} must be a str, got {type(t).__name__}")
        return _parse_native(texts)
    if _native_op is None or not all(isinstance(t, str) for t in texts):
        return _parse_python(texts)
    try:
        return _parse_native(texts)
    except RuntimeError:
        # The only input the op refuses is a str that is not valid Unicode (lone surrogates
        # do not encode to UTF-8); ``parse`` takes any str.
        return _parse_python(texts)


def parse_batch(texts: Sequence, backend: str = "auto") -> ClaimBatch:
    """Parse every text and pack the claims and times (see ClaimBatch for the layout)."""
    return parse_texts(texts, backend).claims
