"""The hot tier: prefixes on the model's device, bounded by bytes, least recently used first out.

An entry is pinned while any queued or running request uses it and is never evicted under it. Entries are keyed
by version (the artifact's sha256), so a re-upload under the same task name is a different entry and rows that
started on the old version finish on it.

With a host tier below it (`host`, server/tiers/host.py), each byte of prefix memory is held by one tier. When the
device is the CPU and the model's dtype is the artifact's, `.to(device, dtype)` returns the artifact's own tensors:
the device prefix *is* the host artifact's memory. Such an entry moves between the tiers (loaded: it leaves the
host tier; evicted or dropped: it goes back there), so `prefix_cache_bytes + host_cache_bytes` bounds it and each
tier's `bytes_used` counts it only while it holds it. A device copy of its own (a GPU, or another dtype) leaves
the artifact in the host tier, a separate memory with its own budget.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from prefix_store.artifact import PrefixArtifact

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class DevicePrefix:
    """A prefix resident on the model's device (tensors as in the artifact, each [layers, 2, kv_heads, P, head_dim]).

    kv: decoder self-attention (None in an encoder-decoder artifact without one); encoder_kv, cross_kv: the encoder's
    self-attention and the decoder's cross-attention prefixes of encoder-decoder models; positions: where decoder
    position ids start ("after_prefix": at P, "from_zero": at 0).
    """

    version: str
    kv: torch.Tensor | None
    cache: PrefixCache | None = field(default=None, repr=False)
    pins: int = 0
    encoder_kv: torch.Tensor | None = None
    cross_kv: torch.Tensor | None = None
    positions: str = "after_prefix"
    artifact: PrefixArtifact | None = field(default=None, repr=False)  # set when the tensors are its memory

    @classmethod
    def from_artifact(cls, version: str, art: PrefixArtifact, device: torch.device, dtype: torch.dtype,
                      cache: PrefixCache | None = None) -> DevicePrefix:
        """Copy an artifact's tensors to the device in the model's dtype (no copy where they already are: then
        `artifact` is set, the artifact whose memory this prefix shares)."""
        on = {k: v.to(device=device, dtype=dtype).contiguous() for k, v in art.tensors.items()}
        shared = all(on[k].data_ptr() == v.data_ptr() for k, v in art.tensors.items())
        return cls(version, on.get("kv"), cache=cache, encoder_kv=on.get("encoder_kv"), cross_kv=on.get("cross_kv"),
                   positions=art.manifest.positions, artifact=art if shared else None)

    @property
    def length(self) -> int:
        """Prefix length P of the decoder self-attention prefix (0 without one)."""
        return int(self.kv.shape[3]) if self.kv is not None else 0

    @property
    def cross_length(self) -> int:
        """Length of the cross-attention prefix (0 without one)."""
        return int(self.cross_kv.shape[3]) if self.cross_kv is not None else 0

    @property
    def nbytes(self) -> int:
        """Device bytes held."""
        return sum(t.numel() * t.element_size() for t in (self.kv, self.encoder_kv, self.cross_kv) if t is not None)

    def release(self) -> None:
        """Unpin (called by the engine when the row using it retires)."""
        if self.cache is not None:
            self.cache.release(self)


@dataclass
class CacheStats:
    """Counters exported in /metrics."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0


class HostTier(Protocol):
    """The tier below the device cache (server/tiers/host.py's HostCache): parsed artifacts in host memory, by
    version, bounded by its own budget; `put` of a version it holds is a no-op."""

    def put(self, version: str, art: PrefixArtifact) -> None:
        """Hold an artifact (evicting its least recently used ones past the budget)."""

    def drop(self, version: str) -> None:
        """Forget a version."""


class PrefixCache:
    """LRU of DevicePrefix by bytes; thread-safe (acquired by the API, released by the engine thread).

    `host`, when set, is kept in step as the module docstring says: a newly loaded version is put there (a device
    copy of its own) or taken out of it (the same memory), and an evicted or dropped entry that is the artifact's
    memory goes back there. Lock order: this cache's lock, then the host tier's (which never calls back).
    """

    def __init__(self, capacity_bytes: int, device: torch.device, dtype: torch.dtype, host: HostTier | None = None):
        self.capacity_bytes, self.device, self.dtype = capacity_bytes, device, dtype
        self.host = host
        self._entries: OrderedDict[str, DevicePrefix] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = CacheStats()

    @property
    def bytes_used(self) -> int:
        """Bytes of all resident prefixes."""
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, version: str) -> bool:
        return version in self._entries

    def acquire(self, version: str, load: Callable[[], PrefixArtifact]) -> DevicePrefix:
        """Return the pinned device prefix for `version`, calling `load()` (outside the lock) on a miss."""
        with self._lock:
            entry = self._entries.get(version)
            if entry is not None:
                entry.pins += 1
                self._entries.move_to_end(version)
                self.stats.hits += 1
                return entry
            self.stats.misses += 1
        art = load()
        loaded = DevicePrefix.from_artifact(version, art, self.device, self.dtype, cache=self)
        with self._lock:
            entry = self._entries.get(version)  # another caller may have loaded it meanwhile
            if entry is None:
                entry = loaded
                self._entries[version] = entry
                if self.host is not None and entry.artifact is not None:
                    self.host.drop(version)  # the same memory: held, and counted, here now
                elif self.host is not None:
                    self.host.put(version, art)  # a device copy of its own: the artifact stays warm below
            entry.pins += 1
            self._entries.move_to_end(version)
            self._evict_locked()
            return entry

    def release(self, entry: DevicePrefix) -> None:
        """Unpin an entry; it stays resident until evicted."""
        with self._lock:
            entry.pins = max(0, entry.pins - 1)
            self._evict_locked()

    def drop(self, version: str) -> None:
        """Forget a version (e.g. deleted); a pinned entry stays usable by its rows until they retire."""
        with self._lock:
            entry = self._entries.get(version)
            if entry is not None and entry.pins == 0:
                self._remove_locked(version)

    def _remove_locked(self, version: str) -> DevicePrefix:
        """Take an entry out; memory it shares with its artifact goes back to the host tier (still warm there)."""
        entry = self._entries.pop(version)
        if self.host is not None and entry.artifact is not None:
            self.host.put(version, entry.artifact)
        return entry

    def _evict_locked(self) -> None:
        total = sum(e.nbytes for e in self._entries.values())
        for version in list(self._entries):
            if total <= self.capacity_bytes:
                break
            if self._entries[version].pins == 0:
                total -= self._remove_locked(version).nbytes
                self.stats.evictions += 1
