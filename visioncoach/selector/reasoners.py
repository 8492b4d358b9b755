"""Proxy reasoners R of section 3.3 (eq. 3): pluggable back-ends that answer one request.

A reasoner is anything with a ``name`` and ``complete(request) -> str`` (``Reasoner``): it
gets a text prompt and the (visual-prompted) key frames, and returns its raw reply text.
Scoring the reply is the caller's job (``visioncoach.selector.scoring``): a malformed reply is
a wrong answer, never an exception. ``complete`` raises ``ReasonerUnavailable`` only when no
reply could be obtained at all (connection refused, every retry timed out, HTTP 4xx); the
build then leaves that sample out of its output, so a later run retries it.

Back-ends:

* ``HTTPReasoner``: an OpenAI-compatible ``POST {base_url}/chat/completions`` endpoint
  (GPT-4o, Gemini's and most servers' OpenAI-compatible APIs, vLLM, SGLang, ...), standard
  library only (urllib, ``visioncoach.utils.chat``). Frames go as PNG ``data:`` URLs.
  Per-request timeout, retries with exponential backoff (or the server's ``Retry-After``)
  on timeouts, connection errors, 408, 429 and 5xx; a semaphore caps requests in flight
  (``max_concurrency``) however many threads call it. The API key is read from the
  environment variable the user names, never from a flag.
* ``LocalVLMReasoner``: a local transformers Qwen2.5-VL checkpoint (or the tiny random model)
  through the project's own stack: ``build_policy`` to load it, ``build_inputs`` for the
  prompt (each key frame as an image after "Frame i at T s:"), greedy ``generate_group``.
* ``reasoner_from_spec``: builds either (or any class, ``import:module:attr``) from a
  command-line spec ``KIND:key=value,key=value``.
"""

from __future__ import annotations

import base64
import importlib
import io
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from visioncoach.utils.chat import MAX_BACKOFF_S, ChatClient, ChatUnavailable, message_text

log = logging.getLogger(__name__)

__all__ = ["ReasonerRequest", "Reasoner", "ReasonerUnavailable", "HTTPReasoner",
           "LocalVLMReasoner", "reasoner_from_spec", "MAX_BACKOFF_S"]


@dataclass
class ReasonerRequest:
    """One question to a reasoner. ``images``: uint8 [H, W, 3] key frames in time order, each
    introduced by the matching ``image_labels`` text; empty for text-only requests (key-object
    extraction). ``meta`` says what the request is for (sample id, VP type, purpose); back-ends
    must not use it to answer."""
    prompt: str
    images: list[np.ndarray] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    image_labels: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Reasoner(Protocol):
    name: str

    def complete(self, request: ReasonerRequest) -> str:
        """The reasoner's reply text. Raises ``ReasonerUnavailable`` when there is no reply."""
        ...


# No reply could be obtained (after the retries): the sample is retried on a later run.
ReasonerUnavailable = ChatUnavailable


def png_data_url(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class HTTPReasoner:
    """OpenAI-compatible chat-completions reasoner (module docstring), through the project's
    one client (``visioncoach.utils.chat.ChatClient``: timeouts, retries with backoff, a cap
    on requests in flight).

    ``base_url`` is the API root (``https://api.openai.com/v1``, ``http://127.0.0.1:8000/v1``);
    ``api_key_env`` the name of the environment variable holding the key (None: no
    Authorization header, for local servers). ``retries`` is the number of retries after the
    first attempt.
    """

    def __init__(self, name: str, base_url: str, model: str, *, api_key_env: Optional[str] = None,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 1.0,
                 max_concurrency: int = 4, max_tokens: int = 1024, temperature: float = 0.0):
        self.name = name
        api_key = None
        if api_key_env:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise ValueError(f"reasoner {name!r}: environment variable {api_key_env} (api_key_env) "
                                 "is not set or empty")
        self.client = ChatClient(base_url, model, api_key=api_key, timeout=timeout, retries=retries,
                                 backoff=backoff, max_concurrency=max_concurrency, what=f"reasoner {name}")
        self.max_tokens = int(max_tokens)
        self.temperature = float(temperature)

    def payload(self, request: ReasonerRequest) -> dict:
        content: list[dict] = [{"type": "text", "text": request.prompt}]
        for i, img in enumerate(request.images):
            label = request.image_labels[i] if i < len(request.image_labels) else f"Key frame {i + 1}:"
            content.append({"type": "text", "text": label})
            content.append({"type": "image_url", "image_url": {"url": png_data_url(img)}})
        return {"messages": [{"role": "user", "content": content}],
                "temperature": self.temperature, "max_tokens": self.max_tokens}

    def complete(self, request: ReasonerRequest) -> str:
        text = self.client.post(self.payload(request))
        try:
            return message_text(json.loads(text)["choices"][0]["message"]["content"])
        except (ValueError, KeyError, IndexError, TypeError):
            # Not a chat-completions body: hand it on as the reply; scoring counts it malformed.
            return text


class LocalVLMReasoner:
    """A local transformers Qwen2.5-VL (``path``; empty = the tiny random model) run through
    ``build_policy`` / ``build_inputs`` / greedy ``generate_group`` (module docstring).
    One request at a time (a lock): a single model gains nothing from threads."""

    def __init__(self, name: str = "local", path: str = "", *, device: str = "auto",
                 dtype: str = "auto", max_new_tokens: int = 512, min_pixels: int = 3136,
                 max_pixels: int = 100352, seed: int = 0):
        import torch

        from visioncoach.config import DataConfig, ModelConfig
        from visioncoach.models.policy import build_policy

        self.name = name
        if path:
            from visioncoach.models.resolve import ModelDirError, resolve_model_dir

            # Checked here, so the error is about this reasoner's path=, not a training key
            # of the shared loader (reasoner_from_spec adds the spec).
            try:
                resolve_model_dir(path)
            except ModelDirError as exc:
                raise ValueError(f"path={path}: {exc}") from None
        dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        mcfg = ModelConfig(path=path, dtype=dtype, gradient_checkpointing=False)
        dcfg = DataConfig(min_pixels=min_pixels, max_pixels=max_pixels)
        self.model, self.processor, _ = build_policy(mcfg, dcfg, dev, seed=seed)
        self.model.eval()
        self.tokenizer = self.processor.tokenizer
        self.device = dev
        self.max_new_tokens = int(max_new_tokens)
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self._lock = threading.Lock()

    def _inputs(self, request: ReasonerRequest):
        import torch

        from visioncoach.processor import build_inputs

        if request.images:
            frames = torch.from_numpy(np.stack(request.images)).to(self.device)
            times = torch.tensor(request.times or [float(i) for i in range(len(request.images))])
            return build_inputs(frames, times, float(times.max()), request.prompt, self.tokenizer,
                                min_pixels=self.min_pixels, max_pixels=self.max_pixels,
                                system_prompt="", dtype=next(self.model.parameters()).dtype).tensors
        ids = self.tokenizer.apply_chat_template([{"role": "user", "content": request.prompt}],
                                                 tokenize=True, add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        ids = torch.tensor([ids], device=self.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def complete(self, request: ReasonerRequest) -> str:
        from visioncoach.rollout.generate import generate_group

        eos = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        with self._lock:
            group = generate_group(self.model, self._inputs(request), 1, greedy=True,
                                   max_new_tokens=self.max_new_tokens, eos_token_ids=[eos],
                                   pad_token_id=self.tokenizer.pad_token_id, logprobs=False)
        n = int(group.lengths[0])
        return self.tokenizer.decode(group.tokens[0, :n].tolist(), skip_special_tokens=True)


def _parse_value(v: str) -> Any:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def reasoner_from_spec(spec: str, defaults: Optional[dict] = None, flag: str = "--reasoner") -> Reasoner:
    """A reasoner from ``KIND:key=value,...``; any failure to build it is a ValueError naming
    ``flag`` (the option the spec came from) and the spec:

    * ``http:name=gpt4o,base_url=https://api.openai.com/v1,model=gpt-4o,api_key_env=OPENAI_API_KEY``
      (also timeout, retries, backoff, max_concurrency, max_tokens, temperature)
    * ``local:name=qwen3vl,path=/models/Qwen2.5-VL-7B-Instruct`` (also device, dtype,
      max_new_tokens, min_pixels, max_pixels; no path = the tiny random model)
    * ``import:package.module:factory,key=value`` (any callable returning a ``Reasoner``)

    ``defaults`` (e.g. the build's --timeout/--retries) fill keys the spec leaves out, for the
    http kind only.
    """
    kind, _, rest = spec.partition(":")
    target = None
    if kind == "import":
        target, _, rest = rest.partition(",")
        if ":" not in target:
            raise ValueError(f"{flag} {spec!r}: import specs are import:module:attr[,key=value...]")
    kwargs: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise ValueError(f"{flag} {spec!r}: {part!r} is not key=value")
        kwargs[key.strip()] = value.strip() if key.strip() in ("name", "base_url", "model", "path",
                                                                "api_key_env") else _parse_value(value.strip())
    try:
        if kind == "http":
            for key in ("name", "base_url", "model"):
                if key not in kwargs:
                    raise ValueError(f"http reasoners need {key}=...")
            for key, value in (defaults or {}).items():
                kwargs.setdefault(key, value)
            return HTTPReasoner(**kwargs)
        if kind == "local":
            return LocalVLMReasoner(**kwargs)
        if kind == "import":
            module, _, attr = target.partition(":")
            obj = getattr(importlib.import_module(module), attr)(**kwargs)
            if not isinstance(obj, Reasoner):
                raise ValueError(f"{target} returned {type(obj).__name__}, which has no name/complete()")
            return obj
    except Exception as exc:   # noqa: BLE001 -- whatever a back-end or factory raises, name the spec
        what = str(exc) if isinstance(exc, (TypeError, ValueError, ImportError, AttributeError)) \
            else f"{type(exc).__name__}: {exc}"
        raise ValueError(f"{flag} {spec!r}: {what}") from None
    raise ValueError(f"{flag} {spec!r}: kind must be http, local or import, got {kind!r}")


def distinct_names(reasoners: Sequence[Reasoner]) -> None:
    names = [r.name for r in reasoners]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"--reasoner: names must be distinct, repeated: {dup} (set name=...)")
