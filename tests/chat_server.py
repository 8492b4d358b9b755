"""An OpenAI-compatible chat-completions server on 127.0.0.1 for tests (the selector's
HTTP reasoner, the V-STAR judge): scripted replies, recorded requests, in-flight counts."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ChatServer:
    """Chat-completions server. ``script``: one action per request, in order (then
    ``default``): ("ok", content) | ("sleep", seconds, content) | ("body", raw) | ("status", code)."""

    def __init__(self, default=("ok", "")):
        self.script, self.default = [], default
        self.requests, self.lock = [], threading.Lock()
        self.in_flight = self.max_in_flight = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append((self.path, dict(self.headers), body))
                    action = outer.script.pop(0) if outer.script else outer.default
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    if action[0] == "sleep":
                        time.sleep(action[1])
                        action = ("ok", action[2])
                    if action[0] == "status":
                        self.send_error(action[1])
                        return
                    raw = action[1].encode() if action[0] == "body" else json.dumps(
                        {"choices": [{"message": {"role": "assistant", "content": action[1]}}]}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except (BrokenPipeError, ConnectionResetError):
                    pass                       # the client gave up (timeout)
                finally:
                    with outer.lock:
                        outer.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
