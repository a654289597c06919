"""Quota counters in each backend: token buckets (take, wait, refund), concurrency slots (limit, release, expiry)
and locks; on Redis two clients share them (what makes quotas hold across replicas)."""
from __future__ import annotations

import asyncio

import pytest

from prefix_store.backend import open_backend
from prefix_store.counters import LocalCounters
from prefix_store.redis_counters import RedisCounters
from tests.prefix_store.conftest import SHARED_REDIS


async def test_token_bucket(stores):
    c = stores.counters
    assert [await c.take("b", 1.0, 3, 1) for _ in range(3)] == [0.0, 0.0, 0.0]  # starts full: a burst of 3
    wait = await c.take("b", 1.0, 3, 1)
    assert 0.5 < wait <= 1.0  # empty: the next token comes in ~1 s; nothing was taken
    assert await c.take("b", 1.0, 3, -1) == 0.0  # a refund puts one back
    assert await c.take("b", 1.0, 3, 1) == 0.0
    assert await c.take("big", 10.0, 5, 6) == pytest.approx(0.1, abs=0.05)  # more than a full bucket holds
    assert await c.take("b2", 1000.0, 2, 2) == 0.0
    await asyncio.sleep(0.01)
    assert await c.take("b2", 1000.0, 2, 2) == 0.0  # refilled at 1000/s


async def test_slots_limit_release_and_expire(stores):
    c = stores.counters
    assert await c.enter("s", 2, "r1", 60) and await c.enter("s", 2, "r2", 60)
    assert not await c.enter("s", 2, "r3", 60)
    await c.leave("s", "r1")
    assert await c.enter("s", 2, "r3", 60)
    assert await c.enter("t", 1, "dead", 0.05)  # a slot whose holder died expires
    assert not await c.enter("t", 1, "x", 60)
    await asyncio.sleep(0.1)
    assert await c.enter("t", 1, "x", 60)


async def test_lock_serialises(stores):
    c = stores.counters
    inside, most = 0, 0

    async def work() -> None:
        nonlocal inside, most
        async with c.lock("l", ttl=5, wait=5):
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.02)
            inside -= 1

    await asyncio.gather(*(work() for _ in range(4)))
    assert most == 1


async def test_redis_counters_are_shared_between_clients(namespace):
    url = f"{SHARED_REDIS}?prefix={namespace}"
    a, b = open_backend(url), open_backend(url)
    try:
        ca, cb = a.counters, b.counters
        assert isinstance(ca, RedisCounters)
        assert await ca.take("shared", 0.001, 2, 1) == 0.0 and await cb.take("shared", 0.001, 2, 1) == 0.0
        assert await ca.take("shared", 0.001, 2, 1) > 0 and await cb.take("shared", 0.001, 2, 1) > 0
        assert await ca.enter("c", 1, "a", 60) and not await cb.enter("c", 1, "b", 60)
    finally:
        await a.close()
        await b.close()


def test_disk_store_counts_in_process(tmp_path):  # per replica (docs/tenants.md)
    assert isinstance(open_backend(str(tmp_path)).counters, LocalCounters)
