"""Clients that go away mid-generation on the real server: their rows are freed and the server logs nothing
spurious about it (no asyncio 'exception was never retrieved' for the abandoned work)."""
from __future__ import annotations

import time

import httpx
import pytest

from tests.api.test_concurrency import _metric, _metric_labelled, _wait_for

LONG = {"max_new_tokens": 450, "ignore_eos_token": True}


def _cancelled(http: httpx.Client) -> float:
    return _metric_labelled(http, "prefixserve_engine_finished_total", 'reason="cancelled"')


def test_disconnects_log_nothing_spurious(http, server):
    start = len(server.log.read_bytes())
    for path, body in (("/generate", {"inputs": "x", "parameters": LONG}),
                       ("/v1/completions", {"model": "tiny-gpt2", "prompt": "x", "max_tokens": 450, "n": 2})):
        before = _cancelled(http)
        with pytest.raises(httpx.TimeoutException):  # the client gives up while the generation runs
            httpx.post(f"{server.url}{path}", json=body, timeout=0.5)
        assert _wait_for(lambda: _cancelled(http) > before)
    for path, body in (("/generate_stream", {"inputs": "x", "parameters": LONG}),
                       ("/v1/completions", {"model": "tiny-gpt2", "prompt": "x", "max_tokens": 450, "n": 2, "stream": True})):
        before = _cancelled(http)
        with httpx.stream("POST", f"{server.url}{path}", json=body, timeout=30) as r:  # leaves after one event
            assert next(line for line in r.iter_lines() if line.startswith("data:"))
        assert _wait_for(lambda: _cancelled(http) > before)
    assert _wait_for(lambda: _metric(http, "prefixserve_batch_size") == 0)
    time.sleep(1)  # what asyncio logs about a dropped future, it logs when the future is collected
    assert http.post("/generate", json={"inputs": "y", "parameters": {"max_new_tokens": 2}}).status_code == 200
    logged = server.log.read_bytes()[start:].decode(errors="replace")
    assert "never retrieved" not in logged and "Traceback" not in logged, logged[-4000:]
