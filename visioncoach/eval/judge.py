"""Answer judges for free-form answers (V-STAR's "what" question).

V-STAR grades an answer against the reference with an LLM on a 0-3 scale (0 unrelated,
1 mostly wrong, 2 mostly right, 3 fully right) and counts a score >= 2 as correct. A judge
here is anything with ``score(question, reference, candidate) -> Verdict`` (``Verdict.score``
None: no usable score, ``Verdict.error`` says why; the caller counts it as 0 and reports it)
and ``workers``, how many ``score`` calls may run at once. Three are provided:

* ``ExactMatchJudge`` (offline fallback, the default): 3 when the normalised answers are
  equal, else 0. Normalising lower-cases, drops punctuation and the articles a/an/the and
  collapses whitespace (the SQuAD answer normalisation). Far stricter than an LLM judge on
  free-form answers; it exists so that evaluation runs with no model and no network.
* ``HttpJudge``: an OpenAI-compatible ``/chat/completions`` endpoint (vLLM, TGI, llama.cpp
  server, OpenAI), through ``urllib`` with a per-request timeout and retries with
  exponential backoff on connection errors, timeouts, 429 and 5xx.
* ``LocalModelJudge``: a local Qwen2.5-VL checkpoint (or any checkpoint our policy builder
  loads) through our own greedy decoding (``visioncoach.rollout.generate_group``), text only.

The reply's score is the first standalone digit 0-3 in it ("2", "Score: 2" -> 2).
"""

from __future__ import annotations

import re
import string
from typing import NamedTuple, Protocol

from visioncoach.utils.chat import ChatClient, ChatUnavailable

__all__ = ["CORRECT_SCORE", "MAX_SCORE", "JUDGE_SYSTEM_PROMPT", "Verdict", "Judge", "ExactMatchJudge",
           "HttpJudge", "LocalModelJudge", "normalize_answer", "parse_score", "judge_messages",
           "build_judge", "JUDGES"]

MAX_SCORE = 3
CORRECT_SCORE = 2   # V-STAR: a judged score >= 2 is a correct answer

JUDGE_SYSTEM_PROMPT = (
    "You grade a candidate answer to a question about a video against the ground-truth answer. "
    "Judge only whether they mean the same thing; ignore grammar and wording. Reply with one "
    "integer: 0 = no similarity (entirely wrong), 1 = low similarity (largely wrong), "
    "2 = high similarity (largely correct), 3 = same meaning (entirely correct)."
)

_SCORE = re.compile(r"(?<![\d.])([0-3])(?!\d|\.\d)")   # not part of 10, 1.5, 2.0
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def parse_score(reply: str) -> int | None:
    """The first standalone digit 0-3 of a judge's reply, or None."""
    m = _SCORE.search(reply or "")
    return int(m.group(1)) if m else None


def judge_messages(question: str, reference: str, candidate: str) -> list[dict]:
    return [{"role": "system", "content": JUDGE_SYSTEM_PROMPT},
            {"role": "user", "content": f"Question: {question}\nGround-truth answer: {reference}\n"
                                        f"Candidate answer: {candidate}\nScore (0-3):"}]


class Verdict(NamedTuple):
    score: int | None          # 0-3, None when the judge gave no usable score
    error: str | None = None   # why there is no score


class Judge(Protocol):
    name: str
    workers: int    # score calls that may run concurrently

    def score(self, question: str, reference: str, candidate: str) -> Verdict: ...


def _verdict(reply: str) -> Verdict:
    s = parse_score(reply)
    return Verdict(s, None if s is not None else f"no 0-3 score in the reply {reply[:60]!r}")


class ExactMatchJudge:
    """3 if the normalised candidate equals the normalised reference (non-empty), else 0."""
    name, workers = "exact", 1

    def score(self, question: str, reference: str, candidate: str) -> Verdict:
        ref, cand = normalize_answer(reference), normalize_answer(candidate)
        return Verdict(MAX_SCORE if ref and ref == cand else 0)


class HttpJudge:
    """An OpenAI-compatible chat-completions endpoint.

    url: the API base (``http://host:8000/v1``) or the full ``.../chat/completions`` URL.
    api_key: sent as ``Authorization: Bearer``; None sends none (local servers).
    timeout: seconds per request; retries: extra attempts after a failure that may pass
    (connection error, timeout, HTTP 408, 429 or 5xx), waiting backoff * 2^k seconds before
    attempt k + 1. Other HTTP errors (400, 401, 404) fail at once: retrying cannot fix them
    (``visioncoach.utils.chat.ChatClient``).
    workers: requests in flight at once (V-STAR has ~2,100 answers; one at a time is slow).
    """
    name = "http"

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 3, backoff: float = 1.0, max_tokens: int = 16, workers: int = 8):
        if workers < 1:
            raise ValueError(f"need --judge-workers >= 1, got {workers}")
        self.client = ChatClient(url, model, api_key=api_key, timeout=timeout, retries=retries,
                                 backoff=backoff, max_concurrency=workers, what="--judge-url")
        self.max_tokens = max_tokens
        self.workers = workers

    def score(self, question: str, reference: str, candidate: str) -> Verdict:
        try:
            content = self.client.complete(judge_messages(question, reference, candidate),
                                           temperature=0, max_tokens=self.max_tokens)
        except (ChatUnavailable, ValueError) as exc:
            return Verdict(None, str(exc))
        return _verdict(content)


class LocalModelJudge:
    """A local checkpoint (``from_pretrained`` folder) judging by greedy decoding, text only."""
    name, workers = "local", 1

    def __init__(self, model_path: str, device: str = "auto", max_new_tokens: int = 8):
        from visioncoach.rollout.session import load_session

        self.session = load_session(model_path, device=device)
        self.max_new_tokens = max_new_tokens

    def score(self, question: str, reference: str, candidate: str) -> Verdict:
        return _verdict(self.session.generate_text(judge_messages(question, reference, candidate),
                                                   self.max_new_tokens))


JUDGES = ("exact", "http", "local")


def build_judge(kind: str, *, url: str | None = None, model: str | None = None,
                api_key: str | None = None, timeout: float = 60.0, retries: int = 3,
                workers: int = 8, device: str = "auto") -> Judge:
    """The judge for ``--judge KIND``; flags it needs but lacks are errors naming them."""
    if kind == "exact":
        return ExactMatchJudge()
    if kind == "http":
        if not url or not model:
            raise ValueError("--judge http needs --judge-url and --judge-model")
        return HttpJudge(url, model, api_key=api_key, timeout=timeout, retries=retries, workers=workers)
    if kind == "local":
        if not model:
            raise ValueError("--judge local needs --judge-model (a local checkpoint folder)")
        return LocalModelJudge(model, device=device)
    raise ValueError(f"--judge must be one of {JUDGES}, got {kind!r}")
