"""Redis-only behaviour against real servers: URLs and passwords, eviction, OOM, outages, restarts, pub/sub delay."""
from __future__ import annotations

import asyncio
import logging
import statistics
import time

import pytest
import redis

from prefix_store.backend import open_store
from prefix_store.base import RESYNC, PrefixNotFound, StoreError, StoreEvent, StoreUnavailable
from prefix_store.redis import RedisStore
from tests.prefix_store.conftest import SHARED_REDIS, art, free_port, tensors

logger = logging.getLogger(__name__)


async def test_url_options_password_and_masking(redis_server, monkeypatch):
    srv = redis_server("--requirepass", "s3cret")
    s = open_store(f"redis://:s3cret@127.0.0.1:{srv.port}/2?prefix=team-a&keep_versions=7&timeout=1")
    assert isinstance(s, RedisStore) and (s.prefix, s.keep_versions, s.timeout) == ("team-a", 7, 1.0)
    assert "s3cret" not in s.url and "***" in s.url
    await s.put("t", art(1).manifest, tensors(art(1)))
    assert redis.Redis(port=srv.port, db=2, password="s3cret").hexists("team-a:alias", "t")
    await s.close()
    monkeypatch.setenv("PREFIXSERVE_REDIS_PASSWORD", "s3cret")  # password from the environment
    s = open_store(f"redis://127.0.0.1:{srv.port}/2?prefix=team-a")
    assert (await s.get("t"))[1] == tensors(art(1))
    await s.close()
    monkeypatch.delenv("PREFIXSERVE_REDIS_PASSWORD")
    s = open_store(f"redis://127.0.0.1:{srv.port}/2?prefix=team-a")
    with pytest.raises(StoreError, match="redis store"):  # no password: a clear error, not a crash
        await s.get("t")
    await s.close()
    tls = open_store("rediss://user:pw@example.invalid:6380/0")
    assert tls.url.startswith("rediss://user:***@example.invalid:6380")
    await tls.close()


async def test_namespaces_are_isolated(namespace):
    a = open_store(f"{SHARED_REDIS}?prefix={namespace}")
    b = open_store(f"{SHARED_REDIS}?prefix={namespace}-other")
    try:
        await a.put("t", art(1).manifest, tensors(art(1)))
        assert await b.list() == {}
        with pytest.raises(PrefixNotFound):
            await b.get("t")
    finally:
        await b.close()
        await a.close()


async def test_missing_blob_is_a_clear_error(namespace):
    s = open_store(f"{SHARED_REDIS}?prefix={namespace}")
    a = art(1)
    await s.put("t", a.manifest, tensors(a))
    await s.conn.client.delete(f"{namespace}:blob:{a.manifest.sha256}")  # what maxmemory eviction does
    with pytest.raises(StoreError, match=f"blob {namespace}:blob:{a.manifest.sha256} of 't'.*missing"):
        await s.get("t")
    assert (await s.get_manifest("t")).sha256 == a.manifest.sha256  # the manifest alone still reads
    await s.put("t", a.manifest, tensors(a))  # re-upload heals it
    assert (await s.get("t"))[1] == tensors(a)
    await s.close()


async def test_maxmemory_eviction_never_serves_a_wrong_prefix(redis_server):
    srv = redis_server("--maxmemory", "3mb", "--maxmemory-policy", "allkeys-lru", "--maxmemory-samples", "10")
    s = open_store(f"{srv.url}?prefix=ev")
    arts = [art(i, prefix_len=16384) for i in range(4)]  # ~256 KB of tensors each
    for i, a in enumerate(arts):
        await s.put(f"t{i}", a.manifest, tensors(a))
    await asyncio.sleep(1.1)  # Redis' LRU clock ticks once a second: make the blobs older than the metadata
    r = redis.Redis(port=srv.port)
    blob_keys = [f"ev:blob:{a.manifest.sha256}" for a in arts]
    for i in range(200):  # fill memory while the metadata stays hot (every request reads it)
        r.set(f"filler:{i}", b"x" * 100_000)
        await s.list()
        await s.snapshot()
        if sum(r.exists(k) for k in blob_keys) < len(arts):
            break
    evicted, statuses = 0, []
    for i, a in enumerate(arts):
        try:
            m, t = await s.get(f"t{i}")
            assert m.sha256 == a.manifest.sha256 and t == tensors(a)  # what is served is always right
            statuses.append("ok")
        except StoreError as e:
            assert "missing (evicted by maxmemory" in str(e) and a.manifest.sha256 in str(e)
            evicted += 1
            statuses.append("evicted")
        except PrefixNotFound:
            statuses.append("not found")  # the alias itself was evicted: a 404, never a wrong prefix
    assert evicted >= 1, statuses
    await s.close()


async def test_noeviction_full_is_a_clear_error(redis_server):
    srv = redis_server("--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
    s = open_store(f"{srv.url}?prefix=oom")
    with pytest.raises(StoreError, match="out of memory"):
        for i in range(20):
            a = art(i, prefix_len=16384)
            await s.put(f"t{i}", a.manifest, tensors(a))
    assert (await s.health())["ok"] is True  # reads still work
    await s.close()


async def test_unreachable_fails_fast():
    s = open_store(f"redis://127.0.0.1:{free_port()}/0?timeout=0.5")
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"redis store redis://127.0.0.1:\d+/0: unreachable"):
        await s.get_manifest("t")
    h = await s.health()
    assert h["ok"] is False and "unreachable" in h["detail"]
    assert time.monotonic() - t0 < 3
    await s.close()


async def test_restart_fails_clearly_then_recovers_and_watch_reconciles(redis_server):
    srv = redis_server()
    s = RedisStore(f"{srv.url}?prefix=rs&timeout=0.5")
    watcher = RedisStore(f"{srv.url}?prefix=rs&timeout=0.5")
    events: list[StoreEvent] = []
    task = asyncio.create_task(watcher.watch(events.append))
    a, b = art(1), art(2)
    await asyncio.sleep(0.3)
    await s.put("t", a.manifest, tensors(a))
    srv.kill()  # Redis dies (no persistence: it comes back empty)
    t0 = time.monotonic()
    for call in (s.get("t"), s.put("t", b.manifest, tensors(b)), s.list()):
        with pytest.raises(StoreUnavailable, match="unreachable"):
            await call
    assert time.monotonic() - t0 < 5 and not (await s.health())["ok"]
    srv.start()  # same port, recovers by itself: no new store object
    await s.put("u", b.manifest, tensors(b))
    assert (await s.get("u"))[1] == tensors(b) and (await s.health())["ok"]
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and (events.count(RESYNC) < 2
                                           or StoreEvent("u", b.manifest.sha256) not in events):
        await asyncio.sleep(0.05)
    task.cancel()
    # after reconnecting the watcher says "resync" (events may have been lost with the connection) and the
    # snapshot shows t vanished with the restart (no persistence) while u appeared
    assert events.count(RESYNC) >= 2 and StoreEvent("u", b.manifest.sha256) in events
    assert await watcher.snapshot() == {"u": b.manifest.sha256}
    await s.close()
    await watcher.close()


async def test_pubsub_invalidation_delay(namespace, capsys):
    """Replica A puts, replica B's watcher sees it: the delay is measured and must be well under 1 s."""
    a_store = open_store(f"{SHARED_REDIS}?prefix={namespace}")
    b_store = open_store(f"{SHARED_REDIS}?prefix={namespace}")
    seen: dict[str, float] = {}
    task = asyncio.create_task(b_store.watch(lambda e: seen.setdefault(e.version or "", time.perf_counter())))
    await asyncio.sleep(0.3)
    delays = []
    for i in range(20):
        x = art(1000 + i)
        t0 = time.perf_counter()
        await a_store.put("live", x.manifest, tensors(x))
        t_put = time.perf_counter()
        while x.manifest.sha256 not in seen and time.perf_counter() - t0 < 1.0:
            await asyncio.sleep(0.001)
        assert x.manifest.sha256 in seen, "invalidation not received within 1 s"
        delays.append((seen[x.manifest.sha256] - t0, seen[x.manifest.sha256] - t_put))
    task.cancel()
    from_start = sorted(d[0] * 1000 for d in delays)
    with capsys.disabled():
        print(f"\npub/sub invalidation (put start -> watcher callback), 20 puts: "
              f"p50 {statistics.median(from_start):.2f} ms, max {from_start[-1]:.2f} ms")
    await a_store.close()
    await b_store.close()


async def test_request_burst_waits_for_pooled_connections(namespace):
    """More concurrent reads than pooled connections (64): they queue briefly instead of failing."""
    s = open_store(f"{SHARED_REDIS}?prefix={namespace}")
    a = art(1, prefix_len=256)
    await s.put("t", a.manifest, tensors(a))
    results = await asyncio.gather(*(s.get("t") for _ in range(200)))
    assert all(t == tensors(a) for _, t in results)
    await s.close()


async def test_no_warnings_from_the_client(namespace):
    """The asyncio client gets an asyncio Retry: redis-py warned once per connection when handed the synchronous
    one (34 warnings a test run)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = open_store(f"{SHARED_REDIS}?prefix={namespace}")
        await s.put("t", art(1).manifest, tensors(art(1)))
        assert (await s.get("t"))[1] == tensors(art(1))
        await s.close()
