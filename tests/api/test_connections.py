"""Connection limits on the real server, with raw sockets: 200 connections that trickle their headers (and one
that sends nothing) are answered 408 and closed once --header-timeout-s has passed, while a kept-alive connection
is served all along; meanwhile, with --max-connections open, one more connection gets 503 at once (not a hang);
an idle kept-alive connection is closed after --idle-timeout-s."""
from __future__ import annotations

import select
import signal
import socket
import time
from typing import Iterator

import pytest

from tests.api.conftest import Server, read_until_closed, start_server, stop_server

HEADER_TIMEOUT = 3.0
IDLE_TIMEOUT = 3.0
TRICKLERS = 200
LIMIT = TRICKLERS + 2  # the tricklers, one that sends nothing and one kept alive
GET = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


def _connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _response(s: socket.socket) -> bytes:
    """One whole response (its head and the Content-Length bytes of body after it)."""
    out = b""
    while b"\r\n\r\n" not in out or len(out) < _length(out):
        chunk = s.recv(65536)
        if not chunk:
            break
        out += chunk
    return out


def _length(response: bytes) -> int:
    head, _, _ = response.partition(b"\r\n\r\n")
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return len(head) + 4 + int(line.split(b":")[1])
    return len(head) + 4


@pytest.fixture(scope="module")
def guarded(model_dir, tmp_path_factory) -> Iterator[Server]:
    s = start_server(model_dir, tmp_path_factory.mktemp("guarded"), header_timeout_s=HEADER_TIMEOUT,
                     idle_timeout_s=IDLE_TIMEOUT, max_connections=LIMIT)
    yield s
    assert stop_server(s) in (0, -signal.SIGTERM), s.log.read_text()[-4000:]


def _get(s: socket.socket) -> bytes:
    s.sendall(GET)
    return _response(s)


def test_trickling_headers_cut_off_and_connections_past_the_limit_refused(guarded):
    alive = _connect(guarded)
    assert _get(alive).startswith(b"HTTP/1.1 200")
    socks = {_connect(guarded): b"" for _ in range(TRICKLERS)}
    silent = _connect(guarded)  # connects and sends nothing at all
    opened = time.monotonic()
    for s in socks:
        s.setblocking(False)
        s.send(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    with _connect(guarded) as extra:  # LIMIT are open: this one is refused at once, not left hanging
        extra.sendall(GET)
        refused = read_until_closed(extra, timeout=10)
    assert time.monotonic() - opened < HEADER_TIMEOUT, "refused before any trickler was cut off"
    assert refused.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in refused.lower(), refused
    assert b"--max-connections" in refused
    closed: dict[socket.socket, float] = {}
    served_meanwhile = 0
    while len(closed) < len(socks) and time.monotonic() - opened < HEADER_TIMEOUT + 15:
        for s in socks:  # one more header byte each, every 0.1 s: the head never completes
            if s not in closed:
                try:
                    s.send(b"X")
                except OSError:
                    pass
        readable, _, _ = select.select([s for s in socks if s not in closed], [], [], 0.1)
        for s in readable:
            try:
                chunk = s.recv(65536)
            except OSError:
                chunk = b""
            socks[s] += chunk
            if not chunk:
                closed[s] = time.monotonic() - opened
        served_meanwhile += _get(alive).startswith(b"HTTP/1.1 200")  # an open connection keeps being served
    assert len(closed) == TRICKLERS, f"{TRICKLERS - len(closed)} trickling connections still open"
    assert min(closed.values()) >= HEADER_TIMEOUT - 0.2, min(closed.values())  # the timeout closed them
    assert max(closed.values()) < HEADER_TIMEOUT + 10, max(closed.values())
    assert all(data.startswith(b"HTTP/1.1 408") and b"--header-timeout-s" in data for data in socks.values())
    assert served_meanwhile >= 5
    silent_reply = read_until_closed(silent, timeout=HEADER_TIMEOUT + 10)
    assert silent_reply.startswith(b"HTTP/1.1 408"), silent_reply
    with _connect(guarded) as again:  # their slots are free again
        assert _get(again).startswith(b"HTTP/1.1 200")
    for s in [alive, silent, *socks]:
        s.close()


def test_a_head_on_a_kept_alive_connection_is_timed_from_its_first_byte(guarded):
    with _connect(guarded) as s:
        assert _get(s).startswith(b"HTTP/1.1 200")
        time.sleep(IDLE_TIMEOUT * 0.6)  # idle, under the idle timeout: kept
        s.sendall(b"GET /health HTTP/1.1\r\n")  # the next head's clock starts here
        time.sleep(HEADER_TIMEOUT * 0.6)  # with the idle time before it, longer than the header timeout
        s.sendall(b"Host: x\r\n\r\n")
        assert _response(s).startswith(b"HTTP/1.1 200")


def test_idle_kept_alive_connection_closed_after_the_idle_timeout(guarded):
    with _connect(guarded) as s:
        assert _get(s).startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        assert read_until_closed(s, timeout=IDLE_TIMEOUT + 10) == b""
        waited = time.monotonic() - start
    assert IDLE_TIMEOUT - 0.5 <= waited < IDLE_TIMEOUT + 5, waited
