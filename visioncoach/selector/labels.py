"""The VP-Selector's label set and the mapping of generated text to a label (appendix C.4).

The selector is a generative classifier: it writes a label string, and inference maps that
text to one of ``SELECTOR_LABELS`` (the candidate pool V of section 3.3). Generated text is
messy ("Darken.", "**circle**", "I would use frame numbering", "api prompt"), so the mapping
is tolerant, in this order:

1. the text's words (lower-cased, every run of non-alphanumerics a separator) are matched
   against each label and its aliases (``LABEL_ALIASES``), as whole words or word sequences;
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

from visioncoach.config import VP_TYPES

__all__ = ["SELECTOR_LABELS", "LABEL_ALIASES", "FALLBACK_LABEL", "FUZZY_CUTOFF", "map_label",
           "LabelMapper"]

SELECTOR_LABELS: tuple[str, ...] = tuple(VP_TYPES)   # api_prompt, circle, darken, numpro, raw
FALLBACK_LABEL = "raw"
FUZZY_CUTOFF = 0.75
# Names shorter than this are matched exactly only ("raw" must not match "draw").
_FUZZY_MIN_LEN = 5

# Other names a model may use for a label (whole words or word sequences, lower case).
LABEL_ALIASES: dict[str, tuple[str, ...]] = {
    "api_prompt": ("api prompt", "apiprompt", "api", "attention", "heatmap", "heat map",
                   "attention prompt", "attention map"),
    "circle": ("circle", "circles", "red circle", "red circles", "circled"),
    "darken": ("darken", "darkened", "darkening", "dark"),
    "numpro": ("numpro", "num pro", "frame number", "frame numbers", "frame numbering",
               "numbering", "frame index", "number"),
    "raw": ("raw", "none", "no prompt", "no visual prompt", "original"),
}

_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _exact(words: list[str], labels: tuple[str, ...]) -> str | None:
    best: tuple[int, int, str] | None = None        # (start word, -alias length, label)
    for label in labels:
        for alias in (label.replace("_", " "),) + LABEL_ALIASES.get(label, ()):
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
        for name in (label.replace("_", ""),) + LABEL_ALIASES.get(label, ()):
            if " " not in name and len(name) >= _FUZZY_MIN_LEN:
                vocab[name] = label
    for w in words + ["".join(words)]:
        if len(w) < _FUZZY_MIN_LEN - 1:
            continue
        hit = difflib.get_close_matches(w, list(vocab), n=1, cutoff=FUZZY_CUTOFF)
        if hit:
            return vocab[hit[0]]
    return None


def map_label(text: str, labels: tuple[str, ...] = SELECTOR_LABELS) -> tuple[str, bool]:
    """(label, mapped): the label ``text`` names (module docstring), and False when nothing
    matched and the fallback ``raw`` (or the last label when ``raw`` is not in ``labels``)
    was returned."""
    labels = tuple(labels)
    words = _words(text if isinstance(text, str) else "")
    label = _exact(words, labels) or _fuzzy(words, labels)
    if label is not None:
        return label, True
    return (FALLBACK_LABEL if FALLBACK_LABEL in labels else labels[-1]), False


class LabelMapper:
    """``map_label`` with a thread-safe count of unmappable texts (``unmapped``) and of all
    mapped texts (``total``)."""

    def __init__(self, labels: tuple[str, ...] = SELECTOR_LABELS):
        self.labels = tuple(labels)
        self.unmapped = 0
        self.total = 0
        self._lock = threading.Lock()

    def __call__(self, text: str) -> str:
        label, ok = map_label(text, self.labels)
        with self._lock:
            self.total += 1
            self.unmapped += 0 if ok else 1
        return label
