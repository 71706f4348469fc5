"""A scripted OpenAI-compatible judge server on 127.0.0.1: a test fixture (the judge HTTP client and the reward pool
are tested against it).

The handler gets the decoded request body and returns (status, content, delay_s): with status 200 a str
content is wrapped as an OpenAI chat completion, bytes are sent as they are (a malformed response); any
other status is sent as an error. The server answers on a random free port and stops with stop()."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Handler = Callable[[dict], tuple[int, str | bytes, float]]

VALID_JUDGE_REPLY = '{"audio_grounding_score": 1.0, "visual_id_score": 0.5, "location_acc_score": 0.25, "caption_corr_score": 0.25}'  # mean 0.5


def always_valid(body: dict) -> tuple[int, str, float]:
    return 200, VALID_JUDGE_REPLY, 0.0


class StubJudgeServer:
    def __init__(self, handler: Handler = always_valid):
        self.handler = handler
        self.requests = 0
        self.authorizations: list[str | None] = []  # the Authorization header of each request
        self._lock = threading.Lock()
        stub = self

        class _Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                with stub._lock:
                    stub.requests += 1
                    stub.authorizations.append(self.headers.get("Authorization"))
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, b'{"error": "not found"}')
                status, content, delay = stub.handler(body)
                if delay:
                    time.sleep(delay)
                if status == 200 and isinstance(content, str):
                    reply = {
                        "id": "stub",
                        "object": "chat.completion",
                        "model": body.get("model", "stub"),
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
                    }
                    content = json.dumps(reply)
                self._send(status, content if isinstance(content, bytes) else content.encode())

            def _send(self, status: int, payload: bytes):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): nothing to answer

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.request_queue_size = 128
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> StubJudgeServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> StubJudgeServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
