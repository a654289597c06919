"""Issue 14's reproductions over HTTP: one tenant's odd request never fails another's, and never gets a 500.

Each good request's tokens are compared with what it gives alone; the odd ones are either served (values the
sampler now handles) or refused with a 422 that names the parameter. A dying engine turns /ready to 503 and the
process exits non-zero."""
from __future__ import annotations

import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import httpx
import pytest

from tests.api.conftest import Server, start_server, stop_server
from tests.api.failing_engine_server import KILL_TOKEN

GOOD = [{"inputs": f"Request number {i} says", "parameters": {"max_new_tokens": 24 + i, "details": True}}
        for i in range(14)]
ODD = [  # (route, body, expected status, the parameter a 422 must name)
    ("/generate", {"inputs": "a", "parameters": {"max_new_tokens": 3, "temperature": 1e-300}}, 200, None),
    ("/generate", {"inputs": "a", "parameters": {"max_new_tokens": 3, "top_k": 1, "top_p": 1e-300}}, 200, None),
    ("/generate", {"inputs": "a", "parameters": {"max_new_tokens": 3, "do_sample": True,
                                                 "repetition_penalty": 1e-320}}, 422, "repetition_penalty"),
    ("/generate", {"inputs": "a", "parameters": {"max_new_tokens": 3, "repetition_penalty": 1e-320,
                                                 "details": True}}, 422, "repetition_penalty"),
    ("/generate", {"inputs": "a", "parameters": {"max_new_tokens": 3, "repetition_penalty": 1e-3,
                                                 "details": True, "top_n_tokens": 3}}, 200, None),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 3, "temperature": 1e-300}, 200, None),
]


@pytest.fixture(scope="module")
def small_batch(model_dir, tmp_path_factory) -> Iterator[Server]:
    """Batch 8: of the 14 good requests, 8 run and 6 wait when the odd ones arrive."""
    s = start_server(model_dir, tmp_path_factory.mktemp("isolation"), max_batch_size=8, max_seq_len=256)
    yield s
    stop_server(s)


def _tokens(r: httpx.Response) -> list[int]:
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


def test_odd_sampling_values_fail_no_other_request(small_batch):
    with small_batch.client() as c:
        alone = [_tokens(c.post("/generate", json=b)) for b in GOOD]
        model = c.get("/v1/models").json()["data"][0]["id"]
    odd = [(route, {**body, "model": model} if "model" in body else body, status, name)
           for route, body, status, name in ODD]
    with small_batch.client() as c, ThreadPoolExecutor(len(GOOD) + len(odd)) as pool:
        good = [pool.submit(c.post, "/generate", json=b) for b in GOOD]
        time.sleep(0.3)  # the good ones are running or queued
        bad = [pool.submit(c.post, route, json=body) for route, body, _, _ in odd]
        good_r, bad_r = [f.result() for f in good], [f.result() for f in bad]
    assert [_tokens(r) for r in good_r] == alone
    for (route, body, status, name), r in zip(odd, bad_r):
        assert r.status_code == status, (body, r.text)
        if name:
            assert name in r.text
        else:
            text = r.text
            assert "NaN" not in text and "Infinity" not in text
            lps = [t["logprob"] for t in r.json().get("details", {}).get("tokens", [])]
            assert all(math.isfinite(lp) for lp in lps)


def test_an_engine_that_dies_fails_ready_and_exits_non_zero(model_dir, tmp_path):
    s = start_server(model_dir, tmp_path, module="tests.api.failing_engine_server", max_batch_size=4)
    try:
        with s.client() as c:
            assert c.get("/ready").status_code == 200
            results: dict[str, httpx.Response] = {}

            def long_request() -> None:
                results["long"] = c.post("/generate", json={"inputs": "one long request",
                                                            "parameters": {"max_new_tokens": 400}})

            t = threading.Thread(target=long_request)
            t.start()
            time.sleep(0.5)
            # the kill token goes in through OpenAI's token-id prompt form
            killer = c.post("/v1/completions", json={"model": c.get("/v1/models").json()["data"][0]["id"],
                                                     "prompt": [KILL_TOKEN, 11, 12], "max_tokens": 3})
            t.join(60)
            for r in (killer, results["long"]):  # both failed by the engine's death: retry elsewhere
                assert r.status_code == 503 and "engine failed" in r.text, r.text
            try:  # the server is draining (503) or already closed its socket
                assert c.get("/ready").status_code == 503
            except httpx.TransportError:
                pass
        code = s.proc.wait(60)
        assert code == 70, s.log.read_text()[-3000:]
        log = s.log.read_text()
        assert "injected engine failure" in log and "exit status 70" in log
    finally:
        if s.proc.poll() is None:
            stop_server(s)
