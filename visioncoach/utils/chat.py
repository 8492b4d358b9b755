"""One OpenAI-compatible chat-completions client (vLLM, TGI, llama.cpp, OpenAI), used by the
VP-Selector's proxy reasoners and the V-STAR answer judge.

Requests go through ``urllib`` (no extra dependency) with a per-request timeout. Failures that
may pass (timeouts, connection errors, HTTP 408, 429 and 5xx) are retried ``retries`` times,
waiting ``backoff * 2**k`` seconds before retry k + 1 (a server's ``Retry-After`` wins), capped
at ``MAX_BACKOFF_S``; other HTTP errors (400, 401, 404) fail at once: retrying cannot fix
them. ``max_concurrency`` bounds the requests in flight from one client across threads.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["ChatClient", "ChatUnavailable", "MAX_BACKOFF_S", "message_text"]

MAX_BACKOFF_S = 60.0


class ChatUnavailable(RuntimeError):
    """No reply: a permanent HTTP error, or every attempt failed."""


def message_text(content: Any) -> str:
    """The text of a chat message's ``content`` (a string, or a list of typed parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    raise TypeError(f"message content is {type(content).__name__}, not text")


class ChatClient:
    """``url``: the API root (``http://127.0.0.1:8000/v1``) or the full ``.../chat/completions``;
    ``api_key``: sent as ``Authorization: Bearer`` (None: no header, for local servers)."""

    def __init__(self, url: str, model: str, *, api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 3, backoff: float = 1.0, max_concurrency: int = 4, what: str = "endpoint"):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{what}: the URL must start with http:// or https://, got {url!r}")
        if timeout <= 0 or retries < 0 or backoff < 0 or max_concurrency < 1:
            raise ValueError(f"{what}: need timeout > 0, retries >= 0, backoff >= 0 and max_concurrency >= 1 "
                             f"(got {timeout}, {retries}, {backoff}, {max_concurrency})")
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model, self.api_key, self.what = model, api_key, what
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self._slots = threading.BoundedSemaphore(int(max_concurrency))

    def _post(self, body: bytes) -> bytes:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with self._slots, urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return resp.read()

    def post(self, payload: dict) -> str:
        """The raw reply body of one request (``payload`` gets ``model`` filled in), retried as
        the module docstring says; raises ``ChatUnavailable``."""
        body = json.dumps({"model": self.model, **payload}).encode("utf-8")
        last = ""
        for attempt in range(self.retries + 1):
            wait = self.backoff * (2 ** attempt)
            try:
                return self._post(body).decode("utf-8", "replace")
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:300].decode("utf-8", "replace") if exc.fp else ""
                last = f"HTTP {exc.code} {exc.reason}: {detail}"
                if exc.code not in (408, 429) and exc.code < 500:
                    raise ChatUnavailable(f"{self.what}: {self.url}: {last}") from None
                retry_after = exc.headers.get("Retry-After") if exc.headers else None
                if retry_after and retry_after.strip().replace(".", "", 1).isdigit():
                    wait = float(retry_after)
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                last = f"{type(reason).__name__}: {reason}"
            if attempt < self.retries:
                wait = min(wait, MAX_BACKOFF_S)
                log.info("%s: %s; retry %d/%d in %.1fs", self.what, last, attempt + 1, self.retries, wait)
                time.sleep(wait)
        raise ChatUnavailable(f"{self.what}: {self.url}: no reply after {self.retries + 1} attempt(s) ({last})")

    def complete(self, messages: list[dict], **params) -> str:
        """The first choice's text; raises ``ChatUnavailable``, or ``ValueError`` when the
        reply is not a chat-completions body."""
        raw = self.post({"messages": messages, **params})
        try:
            return message_text(json.loads(raw)["choices"][0]["message"]["content"])
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ValueError(f"{self.what}: unexpected reply from {self.url} "
                             f"({type(exc).__name__}: {exc}): {raw[:200]!r}") from None
