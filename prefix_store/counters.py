"""Counters for quotas in the store's backend: token buckets, concurrency slots and locks.

In process for a disk store (`LocalCounters`: each replica counts alone); on Redis (prefix_store/redis_counters.py)
every operation is one atomic Lua script on the server's clock, so the limits hold across every replica sharing
the Redis. `open_backend` (prefix_store/backend.py) gives each backend's counters.
"""
from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Protocol


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
