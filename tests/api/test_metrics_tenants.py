"""Per-tenant queue depth in /metrics on the real server: `prefixserve_tenant_queue_depth{tenant}` counts each
tenant's waiting requests (tenants named, as --metrics-tenant-labels asks), its labels bounded by
--metrics-max-tenants (later tenants summed as ':other'), and a
tenant once shown stays at 0 when nothing of its waits. With --scheduler fifo (one queue, tenants not kept apart)
it has no values rather than wrong ones."""
from __future__ import annotations

import re
import signal
import threading
from pathlib import Path
from typing import Callable

import httpx
import pytest

from tests.api.conftest import Server, start_server, stop_server
from tests.api.test_concurrency import _metric, _wait_for
from tests.api.test_tenants import make_key
from tests.tiny import save_tiny_model_dir

CONTEXT = 2048
HOLD = {"inputs": "x", "parameters": {"max_new_tokens": CONTEXT - 8, "ignore_eos_token": True}}  # a few seconds
SHORT = {"inputs": "y", "parameters": {"max_new_tokens": 2}}


def _tenant_depths(text: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'^prefixserve_tenant_queue_depth\{tenant="([^"]*)"\} (\S+)$', text, re.M)}


@pytest.fixture(scope="module")
def long_model(tmp_path_factory) -> Path:
    """The tiny GPT-2 with a longer context, so one request holds the row long enough to queue others."""
    return save_tiny_model_dir("gpt2", tmp_path_factory.mktemp("model") / "tiny-gpt2-long", n_positions=CONTEXT)


def _server_with_tenants(model_dir: Path, tmp_path: Path, tenants: str,
                         **settings) -> tuple[Server, dict[str, dict[str, str]]]:
    """A server with batch size 1 and a key for each tenant (one letter each): (server, {tenant: headers})."""
    keys = {t: make_key(str(tmp_path / "store"), t) for t in tenants}
    s = start_server(model_dir, tmp_path, max_batch_size=1, max_seq_len=CONTEXT, metrics_tenant_labels="true",
                     **settings)
    return s, {t: {"Authorization": f"Bearer {k}"} for t, k in keys.items()}


def _while_queued(s: Server, holder: dict[str, str], queued: list[dict[str, str]],
                  look: Callable[[httpx.Client], None]) -> None:
    """Hold the only row with a long stream (`holder`'s), queue a short request per entry of `queued` in that
    order (each one waits in the queue before the next is sent, so tenants are first seen in list order), call
    `look` once they all wait, then let everything finish (all 200)."""
    holding = threading.Event()

    def hold() -> None:
        with httpx.stream("POST", f"{s.url}/generate_stream", json=HOLD, headers=holder, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    holding.set()

    codes: list[int] = []

    def send(headers: dict[str, str]) -> None:
        codes.append(httpx.post(f"{s.url}/generate", json=SHORT, headers=headers, timeout=60).status_code)

    threads = [threading.Thread(target=hold)]
    with s.client() as http:
        threads[0].start()
        assert holding.wait(30)
        for n, headers in enumerate(queued, 1):
            threads.append(threading.Thread(target=send, args=(headers,)))
            threads[-1].start()
            assert _wait_for(lambda: _metric(http, "prefixserve_queue_depth") == n, timeout=20)
        look(http)
    for t in threads:
        t.join(60)
    assert codes == [200] * len(queued)


def test_queue_depth_per_tenant_bounded(long_model, tmp_path):
    s, auth = _server_with_tenants(long_model, tmp_path, "abcd", metrics_max_tenants=2)
    seen: list[dict[str, float]] = []
    try:
        with s.client() as http:
            assert http.post("/generate", json=SHORT, headers=auth["a"]).status_code == 200  # 'a' is named first
            assert _tenant_depths(http.get("/metrics").text) == {}  # nothing has waited yet
            _while_queued(s, auth["a"], [auth[t] for t in "bbcdd"],
                          lambda c: seen.append(_tenant_depths(c.get("/metrics").text)))
            assert seen == [{"b": 2, ":other": 3}]  # a and b named; c and d past the bound, summed
            assert _tenant_depths(http.get("/metrics").text) == {"b": 0, ":other": 0}  # shown before: kept at 0
    finally:
        assert stop_server(s) in (0, -signal.SIGTERM), s.log.read_text()[-4000:]


def test_tenant_queue_depth_empty_under_fifo(long_model, tmp_path):
    s, auth = _server_with_tenants(long_model, tmp_path, "ab", scheduler="fifo")
    seen: list[str] = []
    try:
        _while_queued(s, auth["a"], [auth["b"]] * 2, lambda c: seen.append(c.get("/metrics").text))
        assert "# TYPE prefixserve_tenant_queue_depth gauge" in seen[0] and _tenant_depths(seen[0]) == {}
    finally:
        assert stop_server(s) in (0, -signal.SIGTERM), s.log.read_text()[-4000:]
