"""Schemathesis over the real server's own /openapi.json: every operation gets generated requests (valid and
invalid by the schema, bounded in number), with an admin key so the admin routes are reached too. No response may
be a 5xx, and the server must still be up and serving afterwards."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.api.conftest import Server, start_server, stop_server

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = 12  # per operation: the whole run stays well under a minute


@pytest.fixture(scope="module")
def fuzzed(model_dir, tmp_path_factory) -> Iterator[tuple[Server, str]]:
    """A server with auth on (an admin key made with the CLI before it starts), short contexts and deadlines."""
    work = tmp_path_factory.mktemp("fuzz")
    made = subprocess.run([sys.executable, "-m", "prefixserve.cli", "keys", "create", "--tenant", "ops", "--admin",
                           "--store", str(work / "store")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    s = start_server(model_dir, work, max_seq_len=64, max_new_tokens_default=4, max_batch_size=8,
                     request_timeout_s=20, max_upload_bytes=256 * 1024)
    yield s, key
    assert stop_server(s) in (0, -signal.SIGTERM), s.log.read_text()[-4000:]


def _operations(url: str):
    """Every operation of the server's schema (a schema error fails the test)."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")  # requests go to the same origin
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_5xx_anywhere(fuzzed, mode):
    """Schemathesis' pytest plugin does not load under pytest 9, so each operation's case strategy is driven here
    with hypothesis directly (same generator, same cases)."""
    server, key = fuzzed
    ops = _operations(server.url)
    assert len(ops) >= 15, [op.label for op in ops]
    seen: list[int] = []

    for op in ops:
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), phases=[Phase.generate])
        def fuzz(case):
            response = case.call(headers={"Authorization": f"Bearer {key}"}, timeout=60)
            seen.append(response.status_code)
            assert response.status_code < 500, (case.method, case.formatted_path, case.query, case.body,
                                                response.status_code, response.text[:500])

        try:
            fuzz()
        except Unsatisfiable:  # nothing to get wrong: no parameters or body (GET /health), so no negative cases
            assert mode == GenerationMode.NEGATIVE, op.label
        assert server.proc.poll() is None, server.log.read_text()[-4000:]
    assert len(seen) >= len(ops) and any(code < 300 for code in seen)


def test_server_still_serves_after_the_fuzz(fuzzed):
    server, key = fuzzed
    with server.client(headers={"Authorization": f"Bearer {key}"}) as c:
        assert c.get("/health").status_code == 200
        assert c.post("/generate", json={"inputs": "still here", "parameters": {"max_new_tokens": 2}}
                      ).status_code == 200
        assert 'status="500"' not in c.get("/metrics").text
    assert "Traceback" not in server.log.read_text()
