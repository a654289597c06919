"""Limits every HTTP request gets, as one ASGI middleware (`RequestLimits`). The body limits apply when the route
first reads the body, so a route can refuse a request before any of it is read (the API routes authenticate first:
a request without a valid key is 401 whatever its body, server/api/auth.py); nothing parses a body unchecked:

- **body size**, before it is read into memory: a Content-Length over the cap is answered 413 at the first read,
  before any byte of the body; a chunked body is counted as it streams in and cut off with 413 as soon as it passes
  the cap. Prefix uploads (`PUT /prefixes/...`) have their own, larger cap (`max_upload_bytes`;
  server/api/prefixes.py parses them as they stream); every other body is capped by `max_body_bytes`;
- **time to send the body**: the whole body must arrive within `client_timeout_s` (408 past it), so a client that
  trickles its body cannot hold a connection and a worker forever;
- **JSON nesting**: a non-upload body is read whole and scanned for its nesting depth before anything parses it;
  deeper than `max_json_depth` is refused with 422 (a deep document costs the parser recursion, never a 500);
- **an unread body**: a response that starts before the request's body has all arrived (a 401, a 413, a route
  that reads no body) closes the connection after it, so the rest is never read;
- **a client that stops reading**: a response write that waits longer than `client_timeout_s` on the client
  (its socket buffers are full) ends the response; a stream's generation is cancelled and its rows freed;
- **a response that never starts**: one not started within `request_timeout_s` (+ `DEADLINE_GRACE_S`, so the
  engine's own per-generation deadline answers first) is answered 504.

Text that cannot be tokenised (unpaired UTF-16 surrogates, which JSON's `\\ud800` escapes can carry) is refused
by `check_text` where prompts are tokenised.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

import numpy as np
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import APIError, error_payload, validation

logger = logging.getLogger(__name__)

MULTIPART_SLACK = 64 * 1024  # room for multipart part headers and boundaries on top of max_upload_bytes (here and
# where server/api/prefixes.py parses an upload)
DEADLINE_GRACE_S = 5.0
OFF_LOOP_BYTES = 64 * 1024  # bodies from this size are scanned for their JSON depth off the event loop
_QUOTE, _BACKSLASH = ord('"'), ord("\\")


@dataclass(frozen=True)
class LimitSettings:
    """The numbers the middleware enforces (from the server settings)."""

    max_body_bytes: int = 1024 * 1024
    max_upload_bytes: int = 64 * 1024 * 1024
    max_json_depth: int = 32
    client_timeout_s: float = 30.0
    request_timeout_s: float = 300.0


@dataclass
class _Body:
    """Whether the request's body has all arrived."""

    done: bool


def _body(scope: Scope) -> _Body:
    """The state of a request's body: done at once when it declares none."""
    declared = [v for name, v in scope["headers"] if name in (b"content-length", b"transfer-encoding")]
    return _Body(done=all(v.strip() == b"0" for v in declared))


class ClientTooSlow(Exception):
    """A response write waited longer than client_timeout_s on a client that does not read."""


class _Refused(Exception):
    """A request refused before the route ran: status, message, error_type."""

    def __init__(self, status: int, message: str, error_type: str):
        super().__init__(message)
        self.status, self.message, self.error_type = status, message, error_type


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays/objects in a JSON text (strings skipped), without parsing it. It runs on the
    event loop, so it works on the positions of quotes, backslashes and brackets only (a 1 MB prompt: ~1 ms)."""
    b = np.frombuffer(body, np.uint8)
    slashes = np.flatnonzero(b == _BACKSLASH)
    quotes = np.flatnonzero(b == _QUOTE)
    if slashes.size and quotes.size:  # a quote after an odd run of backslashes is escaped
        starts = np.flatnonzero(np.diff(slashes, prepend=-2) != 1)  # where each run of backslashes begins
        run = np.arange(slashes.size) - starts[np.searchsorted(starts, np.arange(slashes.size), "right") - 1] + 1
        k = np.searchsorted(slashes, quotes - 1)  # the backslash just before each quote, if there is one
        hit = k < slashes.size
        before = np.zeros(quotes.size, np.int64)
        before[hit] = np.where(slashes[k[hit]] == quotes[hit] - 1, run[k[hit]], 0)
        quotes = quotes[before % 2 == 0]
    opening = (b == ord("[")) | (b == ord("{"))
    brackets = np.flatnonzero(opening | (b == ord("]")) | (b == ord("}")))
    outside = np.searchsorted(quotes, brackets) % 2 == 0  # an even number of quotes before: not in a string
    steps = np.where(opening[brackets[outside]], 1, -1)
    return int(np.cumsum(steps).max(initial=0))


def check_text(text: str, field: str) -> str:
    """Return `text` if it is valid Unicode; 422 naming the field and position of an unpaired surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise validation(f"{field}: unpaired UTF-16 surrogate {text[e.start]!r} at character {e.start}; "
                         "send valid Unicode") from None
    return text


def _is_upload(scope: Scope) -> bool:
    return scope["method"] == "PUT" and scope["path"].startswith("/prefixes/")


class RequestLimits:
    """ASGI middleware enforcing `LimitSettings` on every HTTP request (see the module docstring)."""

    def __init__(self, app: ASGIApp, limits: LimitSettings):
        self.app, self.limits = app, limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        upload = _is_upload(scope)
        cap = self.limits.max_upload_bytes + MULTIPART_SLACK if upload else self.limits.max_body_bytes
        deadline = time.monotonic() + self.limits.client_timeout_s
        body = _body(scope)
        if upload:  # streamed to the route, counted on the way
            receive = _counted(scope, receive, cap, deadline, body)
        else:  # small: read whole at the first read, depth checked, handed over
            receive = _checked_whole(scope, receive, cap, deadline, self.limits.max_json_depth, body)
        await self._run(scope, receive, send, body)

    async def _run(self, scope: Scope, receive: Receive, send: Send, body: _Body) -> None:
        """Run the app with bounded writes; answer 504 if it has not started its response in time."""
        started = asyncio.Event()
        timeout = self.limits.client_timeout_s

        async def bounded_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                started.set()
                if not body.done:  # answered before the body was read: do not read (or drain) the rest
                    message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            try:
                await asyncio.wait_for(send(message), timeout)
            except asyncio.TimeoutError:
                raise ClientTooSlow(f"the client read nothing for {timeout:g} s") from None

        task = asyncio.ensure_future(self.app(scope, receive, bounded_send))
        waiter = asyncio.ensure_future(started.wait())
        try:
            await asyncio.wait({task, waiter}, timeout=self.limits.request_timeout_s + DEADLINE_GRACE_S,
                               return_when=asyncio.FIRST_COMPLETED)
            if not started.is_set() and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                logger.warning("%s %s: no response within %g s", scope["method"], scope["path"],
                               self.limits.request_timeout_s)
                return await _answer(send, scope["path"], 504, f"no response within the request timeout "
                                                f"({self.limits.request_timeout_s:g} s)", "timeout")
            await task
        except ClientTooSlow as e:  # the generation under the stream was cancelled as its iterator closed
            logger.warning("%s %s: %s; response abandoned", scope["method"], scope["path"], e)
        finally:
            waiter.cancel()
            if not task.done():  # cancelled from outside (server shutdown): take the app down with us
                task.cancel()


def _check_length(scope: Scope, cap: int, upload: bool) -> None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            if not value.isdigit():
                raise _Refused(400, f"Content-Length: not a number ({value[:40]!r})", "validation")
            if int(value) > cap:
                raise _too_large(cap, upload)


def _too_large(cap: int, upload: bool) -> _Refused:
    what = (f"upload larger than the limit of {cap - MULTIPART_SLACK} bytes (--max-upload-bytes)" if upload
            else f"request body larger than the limit of {cap} bytes (--max-body-bytes)")
    return _Refused(413, what, "too_large")


async def _receive_by(receive: Receive, deadline: float) -> Message:
    try:
        return await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        raise _Refused(408, "the request body did not arrive within the client timeout "
                            "(--client-timeout-s)", "timeout") from None


async def _read_body(receive: Receive, cap: int, deadline: float) -> bytes:
    chunks, seen = [], 0
    while True:
        message = await _receive_by(receive, deadline)
        if message["type"] == "http.disconnect":
            raise _Refused(400, "the client disconnected while sending the body", "validation")
        chunk = message.get("body", b"")
        seen += len(chunk)
        if seen > cap:
            raise _too_large(cap, False)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _depth(body: bytes) -> int:
    """json_depth, on a worker thread for a long body (numpy lets go of the GIL): the event loop stays free."""
    return json_depth(body) if len(body) < OFF_LOOP_BYTES else await asyncio.to_thread(json_depth, body)


def _checked_whole(scope: Scope, receive: Receive, cap: int, deadline: float, max_depth: int,
                   state: _Body) -> Receive:
    """A receive whose first call reads the whole body, checks its length (400/413/408) and JSON depth (422) and
    gives it as one message; later calls give the client's later messages (its disconnect)."""
    read = False

    async def checked() -> Message:
        nonlocal read
        if read:
            return await receive()
        read = True
        try:
            _check_length(scope, cap, False)
            body = await _read_body(receive, cap, deadline)
            state.done = True
            if body.lstrip()[:1] in (b"{", b"[") and await _depth(body) > max_depth:
                raise _Refused(422, f"body: JSON nested deeper than {max_depth} levels", "validation")
        except _Refused as e:
            raise _http_error(e) from None
        return {"type": "http.request", "body": body, "more_body": False}

    return checked


def _counted(scope: Scope, receive: Receive, cap: int, deadline: float, state: _Body) -> Receive:
    """A receive that checks Content-Length at the first call, counts body bytes (413 past `cap`) and bounds the
    time until the body is complete (408)."""
    seen, done, started = 0, False, False

    async def counted() -> Message:
        nonlocal seen, done, started
        if done:
            return await receive()
        try:
            if not started:
                started = True
                _check_length(scope, cap, True)
            message = await _receive_by(receive, deadline)
        except _Refused as e:
            raise _http_error(e) from None
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > cap:
                raise _http_error(_too_large(cap, True))
            done = state.done = not message.get("more_body", False)
        return message

    return counted


def _http_error(refused: _Refused) -> Exception:
    """A refusal raised inside a route's body read, as the APIError the route's error handler answers with."""
    return APIError(refused.status, refused.message, refused.error_type)


async def _answer(send: Send, path: str, status: int, message: str, error_type: str) -> None:
    body = json.dumps(error_payload(path, status, message, error_type)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body, "more_body": False})
