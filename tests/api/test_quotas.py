"""Per-tenant quotas on two real replicas sharing a Redis the test owns: rates, tokens and concurrency are counted
in Redis (429 + Retry-After whichever replica is asked), size limits are 4xx naming the limit, storage quotas
refuse an upload and leave the store as it was, an admin's override takes effect at once."""
from __future__ import annotations

import re
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import httpx
import pytest
import redis

from tests.api.conftest import Server, error_of, native_files, peft_adapter, start_server, stop_server, upload
from tests.api.test_tenants import make_key
from tests.prefix_store.conftest import RedisServer

DEFAULT_MAX_NEW = 40  # the servers' --quota-max-new-tokens


@dataclass
class Cluster:
    redis: RedisServer
    prefix: str  # the store's key prefix in that Redis
    a: Server
    b: Server
    admin: str
    base_model: dict

    def tenant(self, **limits) -> tuple[httpx.Client, httpx.Client]:
        """A fresh tenant with these limit overrides: a client on each replica (`.tenant` names it)."""
        name = f"t{uuid.uuid4().hex[:8]}"
        with self.a.client(headers={"Authorization": f"Bearer {self.admin}"}) as ops:
            key = ops.post("/admin/keys", json={"tenant": name}).json()["key"]
            r = ops.patch(f"/admin/tenants/{name}", json={"limits": limits})
            assert r.status_code == 200, r.text
        headers = {"Authorization": f"Bearer {key}"}
        clients = self.a.client(headers=headers), self.b.client(headers=headers)
        for c in clients:
            c.tenant, c.api_key = name, key
        return clients


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("quotas")
    redis = RedisServer().start()
    prefix = f"psquota-{uuid.uuid4().hex[:8]}"
    url = f"{redis.url}?prefix={prefix}"
    admin = make_key(url, "ops", admin=True)
    servers: list[Server] = []
    try:
        for name in ("a", "b"):
            (root / name).mkdir()
            servers.append(start_server(model_dir, root / name, store=url, max_seq_len=512,
                                        max_new_tokens_default=2, quota_max_new_tokens=DEFAULT_MAX_NEW))
        with servers[0].client(headers={"Authorization": f"Bearer {admin}"}) as ops:
            base = upload(ops, "shared~base", peft_adapter(seed=3)).json()["manifest"]["base_model"]
        yield Cluster(redis, prefix, servers[0], servers[1], admin, base)
    finally:
        for s in servers:
            assert stop_server(s) in (0, -signal.SIGTERM), s.log.read_text()[-4000:]
        redis.kill()


def _quota_429(r: httpx.Response, limit: str) -> int:
    assert r.status_code == 429, r.text
    message, error_type = error_of(r)
    assert error_type == "quota_exceeded" and limit in message
    return int(r.headers["Retry-After"])


def test_requests_per_second_across_replicas(cluster):
    a, b = cluster.tenant(requests_per_second=0.2)  # a burst of 1, then one request per 5 s
    with a, b:
        t0 = time.monotonic()
        rs = [(a, b)[i % 2].get("/prefixes") for i in range(6)]
        assert time.monotonic() - t0 < 5  # so no token came back meanwhile
        assert [r.status_code for r in rs] == [200] + [429] * 5  # one bucket for both replicas
        assert all(4 <= _quota_429(r, "requests_per_second") <= 5 for r in rs[1:])
        other_a, other_b = cluster.tenant()
        with other_a, other_b:
            assert other_b.get("/prefixes").status_code == 200  # another tenant is not affected


def test_tokens_per_minute_across_replicas(cluster):
    a, b = cluster.tenant(tokens_per_minute=30)  # 10 tokens a request (1 prompt + 9 new): 3 fit
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 9, "ignore_eos_token": True, "details": True}}
    with a, b:
        rs = [(a, b)[i % 2].post("/generate", json=body) for i in range(5)]
        assert [r.status_code for r in rs] == [200, 200, 200, 429, 429], [r.text for r in rs]
        assert rs[0].json()["details"]["prompt_tokens"] + rs[0].json()["details"]["generated_tokens"] == 10
        assert _quota_429(rs[3], "tokens_per_minute") >= 10  # ~10 tokens at 0.5 per second
        r = a.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 30}})
        assert r.status_code == 422 and "tokens_per_minute (30)" in r.json()["error"]  # can never fit


def _tpm_bucket(cluster: Cluster, tenant: str) -> tuple[float, float] | None:
    """A tenant's tokens_per_minute bucket as Redis holds it: (tokens, Redis time of its last change); None: full."""
    return _tpm_bucket_at(cluster, tenant)[0]


def _tpm_bucket_at(cluster: Cluster, tenant: str) -> tuple[tuple[float, float] | None, float]:
    """The bucket (as `_tpm_bucket`) and the Redis time it was read at, in one transaction."""
    pipe = redis.Redis.from_url(cluster.redis.url).pipeline(transaction=True)
    (tokens, ts), (sec, usec) = pipe.hmget(f"{cluster.prefix}:quota:tpm:{tenant}", "tokens", "ts").time().execute()
    return None if ts is None else (float(tokens), float(ts)), sec + usec / 1e6


def _unchanged(cluster: Cluster, tenant: str, bucket: tuple[float, float], capacity: float) -> None:
    """The bucket is still `bucket`, or gone only because it has filled up since (the key expires 1 s after the
    bucket would be full: a test process held up longer than that, as on a loaded machine, finds no key)."""
    now, (tokens, ts) = _tpm_bucket_at(cluster, tenant), bucket
    if now[0] is None:
        assert now[1] > ts + (capacity - tokens) / (capacity / 60) + 1 - 0.002, (now, bucket)  # expired (ms clock)
    else:
        assert now[0] == bucket


def _eventually(check, what: str, timeout: float = 15):
    """Poll `check()` until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.01)
    return value


def _bucket_change(cluster: Cluster, tenant: str, since: tuple[float, float] | None) -> tuple[float, float]:
    """Poll until the bucket is no longer `since`; the new state."""
    return _eventually(lambda: (now := _tpm_bucket(cluster, tenant)) != since and now,
                       f"the tokens_per_minute bucket of {tenant} did not change")


def _booked(server: Server, tenant: str, route: str) -> list[tuple[str, int, int]]:
    """(finish, prompt_tokens, generated) of each request line the server logged for `tenant` on `route`."""
    pattern = rf"tenant={tenant} task=- route={route} finish=(\w+) prompt_tokens=(\d+) generated=(\d+) "
    return [(f, int(p), int(g)) for f, p, g in re.findall(pattern, server.log.read_text())]


ABANDONED = 1 + 450  # "x" and max_new_tokens 450: the whole bucket of a tenant with this tokens_per_minute


def _leave_mid_stream(c: httpx.Client, cluster: Cluster) -> tuple[float, float]:
    body = {"inputs": "x", "parameters": {"max_new_tokens": 450, "ignore_eos_token": True}}
    with c.stream("POST", "/generate_stream", json=body) as r:
        assert next(line for line in r.iter_lines() if line.startswith("data:"))
        return _bucket_change(cluster, c.tenant, None)  # the reservation, taken before the first token


def _leave_mid_generate(c: httpx.Client, cluster: Cluster) -> tuple[float, float]:
    body = {"inputs": "x", "parameters": {"max_new_tokens": 450, "ignore_eos_token": True}}
    with ThreadPoolExecutor(1) as pool:
        gone = pool.submit(c.post, "/generate", json=body, timeout=0.3)
        reserved = _bucket_change(cluster, c.tenant, None)
        with pytest.raises(httpx.TimeoutException):
            gone.result()
    return reserved


@pytest.mark.parametrize("leave, route", [(_leave_mid_stream, "generate_stream"),
                                          (_leave_mid_generate, "generate")])
def test_abandoned_generation_gives_back_what_it_did_not_use(cluster, leave, route):
    """A client that leaves mid-generation: its reservation less the prompt and the tokens generated comes back,
    once, when the engine has retired the request (the bucket is read in Redis)."""
    a, b = cluster.tenant(tokens_per_minute=ABANDONED, max_new_tokens=0)
    with a, b:
        tokens0, ts0 = leave(a, cluster)
        assert tokens0 < 1  # the whole bucket reserved
        tokens1, ts1 = _bucket_change(cluster, a.tenant, (tokens0, ts0))  # the refund
        [(finish, prompt, generated)] = _eventually(lambda: _booked(cluster.a, a.tenant, route), "not logged")
        assert finish == "cancelled" and prompt == 1 and 1 <= generated < 450, (finish, prompt, generated)
        rate = ABANDONED / 60
        assert tokens1 == pytest.approx(min(ABANDONED, tokens0 + (ts1 - ts0) * rate + ABANDONED - prompt - generated),
                                        abs=1e-3)
        time.sleep(1)
        _unchanged(cluster, a.tenant, (tokens1, ts1), ABANDONED)  # given back once
        assert len(_booked(cluster.a, a.tenant, route)) == 1


def test_choices_of_a_refused_request_give_back_their_tokens(cluster):
    """/v1/completions with n=2 whose second choice is over tokens_per_minute: 429, and the first choice (queued,
    then cancelled) gives back what it reserved but did not use."""
    choice = 1 + 200
    a, b = cluster.tenant(tokens_per_minute=2 * choice - 1, max_new_tokens=0)
    with a, b:
        r = a.post("/v1/completions", json={"model": "tiny-gpt2", "prompt": "x", "max_tokens": 200, "n": 2})
        _quota_429(r, "tokens_per_minute")
        booked = _eventually(lambda: _booked(cluster.a, a.tenant, "v1_completions"), "the choice was not booked")
        [(finish, prompt, generated)] = booked
        assert finish == "cancelled", booked
        used = prompt + generated if generated else 0
        full = (2 * choice - 1, 0.0)  # no key: the bucket is full (it expires once it has refilled)
        _eventually(lambda: (_tpm_bucket(cluster, a.tenant) or full)[0] >= 2 * choice - 1 - used - 1e-3,
                    f"not given back: {_tpm_bucket(cluster, a.tenant)}")  # without the refund: about `choice` - 1


def _multipart(files: dict[str, bytes], boundary: str = "quota-test-boundary") -> tuple[bytes, str]:
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{n}\"\r\n"
             f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n" for n, data in files.items()]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _until(check, timeout: float = 10.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while not (r := check())[0]:
        assert time.monotonic() < deadline, r[1].text
        time.sleep(0.05)
    return r[1]


def test_concurrent_requests_across_replicas(cluster):
    """An upload whose body the test holds back keeps one request in flight on replica a for as long as needed."""
    a, b = cluster.tenant(concurrent_requests=1)
    body, kind = _multipart(native_files(cluster.base_model, 7))
    release = threading.Event()

    def trickle() -> Iterator[bytes]:
        yield body[:100]
        release.wait(30)
        yield body[100:]

    slots = redis.Redis.from_url(cluster.redis.url)
    with a, b, ThreadPoolExecutor(1) as pool:
        held = pool.submit(a.put, "/prefixes/held", content=trickle(), headers={"Content-Type": kind})
        try:
            # the upload holds the tenant's one slot before b is asked (else b's request could take it first, and
            # the upload be the one refused: seen on a loaded machine)
            deadline = time.monotonic() + 10
            while not slots.zcard(f"{cluster.prefix}:quota:conc:{a.tenant}"):
                assert time.monotonic() < deadline and not held.done(), "the upload never took its slot"
                time.sleep(0.02)

            def refused() -> tuple[bool, httpx.Response]:
                r = b.post("/generate", json={"inputs": "hi"})
                return r.status_code == 429 or held.done(), r

            r = _until(refused)
            assert not held.done(), held.result().text  # the upload is still waiting for its body
            _quota_429(r, "concurrent_requests")  # the other replica counts a's request
            _quota_429(a.get("/prefixes"), "concurrent_requests")
        finally:
            release.set()
        assert held.result().status_code == 201, held.result().text
        _until(lambda: ((r := b.post("/generate", json={"inputs": "hi"})).status_code == 200, r))  # slot freed


def test_prompt_and_generation_limits_name_themselves(cluster):
    a, b = cluster.tenant(max_prompt_tokens=4)
    with a, b:
        r = a.post("/generate", json={"inputs": "one two three four five six"})
        assert r.status_code == 422 and "max_prompt_tokens (4)" in r.json()["error"]
        assert a.post("/generate", json={"inputs": "one two"}).status_code == 200
        r = b.post("/v1/completions", json={"model": "tiny-gpt2", "prompt": "hi", "max_tokens": DEFAULT_MAX_NEW + 1})
        assert r.status_code == 422 and f"max_new_tokens ({DEFAULT_MAX_NEW})" in error_of(r)[0]  # the default
        assert b.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": DEFAULT_MAX_NEW}}
                      ).status_code == 200
    a, b = cluster.tenant(max_new_tokens=5)  # an override of the default
    with a, b:
        r = b.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 6}})
        assert r.status_code == 422 and "max_new_tokens (5)" in r.json()["error"]


def test_storage_quotas_refuse_and_change_nothing(cluster):
    one = len(native_files(cluster.base_model, 0)["prefix.safetensors"])
    a, b = cluster.tenant(prefixes=2)
    with a, b:
        assert upload(a, "p1", native_files(cluster.base_model, 1)).status_code == 201
        assert upload(b, "p2", native_files(cluster.base_model, 2)).status_code == 201
        before = a.get("/prefixes").json()
        r = upload(b, "p3", native_files(cluster.base_model, 3))
        assert r.status_code == 403 and "prefixes quota (2)" in r.json()["error"]
        assert upload(a, "p2", native_files(cluster.base_model, 4)).status_code == 200  # replacing is fine
        assert {p["task"] for p in a.get("/prefixes").json()["prefixes"]} == {p["task"] for p in before["prefixes"]}
        assert a.get("/prefixes/p3").status_code == 404
    a, b = cluster.tenant(prefix_bytes=int(one * 1.5))
    with a, b:
        nbytes = upload(a, "q1", native_files(cluster.base_model, 5)).json()["manifest"]["nbytes"]
        assert 0 < nbytes <= one
        r = upload(b, "q2", native_files(cluster.base_model, 6))
        assert r.status_code == 403 and f"prefix_bytes quota ({int(one * 1.5)})" in r.json()["error"]
        assert b.get("/prefixes/q2").status_code == 404


def test_override_takes_effect_at_once(cluster):
    a, b = cluster.tenant()
    with a, b, cluster.b.client(headers={"Authorization": f"Bearer {cluster.admin}"}) as ops:
        assert [a.get("/prefixes").status_code for _ in range(3)] == [200] * 3
        r = ops.patch(f"/admin/tenants/{a.tenant}", json={"limits": {"prefixes": True}})  # not 1, as the schema says
        assert r.status_code == 422 and "limits.prefixes" in r.json()["error"], r.text
        r = ops.patch(f"/admin/tenants/{a.tenant}", json={"limits": {"requests_per_second": 0.1}})
        assert r.status_code == 200 and r.json()["overrides"] == {"requests_per_second": 0.1}
        assert [(a, b)[i].get("/prefixes").status_code for i in range(2)] == [200, 429]
        tenants = {t["name"]: t for t in ops.get("/admin/tenants").json()["tenants"]}
        assert tenants[a.tenant]["limits"]["max_new_tokens"] == DEFAULT_MAX_NEW


def test_python_client_with_a_key(cluster):
    """The first-party client: api_key= authenticates; 401, 429 and the storage quota are typed errors."""
    from prefixserve_client import AuthenticationError, Client, QuotaExceededError, RateLimitError, RetryPolicy

    a, b = cluster.tenant(prefixes=1, requests_per_second=0.05)
    with a, b, Client(cluster.b.url, api_key=a.api_key, retry=RetryPolicy(max_attempts=1)) as c:
        assert c.upload("k1", native_files(cluster.base_model, 8)).task == "k1"
        with pytest.raises(RateLimitError) as e:  # a burst of 1: the second request is over the rate
            c.list()
        assert e.value.retry_after and e.value.retry_after >= 1
        with cluster.a.client(headers={"Authorization": f"Bearer {cluster.admin}"}) as ops:
            ops.patch(f"/admin/tenants/{a.tenant}", json={"limits": {"requests_per_second": None}})
        assert [p.task for p in c.list()] == ["base", "k1"]  # its own task and the shared one
        with pytest.raises(QuotaExceededError, match="prefixes quota"):
            c.upload("k2", native_files(cluster.base_model, 9))
    with Client(cluster.a.url, retry=RetryPolicy(max_attempts=1)) as anonymous, pytest.raises(AuthenticationError):
        anonymous.list()
