"""The VP-Selector's label set and the mapping of generated text to a label (appendix C.4).

The selector is a generative classifier: it writes a label string, and inference maps that
text to one of ``selector_labels()`` (the candidate pool V of section 3.3: every type of the
visual-prompt table, ``visioncoach.vp.spec``). Generated text is messy ("Darken.",
"**circle**", "I would use frame numbering", "api prompt"), so the mapping is tolerant, in
this order:

1. the text's words (lower-cased, every run of non-alphanumerics a separator) are matched
   against each label and its aliases (the table's ``aliases``), as whole words or word sequences;
   the label whose match starts earliest in the text wins;
2. each word of 4+ letters, and the whole text with separators removed, is matched with
   ``difflib.get_close_matches`` (cutoff ``FUZZY_CUTOFF``) against the label names and
   single-word aliases of 5+ letters (so "darkn" or "numpr" map, "draw" does not);
3. otherwise the text is unmappable and the label is ``FALLBACK_LABEL`` (``raw``: no visual
   prompt, the safe choice); callers count these (``LabelMapper.unmapped``).
"""

from __future__ import annotations

import difflib
import re
import threading

from visioncoach.vp.spec import RAW, vp_spec, vp_types

__all__ = ["selector_labels", "label_aliases", "FALLBACK_LABEL", "FUZZY_CUTOFF", "map_label",
           "LabelMapper"]

FALLBACK_LABEL = RAW
FUZZY_CUTOFF = 0.75
# Names shorter than this are matched exactly only ("raw" must not match "draw").
_FUZZY_MIN_LEN = 5



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


def _exact(words: list[str], labels: tuple[str, ...]) -> str | None:
    best: tuple[int, int, str] | None = None        # (start word, -alias length, label)
    for label in labels:
        for alias in (label.replace("_", " "),) + label_aliases(label):
            seq = alias.split()
            n = len(seq)
            for i in range(len(words) - n + 1):
                if words[i:i + n] == seq:
                    key = (i, -n, label)
                    if best is None or key < best:
                        best = key
                    break
    return best[2] if best else None


def _fuzzy(words: list[str], labels: tuple[str, ...]) -> str | None:
    vocab: dict[str, str] = {}
    for label in labels:
        for name in (label.replace("_", ""),) + label_aliases(label):
            if " " not in name and len(name) >= _FUZZY_MIN_LEN:
                vocab[name] = label
    for w in words + ["".join(words)]:
        if len(w) < _FUZZY_MIN_LEN - 1:
            continue
        hit = difflib.get_close_matches(w, list(vocab), n=1, cutoff=FUZZY_CUTOFF)
        if hit:
            return vocab[hit[0]]
    return None


def map_label(text: str, labels: tuple[str, ...] | None = None) -> tuple[str, bool]:
    """(label, mapped): the label ``text`` names (module docstring), and False when nothing
    matched and the fallback ``raw`` (or the last label when ``raw`` is not in ``labels``)
    was returned."""
    labels = selector_labels() if labels is None else tuple(labels)
    words = _words(text if isinstance(text, str) else "")
    label = _exact(words, labels) or _fuzzy(words, labels)
    if label is not None:
        return label, True
    return (FALLBACK_LABEL if FALLBACK_LABEL in labels else labels[-1]), False


class LabelMapper:
    """``map_label`` with a thread-safe count of unmappable texts (``unmapped``) and of all
    mapped texts (``total``)."""

    def __init__(self, labels: tuple[str, ...] | None = None):
        self.labels = selector_labels() if labels is None else tuple(labels)
        self.unmapped = 0
        self.total = 0
        self._lock = threading.Lock()

    def __call__(self, text: str) -> str:
        label, ok = map_label(text, self.labels)
        with self._lock:
            self.total += 1
            self.unmapped += 0 if ok else 1
        return label
