"""The VP-Selector's label set and the mapping of generated text to a label (appendix C.4).

The selector is a generative classifier: it writes a label string, and inference maps that
text to one of ``selector_labels()`` (the candidate pool V of section 3.3: every type of the
visual-prompt table, ``visioncoach.vp.spec``). The instruction asks for "the name only", so
the label must BE the answer, not merely appear in it: a reply that mentions a label word
somewhere ("<obj>green circle</obj>", "I would use frame numbering", "circle, not darken")
is not a choice, and counting it as one would hide a badly trained selector behind labels it
never gave. The answer (``answer_text``) is:

1. the content of an ``<answer>...</answer>`` slot when the text has one, else the first
   non-empty line (a line that is only an "Answer:" prefix takes the next one);
2. without chat special tokens (``<|im_end|>``), surrounding punctuation, quotes and markdown
   emphasis (``**circle**``, ```darken```, "Darken.") and a leading "Answer:"-like prefix
   (``ANSWER_PREFIX``: answer, final answer, label, choice, selection, (visual) prompt,
   followed by ":", "=", "-" or "is").

That answer maps when, lower-cased with every run of non-alphanumerics a separator, it is
exactly a label or one of its aliases (the table's ``aliases``: "api prompt", "frame
numbering", "heatmap"), or, as a whole, is close to a label name or single-word alias of 5+
letters (``difflib``, cutoff ``FUZZY_CUTOFF``: typos such as "darkn", "numpr"; "draw" does
not become raw). Anything else is unmappable and gets ``FALLBACK_LABEL`` (``raw``: no visual
prompt, the safe choice); callers count these (``LabelMapper.unmapped``, and its recent
fraction ``LabelMapper.recent_unmapped``).
"""

from __future__ import annotations

import difflib
import re
import threading
from collections import deque

from visioncoach.vp.spec import RAW, vp_spec, vp_types

__all__ = ["selector_labels", "label_aliases", "FALLBACK_LABEL", "FUZZY_CUTOFF", "ANSWER_PREFIX",
           "map_label", "answer_text", "LabelMapper", "RECENT_WINDOW"]

FALLBACK_LABEL = RAW
FUZZY_CUTOFF = 0.75
# Names shorter than this are matched exactly only ("raw" must not match "draw").
_FUZZY_MIN_LEN = 5
# How many of the latest outputs ``LabelMapper.recent_unmapped`` looks at.
RECENT_WINDOW = 64
# A leading "Answer:"-like prefix, removed from the answer line.
_PREFIX = (r"(?:the\s+)?(?:final\s+|best\s+|selected\s+)?"
           r"(?:answer|label|choice|selection|(?:visual\s+)?prompt)")
ANSWER_PREFIX = re.compile(rf"^{_PREFIX}\s*(?:[:=\-]|\bis\b)\s*", re.IGNORECASE)
_PREFIX_ONLY = re.compile(_PREFIX, re.IGNORECASE)
_SLOT = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_SPECIAL = re.compile(r"<\|[^|>]*\|>")
# Punctuation, quotes, markdown emphasis / code / headings / bullets around the answer.
_EDGES = re.compile(r"^[\W_]+|[\W_]+$")


def selector_labels() -> tuple[str, ...]:
    """The labels a selector chooses among: every registered visual-prompt type, in table
    order (the paper's: api_prompt, circle, darken, numpro, raw)."""
    return vp_types()


def label_aliases(label: str) -> tuple[str, ...]:
    """Other names a model may write for ``label`` (whole words or word sequences, lower
    case); none for a label the table does not know (a selector trained elsewhere)."""
    try:
        return vp_spec(label).aliases
    except ValueError:
        return ()


_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _trim(line: str) -> str:
    return _EDGES.sub("", _SPECIAL.sub(" ", line)).strip()


def answer_text(text: str) -> str:
    """The part of a generated text that is the answer (module docstring): the ``<answer>``
    slot, else the first non-empty line, without special tokens, surrounding punctuation and
    markdown, and a leading "Answer:"-like prefix; "" when there is none."""
    if not isinstance(text, str):
        return ""
    slot = _SLOT.search(text)
    for line in [slot.group(1)] if slot else text.splitlines():
        line = _trim(line)
        if not line or _PREFIX_ONLY.fullmatch(line):
            continue              # blank, or only "Answer:": the answer is on the next line
        return _trim(ANSWER_PREFIX.sub("", line, count=1))
    return ""


def _exact(words: list[str], labels: tuple[str, ...]) -> str | None:
    """The label whose name or alias is exactly these words."""
    for label in labels:
        for alias in (label.replace("_", " "),) + label_aliases(label):
            if words == alias.split():
                return label
    return None


def _fuzzy(words: list[str], labels: tuple[str, ...]) -> str | None:
    """The label whose name or single-word alias (5+ letters) the whole answer is close to."""
    whole = "".join(words)
    if len(whole) < _FUZZY_MIN_LEN - 1:
        return None
    vocab: dict[str, str] = {}
    for label in labels:
        for name in (label.replace("_", ""),) + label_aliases(label):
            if " " not in name and len(name) >= _FUZZY_MIN_LEN:
                vocab.setdefault(name, label)
    hit = difflib.get_close_matches(whole, list(vocab), n=1, cutoff=FUZZY_CUTOFF)
    return vocab[hit[0]] if hit else None


def map_label(text: str, labels: tuple[str, ...] | None = None) -> tuple[str, bool]:
    """(label, mapped): the label ``text``'s answer is (module docstring), and False when it
    is none and the fallback ``raw`` (or the last label when ``raw`` is not in ``labels``)
    was returned."""
    labels = selector_labels() if labels is None else tuple(labels)
    words = _words(answer_text(text))
    label = (_exact(words, labels) or _fuzzy(words, labels)) if words else None
    if label is not None:
        return label, True
    return (FALLBACK_LABEL if FALLBACK_LABEL in labels else labels[-1]), False


class LabelMapper:
    """``map_label`` with thread-safe counts: unmappable texts (``unmapped``), all texts
    (``total``), and which of the latest ``window`` texts were unmappable
    (``recent_unmapped``)."""

    def __init__(self, labels: tuple[str, ...] | None = None, window: int = RECENT_WINDOW):
        self.labels = selector_labels() if labels is None else tuple(labels)
        self.unmapped = 0
        self.total = 0
        self.recent: deque[bool] = deque(maxlen=max(1, int(window)))   # True = unmapped
        self.last_unmapped: str | None = None                          # quoted in warnings
        self._lock = threading.Lock()

    def __call__(self, text: str) -> str:
        label, ok = map_label(text, self.labels)
        with self._lock:
            self.total += 1
            self.unmapped += 0 if ok else 1
            self.recent.append(not ok)
            if not ok:
                self.last_unmapped = text
        return label

    def recent_unmapped(self) -> tuple[int, int]:
        """(unmapped, texts) among the latest ``window`` texts."""
        with self._lock:
            return sum(self.recent), len(self.recent)
