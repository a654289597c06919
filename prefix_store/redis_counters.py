"""The Redis backend's quota counters: each operation one atomic Lua script on the Redis server's clock, so the
limits hold across every replica sharing the Redis (the interface is prefix_store/counters.py):

    P:quota:<key>     hash {tokens, ts}: a token bucket (expires once it would be full again)
                      zset request id -> expiry: concurrency slots (a slot of a replica that died expires)
                      string: a lock token (SET NX PX)
"""
from __future__ import annotations

import asyncio
import secrets
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

from prefix_store.base import StoreUnavailable
from prefix_store.redis_conn import RedisConnection

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
    """Counters in Redis on the backend's connection (see the module docstring)."""

    def __init__(self, conn: RedisConnection):
        self.conn = conn
        self._take, self._enter, self._unlock = (conn.script(s) for s in (TAKE, ENTER, UNLOCK))

    async def take(self, key: str, rate: float, capacity: float, cost: float) -> float:
        """One atomic script on Redis's clock."""
        return float(await self.conn.run(self._take, key, repr(float(rate)), repr(float(capacity)),
                                         repr(float(cost))))

    async def enter(self, key: str, limit: int, member: str, ttl: float) -> bool:
        """One atomic script; expired slots (a dead replica's) are dropped first."""
        return bool(await self.conn.run(self._enter, key, int(limit), member, repr(float(ttl))))

    async def leave(self, key: str, member: str) -> None:
        """ZREM the slot."""
        await self.conn.call(self.conn.client.zrem(self.conn.key("quota", key), member))

    @asynccontextmanager
    async def lock(self, key: str, ttl: float = 30.0, wait: float = 10.0) -> AsyncIterator[None]:
        """SET NX PX with a random token, polled every 20 ms for at most `wait` s; released only by its holder."""
        token, name = secrets.token_hex(8), self.conn.key("quota", key)
        deadline = time.monotonic() + wait
        while not await self.conn.call(self.conn.client.set(name, token, nx=True, px=int(ttl * 1000))):
            if time.monotonic() > deadline:
                raise StoreUnavailable(f"redis store {self.conn.url}: lock {key!r} busy for {wait:.0f} s")
            await asyncio.sleep(0.02)
        try:
            yield
        finally:
            await self.conn.run(self._unlock, key, token)
