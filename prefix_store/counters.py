"""Counters for quotas in the store's backend: token buckets, concurrency slots and locks.

In process for a disk store (each replica counts alone); on Redis every operation is one atomic Lua script using
the server's clock, so the limits hold across every replica sharing the Redis:

    P:quota:<key>     hash {tokens, ts}: a token bucket (expires once it would be full again)
                      zset request id -> expiry: concurrency slots (a slot of a replica that died expires)
                      string: a lock token (SET NX PX)
"""
from __future__ import annotations

import asyncio
import secrets
import time
from collections import defaultdict
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Protocol

from prefix_store.base import PrefixStore, StoreUnavailable


class Counters(Protocol):
    """Quota counters. Contract: each call is atomic across every process that shares the counters."""

    async def take(self, key: str, rate: float, capacity: float, cost: float) -> float:
        """Take `cost` tokens from the bucket `key` (refilled at `rate`/s up to `capacity`, starting full).

        Returns 0.0 when taken, else the seconds until they would be there (nothing is taken). A negative cost
        gives tokens back (up to `capacity`).
        """
        ...

    async def enter(self, key: str, limit: int, member: str, ttl: float) -> bool:
        """Hold one of `limit` slots of `key` as `member` (for at most `ttl` s); False when all are held."""
        ...

    async def leave(self, key: str, member: str) -> None:
        """Give a slot back."""
        ...

    def lock(self, key: str, ttl: float = 30.0, wait: float = 10.0) -> Any:
        """An async context manager holding the lock `key` (expires after `ttl` s if never released)."""
        ...


def _refill(tokens: float, last: float, now: float, rate: float, capacity: float) -> float:
    return min(capacity, tokens + max(0.0, now - last) * rate)


class LocalCounters:
    """Counters of one process (the disk store's; replicas sharing a directory each count on their own)."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}
        self._slots: dict[str, dict[str, float]] = defaultdict(dict)
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def take(self, key: str, rate: float, capacity: float, cost: float) -> float:
        """Token bucket in memory."""
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (capacity, now))
        tokens = _refill(tokens, last, now, rate, capacity)
        wait = 0.0
        if cost <= tokens or cost < 0:
            tokens = min(capacity, tokens - cost)
        else:
            wait = (cost - tokens) / rate
        self._buckets[key] = (tokens, now)
        return wait

    async def enter(self, key: str, limit: int, member: str, ttl: float) -> bool:
        """Slots in memory."""
        now = time.monotonic()
        slots = self._slots[key]
        for m in [m for m, until in slots.items() if until <= now]:
            del slots[m]
        if len(slots) >= limit:
            return False
        slots[member] = now + ttl
        return True

    async def leave(self, key: str, member: str) -> None:
        """Free a slot."""
        self._slots[key].pop(member, None)

    @asynccontextmanager
    async def lock(self, key: str, ttl: float = 30.0, wait: float = 10.0) -> AsyncIterator[None]:
        """An asyncio lock per key."""
        async with self._locks[key]:
            yield


# ARGV: prefix, key, rate, capacity, cost. Returns the wait in seconds as a string ("0" when taken).
TAKE = """
local k, rate, cap, cost = ARGV[1]..':quota:'..ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local v = redis.call('HMGET', k, 'tokens', 'ts')
local tokens, ts = tonumber(v[1]) or cap, tonumber(v[2]) or now
tokens = math.min(cap, tokens + math.max(0, now - ts) * rate)
local wait = 0
if cost <= tokens or cost < 0 then tokens = math.min(cap, tokens - cost) else wait = (cost - tokens) / rate end
redis.call('HSET', k, 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', k, math.ceil((cap - tokens) / rate * 1000) + 1000)
return tostring(wait)
"""

# ARGV: prefix, key, limit, member, ttl seconds. Returns 1 (slot held) or 0 (all held).
ENTER = """
local k, limit, member, ttl = ARGV[1]..':quota:'..ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
if redis.call('ZCARD', k) >= limit then return 0 end
redis.call('ZADD', k, now + ttl, member)
redis.call('EXPIRE', k, math.ceil(ttl) + 1)
return 1
"""

# ARGV: prefix, key, token. Deletes the lock only if this holder still owns it.
UNLOCK = """
local k = ARGV[1]..':quota:'..ARGV[2]
if redis.call('GET', k) == ARGV[3] then return redis.call('DEL', k) end
return 0
"""


class RedisCounters:
    """Counters in Redis on the prefix store's connection pool (see the module docstring)."""

    def __init__(self, store: Any):
        self._store = store  # a RedisStore
        self._scripts = {n: store._client.register_script(s) for n, s in (("take", TAKE), ("enter", ENTER),
                                                                          ("unlock", UNLOCK))}

    async def _run(self, script: str, *args: Any) -> Any:
        return await self._store._call(self._scripts[script](args=[self._store.prefix, *args]))

    async def take(self, key: str, rate: float, capacity: float, cost: float) -> float:
        """One atomic script on Redis's clock."""
        return float(await self._run("take", key, repr(float(rate)), repr(float(capacity)), repr(float(cost))))

    async def enter(self, key: str, limit: int, member: str, ttl: float) -> bool:
        """One atomic script; expired slots (a dead replica's) are dropped first."""
        return bool(await self._run("enter", key, int(limit), member, repr(float(ttl))))

    async def leave(self, key: str, member: str) -> None:
        """ZREM the slot."""
        await self._store._call(self._store._client.zrem(self._store._key("quota", key), member))

    @asynccontextmanager
    async def lock(self, key: str, ttl: float = 30.0, wait: float = 10.0) -> AsyncIterator[None]:
        """SET NX PX with a random token, polled every 20 ms for at most `wait` s; released only by its holder."""
        token, name = secrets.token_hex(8), self._store._key("quota", key)
        deadline = time.monotonic() + wait
        while not await self._store._call(self._store._client.set(name, token, nx=True, px=int(ttl * 1000))):
            if time.monotonic() > deadline:
                raise StoreUnavailable(f"redis store {self._store.url}: lock {key!r} busy for {wait:.0f} s")
            await asyncio.sleep(0.02)
        try:
            yield
        finally:
            await self._run("unlock", key, token)


def open_counters(store: PrefixStore) -> Counters:
    """Counters shared through `store`'s backend: Redis for a Redis store, this process otherwise."""
    from prefix_store.redis import RedisStore

    return RedisCounters(store) if isinstance(store, RedisStore) else LocalCounters()
