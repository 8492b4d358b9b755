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

import json
import re
import string
import time
import urllib.error
import urllib.request
from typing import NamedTuple, Protocol

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
    (connection error, timeout, HTTP 429 or 5xx), waiting backoff * 2^k seconds before
    attempt k + 1. Other HTTP errors (400, 401, 404) fail at once: retrying cannot fix them.
    workers: requests in flight at once (V-STAR has ~2,100 answers; one at a time is slow).
    """
    name = "http"

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 3, backoff: float = 1.0, max_tokens: int = 16, workers: int = 8):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--judge-url must be an http(s) URL, got {url!r}")
        if timeout <= 0 or retries < 0 or workers < 1:
            raise ValueError(f"need --judge-timeout > 0, --judge-retries >= 0 and --judge-workers >= 1, "
                             f"got {timeout}, {retries}, {workers}")
        self.url = url if url.rstrip("/").endswith("/chat/completions") else url.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.timeout, self.retries, self.backoff, self.max_tokens = timeout, retries, backoff, max_tokens
        self.workers = workers

    def _request(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            reply = json.loads(resp.read().decode("utf-8"))
        return reply["choices"][0]["message"]["content"]

    def score(self, question: str, reference: str, candidate: str) -> Verdict:
        body = json.dumps({"model": self.model, "messages": judge_messages(question, reference, candidate),
                           "temperature": 0, "max_tokens": self.max_tokens}).encode("utf-8")
        error = None
        for attempt in range(self.retries + 1):
            try:
                content = self._request(body)
            except urllib.error.HTTPError as exc:
                error = f"HTTP {exc.code} from {self.url}"
                if exc.code != 429 and exc.code < 500:
                    return Verdict(None, error)
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                error = f"{self.url}: {getattr(exc, 'reason', exc)}"
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                return Verdict(None, f"unexpected reply from {self.url} ({type(exc).__name__}: {exc})")
            else:
                return _verdict(content)
            if attempt < self.retries:
                time.sleep(self.backoff * 2 ** attempt)
        return Verdict(None, f"{error} (after {self.retries + 1} attempts)")


class LocalModelJudge:
    """A local checkpoint (``from_pretrained`` folder) judging by greedy decoding, text only."""
    name, workers = "local", 1

    def __init__(self, model_path: str, device: str = "auto", max_new_tokens: int = 8):
        from visioncoach.predict import load_model

        self.session = load_model(model_path, device=device)
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
