"""A scripted HTTP server on the stdlib: each request takes the next queued answer (status, headers, body) and
is recorded, so tests can send 503 + Retry-After a few times and then 200."""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Answer:
    """One scripted response."""

    status: int = 200
    body: bytes = b"{}"
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})


@dataclass
class Seen:
    """One received request."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


def json_answer(status: int, obj: Any, **headers: str) -> Answer:
    """A JSON answer with extra headers (Retry_After -> Retry-After)."""
    h = {"Content-Type": "application/json", **{k.replace("_", "-"): v for k, v in headers.items()}}
    return Answer(status, json.dumps(obj).encode(), h)


def sse_answer(events: list[Any]) -> Answer:
    """A text/event-stream answer in TGI's framing."""
    body = b"".join(b"data:" + json.dumps(e).encode() + b"\n\n" for e in events)
    return Answer(200, body, {"Content-Type": "text/event-stream"})


class FakeServer:
    """ThreadingHTTPServer on 127.0.0.1:<free port>; `script` is consumed in order, then `default` answers."""

    def __init__(self) -> None:
        self.script: list[Answer] = []
        self.default = json_answer(404, {"error": "nothing scripted", "error_type": "not_found"})
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def url(self) -> str:
        """Base URL."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def _next(self, seen: Seen) -> Answer:
        with self._lock:
            self.seen.append(seen)
            return self.script.pop(0) if self.script else self.default

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                answer = fake._next(Seen(self.command, self.path, dict(self.headers), body))
                self.send_response(answer.status)
                for k, v in answer.headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def __enter__(self) -> FakeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
