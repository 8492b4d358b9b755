"""The OpenAI-compatible HTTP proxy reasoner against a chat-completions server on 127.0.0.1
started here: replies, the API key, timeouts and retries, malformed replies, the concurrency
cap, and the build CLI end to end."""

import base64
import io
import json
import threading

import numpy as np
import pytest

from chat_server import ChatServer
from visioncoach.data import synthetic
from visioncoach.selector import build
from visioncoach.selector.reasoners import HTTPReasoner, ReasonerRequest, ReasonerUnavailable
from visioncoach.selector.scoring import score_reply

GOOD = json.dumps({"reasoning": "<obj>red square</obj><box>[10, 10, 200, 200]</box>at<t>1.5</t>s",
                   "answer": "A"})


@pytest.fixture()
def server():
    s = ChatServer(default=("ok", GOOD))
    yield s
    s.close()


def _request(n=2):
    imgs = [np.full((8, 12, 3), 40 * (i + 1), np.uint8) for i in range(n)]
    return ReasonerRequest("Answer.", imgs, [0.5 * i for i in range(n)], [f"Key frame {i + 1}:" for i in range(n)],
                           {"id": "x", "vp_type": "raw"})


def test_reply_payload_and_api_key(server, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("TEST_SELECTOR_KEY", "sk-test")
    r = HTTPReasoner("srv", server.url, "gpt-test", api_key_env="TEST_SELECTOR_KEY", timeout=5)
    assert r.complete(_request()) == GOOD
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == "gpt-test" and body["temperature"] == 0.0
    parts = body["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["text", "text", "image_url", "text", "image_url"]
    png = base64.b64decode(parts[2]["image_url"]["url"].split(",", 1)[1])
    assert np.asarray(Image.open(io.BytesIO(png))).tolist() == _request().images[0].tolist()
    monkeypatch.delenv("TEST_SELECTOR_KEY")
    with pytest.raises(ValueError, match="TEST_SELECTOR_KEY"):
        HTTPReasoner("srv", server.url, "m", api_key_env="TEST_SELECTOR_KEY")


def test_timeout_is_retried_then_gives_up(server):
    r = HTTPReasoner("srv", server.url, "m", timeout=0.3, retries=2, backoff=0.01)
    server.script = [("sleep", 1.0, "late"), ("ok", GOOD)]
    assert r.complete(_request()) == GOOD                 # first attempt timed out, retry answered
    assert len(server.requests) == 2
    server.script = [("sleep", 1.0, "late")] * 3
    with pytest.raises(ReasonerUnavailable, match="3 attempt"):
        r.complete(_request())
    assert len(server.requests) == 5


def test_server_errors_retry_and_client_errors_do_not(server):
    r = HTTPReasoner("srv", server.url, "m", timeout=5, retries=2, backoff=0.01)
    server.script = [("status", 503), ("status", 429), ("ok", GOOD)]
    assert r.complete(_request()) == GOOD and len(server.requests) == 3
    server.script = [("status", 400)]
    with pytest.raises(ReasonerUnavailable, match="400"):
        r.complete(_request())
    assert len(server.requests) == 4                     # no retry on a client error


def test_malformed_replies_count_as_wrong(server):
    r = HTTPReasoner("srv", server.url, "m", timeout=5, retries=0)
    rec = {"id": "x", "task": "General video QA MCQ", "answer": "A", "question": "q A. x B. y"}
    for action in (("body", "<html>not json</html>"), ("body", '{"choices": []}'),
                   ("ok", "The answer is A, clearly."), ("ok", '{"reasoning": "r", "answer": 3}')):
        server.script = [action]
        s = score_reply(r.complete(_request()), rec, [1.5], [[(0.0, 0.0, 0.2, 0.2)]], ["red square"])
        assert not s.correct and s.error, action
    server.script = [("ok", GOOD)]
    assert score_reply(r.complete(_request()), rec, [1.5], [[(0.0, 0.0, 0.2, 0.2)]], ["red square"]).correct


def test_concurrency_cap(server):
    r = HTTPReasoner("srv", server.url, "m", timeout=5, max_concurrency=2)
    server.default = ("sleep", 0.2, GOOD)
    threads = [threading.Thread(target=r.complete, args=(_request(1),)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(server.requests) == 6 and server.max_in_flight == 2


def test_build_cli_with_http_reasoner(server, tmp_path, capsys):
    data = synthetic.ensure_synthetic(n=6, seed=0, cache=tmp_path / "cache")
    out = tmp_path / "labels.jsonl"
    args = ["--data", str(data), "--out", str(out), "--vp-types", "darken", "raw", "--limit", "2",
            "--reasoner", f"http:name=srv,base_url={server.url},model=m", "--timeout", "5",
            "--workers", "2", "--no-progress"]
    assert build.main(args) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 2 and len(server.requests) == 4           # 2 samples x 2 types x 1 reasoner
    assert all(set(x["scores"]) == {"darken", "raw"} and "srv" in x["scores"]["raw"] for x in lines)
    assert build.main(args) == 0                                   # resumed: the next two samples
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 4 and len(server.requests) == 8
    capsys.readouterr()
    assert build.main(args[:5] + ["api_prompt"] + args[6:]) == 2      # a usage error: exit 2, one line
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: --vp-types") and "--clip-path" in line
