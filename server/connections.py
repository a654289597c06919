"""Limits on HTTP connections, below the app: uvicorn's h11 protocol with a header-read timeout and a connection
limit (uvicorn itself bounds idle keep-alive connections, `timeout_keep_alive`, and header size, h11's 16 KiB).

- **header-read timeout** (slow headers, "slowloris"): a client has `header_timeout_s` from connecting, or from the
  first byte of its next request on a kept-alive connection, to send the request line and all headers. Past it
  the server answers 408 and closes. Stock uvicorn keeps a connection that trickles its headers, or sends nothing
  at all, open forever; the request body's own time limit is `client_timeout_s` (server/api/limits.py).
- **connection limit**: a connection accepted while `max_connections` are open is answered 503 (Retry-After: 1,
  the app's JSON error shape) on its request, and closed; the open ones are untouched. uvicorn's own
  `limit_concurrency` answers in plain text and also counts the connection asking, so it is not used.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.api.errors import error_body

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionLimits:
    """The numbers the protocol enforces (from the server settings)."""

    header_timeout_s: float = 10.0
    max_connections: int = 1000


def _raw_error(status: str, message: str, error_type: str) -> bytes:
    """A whole HTTP/1.1 error response that closes the connection, for writing straight to the transport."""
    body = json.dumps(error_body(message, error_type)).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with `ConnectionLimits` (subclassed per server by `guarded_protocol`)."""

    limits = ConnectionLimits()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.head_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.limits.max_connections:  # counts this one
            logger.warning("connection from %s refused: %d open (--max-connections %d)", self.client,
                           len(self.connections) - 1, self.limits.max_connections)
            self.app = self._refuse
        self._await_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # part of a request head: its clock runs from its first byte
            self._await_head()
        elif self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        super().connection_lost(exc)

    def _await_head(self) -> None:
        if self.head_timer is None and not self.transport.is_closing():
            self.head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        logger.debug("%s: no complete request head within %g s; closed", self.client, self.limits.header_timeout_s)
        self.transport.write(_raw_error("408 Request Timeout", f"the request line and headers did not arrive "
                                        f"within {self.limits.header_timeout_s:g} s (--header-timeout-s)",
                                        "timeout"))
        self.transport.close()

    async def _refuse(self, scope: Any, receive: Any, send: Any) -> None:
        """The ASGI app of a connection over the limit: 503 to each request."""
        body = json.dumps(error_body(f"too many connections ({self.limits.max_connections} open, "
                                     "--max-connections); retry", "overloaded")).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"retry-after", b"1"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """The protocol class for uvicorn.Config(http=...) that enforces `limits`."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})
