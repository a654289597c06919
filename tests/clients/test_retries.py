"""Retries, Retry-After, timeouts and the API key header, against a scripted stdlib server."""
from __future__ import annotations

import json
import time

import httpx
import pytest

from prefixserve_client import (AsyncClient, Client, ConflictError, ConnectionFailed, RateLimitError,
                                RetryPolicy, UnavailableError)
from tests.api.conftest import free_port
from tests.clients.fake_server import json_answer, sse_answer

OK = {"generated_text": " done"}
BUSY = {"error": "queue full", "error_type": "overloaded"}
FAST = RetryPolicy(max_attempts=4, backoff=0.01, max_backoff=0.05, max_wait=2)


def test_503_with_retry_after_then_200(fake):
    fake.script = [json_answer(503, BUSY, Retry_After="0.2"), json_answer(503, BUSY, Retry_After="0.2"),
                   json_answer(200, OK, **{"X-Prefix-Version": "abc"})]
    with Client(fake.url, retry=FAST) as c:
        t0 = time.monotonic()
        r = c.generate("hi", "t")
        elapsed = time.monotonic() - t0
    assert r.generated_text == " done" and r.version == "abc"
    assert len(fake.seen) == 3 and elapsed >= 0.4  # both Retry-After waits honoured
    assert all(s.path == "/generate?task=t" for s in fake.seen)


def test_429_is_retried_and_attempts_are_bounded(fake):
    fake.script = [json_answer(429, {"error": "slow down", "error_type": "rate_limited"}, Retry_After="0")] * 9
    with Client(fake.url, retry=FAST) as c, pytest.raises(RateLimitError) as e:
        c.generate("hi")
    assert len(fake.seen) == 4 and e.value.message == "slow down" and e.value.retry_after == 0


def test_retry_after_beyond_max_wait_is_raised_at_once(fake):
    fake.script = [json_answer(503, BUSY, Retry_After="120")]
    with Client(fake.url, retry=FAST) as c, pytest.raises(UnavailableError) as e:
        c.generate("hi")
    assert len(fake.seen) == 1 and e.value.retry_after == 120 and e.value.error_type == "overloaded"


def test_other_errors_are_not_retried(fake):
    fake.script = [json_answer(422, {"error": "parameters.top_p: bad", "error_type": "validation"})]
    with Client(fake.url, retry=FAST) as c, pytest.raises(Exception, match="top_p"):
        c.generate("hi")
    assert len(fake.seen) == 1


def test_upload_retry_resends_the_files(fake, tmp_path):
    fake.script = [json_answer(503, BUSY, Retry_After="0"),
                   json_answer(201, {"task": "x", "version": "v1", "manifest": {"prefix_length": 4}})]
    files = {"manifest.json": b'{"m": 1}', "prefix.safetensors": b"TENSORBYTES"}
    with Client(fake.url, retry=FAST) as c:
        assert c.upload("x", files).version == "v1"
    assert [s.method for s in fake.seen] == ["PUT", "PUT"]
    assert all(b"TENSORBYTES" in s.body and b'name="files"' in s.body for s in fake.seen)


def test_stream_is_retried_before_it_starts(fake):
    tok = {"id": 1, "text": " a", "logprob": -0.1, "special": False}
    last = {"index": 2, "token": {**tok, "id": 2, "text": " b"}, "generated_text": " a b",
            "details": {"finish_reason": "length", "generated_tokens": 2, "prompt_tokens": 1, "seed": None}}
    fake.script = [json_answer(503, BUSY, Retry_After="0"), sse_answer([{"index": 1, "token": tok}, last])]
    with Client(fake.url, retry=FAST) as c:
        stream = c.stream("hi", "t", max_new_tokens=2)
        assert [e.token.text for e in stream] == [" a", " b"]
    assert stream.response.generated_text == " a b" and len(stream.response.details.tokens) == 2
    assert len(fake.seen) == 2


def test_stream_error_event_raises(fake):
    fake.script = [sse_answer([{"error": "engine stopped", "error_type": "unavailable"}])]
    with Client(fake.url, retry=FAST) as c, pytest.raises(UnavailableError, match="engine stopped"):
        list(c.stream("hi"))


def test_refused_connection_is_retried_then_raised():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with Client(url, retry=RetryPolicy(max_attempts=3, backoff=0.01)) as c, pytest.raises(ConnectionFailed):
        c.health()


def test_read_timeout_is_not_retried(fake):
    fake.script = [json_answer(200, OK)]
    slow = httpx.MockTransport(lambda request: (_ for _ in ()).throw(httpx.ReadTimeout("slow", request=request)))
    with Client(fake.url, retry=FAST, transport=slow) as c, pytest.raises(ConnectionFailed, match="ReadTimeout"):
        c.generate("hi")


def test_api_key_is_sent_as_bearer(fake):
    fake.script = [json_answer(200, {"status": "ok"})]
    with Client(fake.url, api_key="sk-test") as c:
        c.health()
    assert fake.seen[0].headers.get("Authorization") == "Bearer sk-test"


async def test_async_retries_and_api_key(fake):
    fake.script = [json_answer(503, BUSY, Retry_After="0.1"), json_answer(429, BUSY, Retry_After="0"),
                   json_answer(200, OK)]
    async with AsyncClient(fake.url, api_key="k", retry=FAST) as c:
        t0 = time.monotonic()
        assert (await c.generate("hi")).generated_text == " done"
        assert time.monotonic() - t0 >= 0.1
    assert len(fake.seen) == 3 and fake.seen[-1].headers.get("Authorization") == "Bearer k"
    fake.script = [json_answer(503, BUSY, Retry_After="0")] * 5
    async with AsyncClient(fake.url, retry=RetryPolicy(max_attempts=2, backoff=0.01)) as c:
        with pytest.raises(UnavailableError):
            await c.generate("hi")


def test_versions_rollback_and_if_match_requests(fake):
    """The request shapes for issue 4's routes (the real server is tested in test_client_live when it has them)."""
    v1, v2 = "a" * 64, "b" * 64
    fake.script = [json_answer(200, {"task": "t", "versions": [{"version": v1, "created": 1.5, "current": False},
                                                               {"version": v2, "created": 2.5, "current": True}]}),
                   json_answer(200, {"task": "t", "version": v1, "manifest": {}}),
                   json_answer(412, {"error": "t is at another version", "error_type": "conflict"})]
    with Client(fake.url, retry=FAST) as c:
        versions = c.versions("t")
        assert [(v.version, v.current, v.created) for v in versions] == [(v1, False, 1.5), (v2, True, 2.5)]
        assert c.rollback("t", v1, expected_version=v2).version == v1
        with pytest.raises(ConflictError, match="another version"):
            c.delete("t", expected_version=v2)
    get, post, delete = fake.seen
    assert (get.method, get.path) == ("GET", "/prefixes/t/versions")
    assert (post.method, post.path, json.loads(post.body)) == ("POST", "/prefixes/t/rollback", {"version": v1})
    assert post.headers["If-Match"] == delete.headers["If-Match"] == f'"{v2}"'
