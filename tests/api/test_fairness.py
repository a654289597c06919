"""Issue 7's flood on the real server, as an ordering property (the latency numbers are bench/fairness_bench.py's):
one tenant floods past its concurrency quota (429s) with a deep queue, another sends one request at a time, and
the light tenant's requests finish before most of the flood that was queued ahead of them."""
from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.api.conftest import Server, start_server, stop_server

ROOT = Path(__file__).resolve().parents[2]
FLOOD, CAP = 60, 40


def cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "prefixserve.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def two_tenants(model_dir, tmp_path_factory) -> Iterator[tuple[Server, dict[str, str]]]:
    """A server with two tenants' keys; the flooder may have CAP requests in flight."""
    work = tmp_path_factory.mktemp("fair")
    keys = {t: cli("keys", "create", "--tenant", t, "--store", str(work / "store")).strip().splitlines()[-1]
            for t in ("flood", "light")}
    cli("tenants", "set", "flood", "--limit", f"concurrent_requests={CAP}", "--store", str(work / "store"))
    s = start_server(model_dir, work, max_batch_size=2, max_seq_len=128, max_queue=256)
    yield s, keys
    assert stop_server(s) in (0, -signal.SIGTERM), s.log.read_text()[-4000:]


async def _queue_depth(c: httpx.AsyncClient) -> float:
    for line in (await c.get("/metrics")).text.splitlines():
        if line.startswith("prefixserve_queue_depth "):
            return float(line.split()[1])
    raise AssertionError("no prefixserve_queue_depth in /metrics")


async def _scenario(url: str, keys: dict[str, str]) -> tuple[list[str], list[httpx.Response]]:
    done: list[str] = []  # completion order: "flood" / "light"
    flood_body = {"inputs": "flood " * 4, "parameters": {"max_new_tokens": 48, "ignore_eos_token": True}}
    light_body = {"inputs": "light", "parameters": {"max_new_tokens": 8, "ignore_eos_token": True}}
    limits = httpx.Limits(max_connections=FLOOD + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as c:
        async def flood_one() -> httpx.Response:
            r = await c.post("/generate", json=flood_body, headers={"X-API-Key": keys["flood"]})
            if r.status_code == 200:
                done.append("flood")
            return r

        floods = [asyncio.ensure_future(flood_one()) for _ in range(FLOOD)]
        for _ in range(600):  # the flooder's admitted requests are queued behind 2 rows
            if await _queue_depth(c) >= CAP - 2 - 5:
                break
            await asyncio.sleep(0.05)
        for _ in range(3):  # one at a time
            r = await c.post("/generate", json=light_body, headers={"Authorization": f"Bearer {keys['light']}"})
            assert r.status_code == 200, r.text
            done.append("light")
        finished = [f.result() for f in floods if f.done()]
        for f in floods:  # the rest of the flood is not needed: disconnecting cancels it
            f.cancel()
        await asyncio.gather(*floods, return_exceptions=True)
    return done, finished


def test_light_tenant_served_before_the_queued_flood(two_tenants):
    server, keys = two_tenants
    done, finished = asyncio.run(_scenario(server.url, keys))
    refused = [r for r in finished if r.status_code == 429]
    assert refused, [r.status_code for r in finished]  # past its concurrent_requests quota
    assert all(r.headers.get("Retry-After") and "concurrent_requests" in r.json()["error"] for r in refused)
    assert len(refused) <= FLOOD - CAP + 5  # (a flood request that finished early frees its slot)
    last_light = [i for i, who in enumerate(done) if who == "light"][-1]
    before_light = done[:last_light].count("flood")
    # FIFO would finish all ~38 queued flood requests first (tests/engine/test_scheduler.py shows the control)
    assert before_light <= 12, done
    with httpx.Client(base_url=server.url, timeout=60) as c:  # the cancelled flood freed its rows
        for _ in range(200):
            text = c.get("/metrics").text
            if "prefixserve_batch_size 0.0" in text and "prefixserve_queue_depth 0.0" in text:
                break
            time.sleep(0.1)
        assert "prefixserve_batch_size 0.0" in text and "prefixserve_queue_depth 0.0" in text
