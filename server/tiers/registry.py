"""Task resolution through the tiers, kept in step with the store (and so with every other replica).

    task ref (NAME or NAME@VERSION) --name->manifest map (this module, fed by store.watch)--> version (sha256)
    version --device tier--> lease | --host tier--> onto the device, lease | --store--> parse, onto the device, lease

The tiers (server/tiers/tiers.py) own residency, eviction and pins; this module decides which versions are wanted
(and which a change made unwanted) and fetches from the store what no tier holds.

The map answers the HTTP path without a store round trip; a miss falls back to the store. `store.watch` events
(an upload, rollback or delete on any replica) update the map and drop the old version from the device tier;
after a reconnection (RESYNC) the map is reconciled with `store.snapshot()`. While the store is down, tasks whose
manifest and tensors are cached keep serving; anything needing the store fails with its StoreError (HTTP 503).

It also remembers names found absent, for a tenant's own name that would shadow a shared task (so using a shared
task costs no store read per request for the tenant's own name). Such an absence is tied to the version of the
tenant's namespace the request carried (read with its key, prefix_store/keys.py; bumped by every upload into the
namespace before the upload answers), so a request that starts after an upload on any replica never gets the
remembered absence; it is also forgotten on an event naming it, on RESYNC, and on a change made here, and never
remembered from a read that overlapped an event naming it (or a RESYNC, or a change made here). A store read's answer
is kept in the map on the same condition. Events for other names do not matter: on a busy store (polled, so events
come a moment late) a read overlapping someone else's upload would otherwise leave nothing remembered.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterator, TypeVar

from prefix_store.artifact import Manifest, PrefixArtifact, validate
from prefix_store.base import (RESYNC, PrefixNotFound, PrefixStore, StoreError, StoreEvent, StoreUnavailable,
                               split_task_ref)
from server.tiers.tiers import Lease, Tiers

logger = logging.getLogger(__name__)
T = TypeVar("T")

HEALTH_TTL_S = 1.0  # /ready probes within this reuse the last store health answer
HEALTH_TIMEOUT_S = 2.0  # a store that has not answered its health check by then is reported down
FAST_FAILURE_S = 0.5  # a store read that failed this fast (a pooled connection from before a restart) is retried
ABSENT_MAX = 8192  # names remembered absent (the least recently used forgotten first)


async def _read(call: Callable[[], Awaitable[T]]) -> T:
    """A store read, retried once when it failed fast as unreachable (redis-py can hand out one stale pooled
    connection per restart); a slow failure (a hung store) is not retried, so the bound on a request stays."""
    t0 = time.monotonic()
    try:
        return await call()
    except StoreUnavailable:
        if time.monotonic() - t0 > FAST_FAILURE_S:
            raise
    return await call()


@dataclass
class RegistryStats:
    """Counters exported in /metrics."""

    map_hits: int = 0
    map_misses: int = 0
    absent_hits: int = 0  # lookups answered "absent" from the remembered absences (no store read)
    events: int = 0
    resyncs: int = 0
    last_resync: float = 0.0  # unix seconds of the last reconciliation with the store


@dataclass(eq=False)
class _Read:
    """A store read of one name's current manifest, in flight; `overlapped` once a change to that name may have
    raced it (its answer may then be older than the map, so it is neither mapped nor remembered absent)."""

    name: str
    overlapped: bool = False


class TaskRegistry:
    """The name->manifest map, the store watcher, and `acquire(ref)` through the tiers and the store."""

    def __init__(self, store: PrefixStore, tiers: Tiers, fingerprint: dict[str, Any], max_bytes: int,
                 on_load: Callable[[str, float], None] | None = None):
        self.store, self.tiers = store, tiers
        self.fingerprint, self.max_bytes = fingerprint, max_bytes
        self.on_load = on_load or (lambda tier, seconds: None)
        self.manifests: dict[str, Manifest] = {}
        self._absent: OrderedDict[str, int] = OrderedDict()  # name -> namespace version it was found absent at
        self.stats = RegistryStats()
        self._reads: dict[str, list[_Read]] = {}  # store reads in flight, by name (see _changing)
        self._loading: dict[str, asyncio.Future[PrefixArtifact]] = {}
        self._health: tuple[float, dict[str, Any]] | None = None

    # -- resolution --
    async def manifest(self, name: str, version: str | None = None, absent_as_of: int | None = None) -> Manifest:
        """The manifest serving `name` (current, or the pinned `version`): from the map, else from the store.

        `absent_as_of`: the namespace version the request carries (see the module docstring); with it, a name
        remembered absent at that version is PrefixNotFound without a store read, and a store miss is remembered.
        """
        current = self.manifests.get(name)
        if current is not None and (version is None or current.sha256.startswith(version)):
            self.stats.map_hits += 1
            return current
        remember_absent = version is None and absent_as_of is not None
        if remember_absent and self._absent.get(name) == absent_as_of:
            self._absent.move_to_end(name)
            self.stats.absent_hits += 1
            raise PrefixNotFound(name)
        self.stats.map_misses += 1
        if version is not None:
            return await _read(lambda: self.store.get_manifest(name, version))
        with self._reading(name) as read:
            try:
                m = await _read(lambda: self.store.get_manifest(name))
            except PrefixNotFound:
                if remember_absent and not read.overlapped:
                    self._absent[name] = absent_as_of
                    self._absent.move_to_end(name)
                    if len(self._absent) > ABSENT_MAX:
                        self._absent.popitem(last=False)
                raise
            if not read.overlapped:  # nothing changed `name` meanwhile: the read is not older than the map
                self.manifests[name] = m
            return m

    @contextmanager
    def _reading(self, name: str) -> Iterator[_Read]:
        """Track one store read of `name` while it is in flight."""
        read = _Read(name)
        self._reads.setdefault(name, []).append(read)
        try:
            yield read
        finally:
            reads = self._reads[name]
            reads.remove(read)
            if not reads:
                del self._reads[name]

    def _changing(self, name: str | None) -> None:
        """`name` (None: every name, RESYNC) changes: reads of it in flight now are not remembered."""
        for reads in self._reads.values() if name is None else [self._reads.get(name, [])]:
            for read in reads:
                read.overlapped = True

    async def acquire(self, ref: str, absent_as_of: int | None = None) -> Lease:
        """A lease on the device payload of `NAME` or `NAME@VERSION`, for one request to hand to the engine (which
        gives it back); `absent_as_of`: see `manifest`."""
        name, version = split_task_ref(ref)
        sha = (await self.manifest(name, version, absent_as_of)).sha256
        lease = self.tiers.lease_resident(sha)
        if lease is not None:
            return lease
        t0 = time.perf_counter()
        art = self.tiers.host_artifact(sha)
        tier = "host"
        if art is None:
            tier = "store"
            art = await self._fetch_once(name, sha)
        lease = await asyncio.to_thread(self.tiers.lease_loaded, sha, art)
        self.on_load(tier, time.perf_counter() - t0)
        return lease

    async def _fetch_once(self, name: str, sha: str) -> PrefixArtifact:
        """Read, parse and validate a version from the store; concurrent misses of one version share the read."""
        fut = self._loading.get(sha)
        if fut is None:
            fut = asyncio.ensure_future(self._fetch(name, sha))
            self._loading[sha] = fut
            fut.add_done_callback(self._fetched)
        return await asyncio.shield(fut)

    def _fetched(self, fut: asyncio.Future) -> None:
        for sha, f in list(self._loading.items()):
            if f is fut:
                del self._loading[sha]
        if not fut.cancelled():
            fut.exception()  # retrieved here, so a failure nobody awaited any more is not logged as lost

    async def _fetch(self, name: str, sha: str) -> PrefixArtifact:
        m, tensors = await _read(lambda: self.store.get(name, sha))

        def parse() -> PrefixArtifact:
            art = PrefixArtifact.from_bytes(m.to_json(), tensors, self.max_bytes)
            validate(art, self.fingerprint, check_hash=False)  # hash checked by from_bytes; other models refused
            return art

        return await asyncio.to_thread(parse)

    # -- changes made through this replica --
    def remember(self, name: str, m: Manifest, previous: Manifest | None = None) -> None:
        """`name` now points to `m` (an upload or rollback on this replica); the old version leaves the device."""
        self._changing(name)
        self._absent.pop(name, None)
        old = self.manifests.get(name, previous)
        self.manifests[name] = m
        if old is not None and old.sha256 != m.sha256:
            self._release(old.sha256, host=False)

    def forget(self, name: str, version: str | None = None) -> None:
        """`name` was deleted: its version (the map's, else `version`: what the store held) leaves the map, the
        device and host memory, unless another name still points to it."""
        self._changing(name)
        self._absent.pop(name, None)
        old = self.manifests.pop(name, None)
        sha = old.sha256 if old is not None else version
        if sha is not None:
            self._release(sha, host=True)

    def _release(self, sha: str, *, host: bool) -> None:
        """Drop a version from the tiers unless another name still points to it."""
        if any(m.sha256 == sha for m in self.manifests.values()):
            return
        self.tiers.drop(sha, host=host)  # requests running on it keep their lease and finish on it

    # -- changes seen by the watcher --
    async def on_event(self, event: StoreEvent) -> None:
        """Apply one store event: a moved name, a deleted name, or RESYNC (reconcile with a snapshot). Reads of the
        name (of every name on RESYNC) in flight when it starts or when it ends are not remembered (one that began
        and ended in between began after the change was in the store)."""
        changed = None if event == RESYNC else event.name
        self._changing(changed)
        if event == RESYNC:  # events may have been missed: no absence is known any more
            self._absent.clear()
        else:
            self._absent.pop(event.name, None)
        try:
            if event == RESYNC:
                await self._resync()
            elif event.version is None:
                self.forget(event.name)
            else:
                await self._moved(event.name, event.version)
        finally:
            self._changing(changed)
            self.stats.events += 1

    async def _moved(self, name: str, version: str) -> None:
        old = self.manifests.get(name)
        if old is not None and old.sha256 == version:
            return  # already known (this replica made the change)
        try:
            m: Manifest | None = await self.store.get_manifest(name, version)
        except (PrefixNotFound, StoreError) as e:  # moved on again or unreachable: the next request reads it
            logger.info("store event %s@%s: %s", name, version[:12], e)
            m = None
        if m is None:
            self.manifests.pop(name, None)
        else:
            self.manifests[name] = m
        if old is not None and old.sha256 != version:
            self._release(old.sha256, host=False)

    async def _resync(self) -> None:
        """Drop every mapped name whose version differs from the store's (refilled by the next request)."""
        try:
            snap = await self.store.snapshot()
        except StoreError as e:  # cannot compare: forget the map rather than serve stale versions
            logger.warning("store resync failed (%s); clearing the task map", e)
            for name in list(self.manifests):
                self.forget(name)
            return
        stale = [(n, m) for n, m in self.manifests.items() if snap.get(n) != m.sha256]
        for name, m in stale:
            self.manifests.pop(name, None)
            self._release(m.sha256, host=name not in snap)
        self.stats.resyncs += 1
        self.stats.last_resync = time.time()
        logger.info("store resync: %d tasks in the store, %d stale mapped tasks dropped", len(snap), len(stale))

    async def watch(self) -> None:
        """Follow the store's events until cancelled (the store reconnects by itself; this restarts it if not)."""
        while True:
            try:
                await self.store.watch(self.on_event)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("store watch stopped; restarting it in 1 s")
                await asyncio.sleep(1.0)

    # -- start-up and health --
    async def preload(self, spec: str) -> list[str]:
        """Load `e2e,webnlg` (or `*`: every task) into the host and device caches; stop when the device is full."""
        refs = [r.strip() for r in spec.split(",") if r.strip()]
        if not refs:
            return []
        if refs == ["*"]:
            try:
                refs = list(await self.store.list())
            except StoreError as e:
                logger.warning("preload: cannot list the store (%s)", e)
                return []
        done: list[str] = []
        evictions = self.tiers.device.stats.evictions
        for ref in refs:
            try:
                (await self.acquire(ref)).release()
            except Exception as e:  # a bad or missing task must not stop the server from starting
                logger.warning("preload %s failed: %s", ref, e)
                continue
            if self.tiers.device.stats.evictions > evictions:
                logger.warning("preload: the device prefix cache is full after %d tasks; stopping", len(done))
                break
            done.append(ref)
        logger.info("preloaded %d of %d tasks", len(done), len(refs))
        return done

    async def store_health(self) -> dict[str, Any]:
        """The store's `health()` (reused for HEALTH_TTL_S, bounded by HEALTH_TIMEOUT_S); never raises."""
        now = time.monotonic()
        if self._health is not None and now - self._health[0] < HEALTH_TTL_S:
            return self._health[1]
        try:
            h = await asyncio.wait_for(self.store.health(), HEALTH_TIMEOUT_S)
        except asyncio.TimeoutError:
            h = {"ok": False, "detail": f"store {self.store.url}: no health answer in {HEALTH_TIMEOUT_S:.0f} s"}
        except Exception as e:
            h = {"ok": False, "detail": f"store {self.store.url}: {type(e).__name__}: {e}"}
        self._health = (time.monotonic(), h)
        return h
