"""A least-recently-used map bounded by bytes: the shape of both prefix tiers (device and host memory).

It holds values and their sizes and says what must leave past its budget; it decides nothing else. Its owner
(server/tiers/tiers.py) locks it, says which entries may not leave (pinned ones), and moves what leaves.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generic, Iterator, TypeVar

V = TypeVar("V")


@dataclass
class TierStats:
    """Counters exported in /metrics."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0


class ByteLRU(Generic[V]):
    """Values by key, each with its size in bytes, least recently used first; not thread-safe (its owner locks)."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self.bytes_used = 0
        self.stats = TierStats()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def values(self) -> Iterator[V]:
        """Every value held, least recently used first."""
        return (v for v, _ in list(self._entries.values()))

    def get(self, key: str) -> V | None:
        """The value of `key`, marked most recently used (a hit), or None (a miss)."""
        hit = self._entries.get(key)
        if hit is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return hit[0]

    def peek(self, key: str) -> V | None:
        """The value of `key` or None, counted as neither hit nor miss and not moved."""
        hit = self._entries.get(key)
        return None if hit is None else hit[0]

    def put(self, key: str, value: V, size: int) -> None:
        """Hold `value` as the most recently used (a key already held keeps its value and its place)."""
        if key in self._entries:
            return
        self._entries[key] = (value, size)
        self.bytes_used += size

    def pop(self, key: str) -> V | None:
        """Take `key` out; its value, or None."""
        hit = self._entries.pop(key, None)
        if hit is None:
            return None
        self.bytes_used -= hit[1]
        return hit[0]

    def evict(self, keep: Callable[[str], bool] = lambda key: False) -> list[tuple[str, V]]:
        """Take out least recently used entries, except those `keep` names, until the bytes fit the capacity;
        return what left (counted as evictions). Kept entries may hold the tier over its capacity."""
        out: list[tuple[str, V]] = []
        for key in list(self._entries):
            if self.bytes_used <= self.capacity_bytes:
                break
            if not keep(key):
                out.append((key, self.pop(key)))
        self.stats.evictions += len(out)
        return out
