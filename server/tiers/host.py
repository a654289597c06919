"""The warm tier: parsed, validated prefix artifacts in host memory, bounded by bytes, least recently used out.

It sits between the device cache (server/engine/device_prefix.py) and the store: a device eviction or a version
dropped on another replica's upload costs a host-to-device copy instead of a store round trip and a re-parse.
Entries are keyed by version (sha256), so they never go stale; a deleted task's versions are dropped to free memory.

The device cache keeps this tier in step (`PrefixCache.host`). On a GPU (or with a model dtype other than the
artifacts') the device holds copies, and this tier keeps the artifacts of resident prefixes too: two memories, two
budgets. On a CPU in the artifacts' dtype a device prefix *is* its artifact's memory, so this tier holds only the
prefixes the device cache does not (those it evicted): each prefix is counted once, by the tier that holds it,
and `host_cache_bytes` is prefix memory on top of `prefix_cache_bytes`.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from prefix_store.artifact import PrefixArtifact


def artifact_bytes(art: PrefixArtifact) -> int:
    """Host bytes held by an artifact's tensors."""
    return sum(t.numel() * t.element_size() for t in art.tensors.values())


@dataclass
class HostStats:
    """Counters exported in /metrics."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0


class HostCache:
    """LRU of PrefixArtifact (CPU tensors) by bytes; thread-safe; capacity 0 disables it."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[str, tuple[PrefixArtifact, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = HostStats()

    @property
    def bytes_used(self) -> int:
        """Bytes of all held artifacts."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, version: str) -> bool:
        return version in self._entries

    def get(self, version: str) -> PrefixArtifact | None:
        """The artifact of `version` (marked recently used), or None on a miss."""
        with self._lock:
            hit = self._entries.get(version)
            if hit is None:
                self.stats.misses += 1
                return None
            self._entries.move_to_end(version)
            self.stats.hits += 1
            return hit[0]

    def put(self, version: str, art: PrefixArtifact) -> None:
        """Hold an artifact, evicting the least recently used ones past the capacity (too large: not held)."""
        size = artifact_bytes(art)
        with self._lock:
            if size > self.capacity_bytes or version in self._entries:
                return
            self._entries[version] = (art, size)
            self._bytes += size
            while self._bytes > self.capacity_bytes:
                _, (_, freed) = self._entries.popitem(last=False)
                self._bytes -= freed
                self.stats.evictions += 1

    def drop(self, version: str) -> None:
        """Forget a version (its task was deleted or moved on)."""
        with self._lock:
            hit = self._entries.pop(version, None)
            if hit is not None:
                self._bytes -= hit[1]
