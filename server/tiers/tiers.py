"""The tiers a task's payload lives in above the store, and their one owner: residency, eviction and pins.

    device tier  ByteLRU of payloads on the model's device (`device_bytes`); a pinned one never leaves
    host tier    ByteLRU of parsed, validated artifacts in host memory (`host_bytes`)
    store        below both (prefix_store/), reached by the task registry (registry.py), never from here

Tiers knows no task kind: what goes on the device is whatever `to_device(version, artifact)` (given to the
constructor) makes of an artifact (server/engine/payload.py: a prefix's KV or a LoRA adapter's factors), and all it
asks of a payload is its `nbytes` and whether it *is* its artifact's memory (`shares_host_memory`).

Pins: `lease*` pins a version for one request and returns a Lease, the handle the engine receives with the request
and gives back with `Lease.release()` when the request ends (a second release does nothing). Nothing else pins or
unpins, and only this class evicts.

Where a payload is its artifact's own memory (a CPU model in the artifact's dtype: `.to(device, dtype)` copies
nothing), each byte of it is held by one tier: loaded onto the device it leaves the host tier, evicted or dropped
it goes back there, so `device_bytes + host_bytes` bound it and each tier counts it only while it holds it. A
payload with memory of its own (a GPU, another dtype) leaves its artifact warm in the host tier: two memories, two
budgets.

Thread-safe: one lock guards both tiers (leases are taken from the event loop's worker threads and given back on
the engine thread); `to_device` runs outside it.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from server.tiers.lru import ByteLRU


class HostArtifact(Protocol):
    """A task's parsed artifact in host memory (prefix_store.artifact.PrefixArtifact for prefixes)."""

    @property
    def nbytes(self) -> int:
        """Bytes of host memory it holds."""


class DevicePayload(Protocol):
    """What a task kind puts on the model's device for its requests to run with."""

    @property
    def nbytes(self) -> int:
        """Bytes of device memory it holds."""

    @property
    def shares_host_memory(self) -> bool:
        """True when its memory is its artifact's own (then one tier at a time holds it)."""


@dataclass(eq=False)
class _Resident:
    """A device tier entry: the payload, the artifact whose memory it is (None: a copy of its own), its pins."""

    payload: Any
    artifact: Any
    pins: int = 0


class Lease:
    """One request's hold on a resident payload: it stays on the device until `release()` (once; any thread)."""

    def __init__(self, tiers: Tiers, version: str, entry: _Resident):
        self._tiers, self._entry, self._held = tiers, entry, True
        self.version, self.payload = version, entry.payload

    def release(self) -> None:
        """Give the pin back to the tiers (further calls do nothing)."""
        self._tiers._unpin(self)


class Tiers:
    """The device and host tiers (see the module docstring): the one owner of residency, eviction and pins."""

    def __init__(self, device_bytes: int, host_bytes: int, to_device: Callable[[str, Any], Any]):
        self.device: ByteLRU[_Resident] = ByteLRU(device_bytes)
        self.host: ByteLRU[Any] = ByteLRU(host_bytes)
        self._to_device = to_device
        self._lock = threading.Lock()

    def lease_resident(self, version: str) -> Lease | None:
        """A lease on `version` if the device holds it (a device hit), else None (a miss)."""
        with self._lock:
            entry = self.device.get(version)
            return None if entry is None else self._pin(version, entry)

    def host_artifact(self, version: str) -> Any | None:
        """The artifact of `version` if host memory holds it (a host hit), else None (a miss)."""
        with self._lock:
            return self.host.get(version)

    def lease_loaded(self, version: str, artifact: Any) -> Lease:
        """Put `artifact` on the device as `version` (unless it is there by now) and lease it; blocking."""
        payload = self._to_device(version, artifact)
        with self._lock:
            entry = self.device.peek(version)  # another request may have loaded it meanwhile
            if entry is None:
                entry = _Resident(payload, artifact if payload.shares_host_memory else None)
                self.device.put(version, entry, payload.nbytes)
                if entry.artifact is not None:
                    self.host.pop(version)  # the same memory: held, and counted, on the device now
                else:
                    self._hold_on_host(version, artifact)  # a copy of its own: the artifact stays warm below
            lease = self._pin(version, entry)
            self._evict()
            return lease

    def lease(self, version: str, load: Callable[[], Any]) -> Lease:
        """A lease on `version` from the device tier, else loaded from the host tier, else from `load()`."""
        return self.lease_resident(version) or self.lease_loaded(version, self.host_artifact(version) or load())

    def pins(self, version: str) -> int:
        """How many leases on `version` are held now (0 when none, or not on the device)."""
        with self._lock:
            entry = self.device.peek(version)
            return 0 if entry is None else entry.pins

    def drop(self, version: str, *, host: bool) -> None:
        """Forget `version` on the device (a pinned one stays for its requests) and, with `host`, in host memory."""
        with self._lock:
            entry = self.device.peek(version)
            if entry is not None and entry.pins == 0:
                self._left_device(version, self.device.pop(version))
            if host:
                self.host.pop(version)

    def _pin(self, version: str, entry: _Resident) -> Lease:
        entry.pins += 1
        return Lease(self, version, entry)

    def _unpin(self, lease: Lease) -> None:
        with self._lock:
            if lease._held:
                lease._held = False
                lease._entry.pins -= 1
                self._evict()

    def _evict(self) -> None:
        """Past the device budget, unpinned payloads leave, least recently used first."""
        for version, entry in self.device.evict(keep=lambda v: self.device.peek(v).pins > 0):
            self._left_device(version, entry)

    def _left_device(self, version: str, entry: _Resident) -> None:
        """A payload that was its artifact's memory goes back to the host tier (still warm there)."""
        if entry.artifact is not None:
            self._hold_on_host(version, entry.artifact)

    def _hold_on_host(self, version: str, artifact: Any) -> None:
        """Hold an artifact in host memory, evicting its least recently used ones (one too large: not held)."""
        if artifact.nbytes <= self.host.capacity_bytes:
            self.host.put(version, artifact, artifact.nbytes)
            self.host.evict()
