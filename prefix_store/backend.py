"""A store backend by URL: its prefix, key and counter stores, opened together on one directory or connection.

    DIR, file://DIR[?keep_versions=N&poll=S]     disk: DiskStore, DiskKeyStore (ROOT/auth.json), LocalCounters,
                                                  DiskReplicas (ROOT/replicas/)
    redis://[:pw@]host:port/db[?prefix=P&...]    Redis: RedisStore, RedisKeyStore, RedisCounters, RedisReplicas on
                                                  one pool
    rediss://...                                  the same over TLS

The interfaces are PrefixStore (prefix_store/base.py), KeyStore (keys.py), Counters (counters.py) and Replicas
(replicas.py); callers see only those, and never a backend's internals.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefix_store.base import PrefixStore, store_options
from prefix_store.counters import Counters, LocalCounters
from prefix_store.keys import KeyStore
from prefix_store.replicas import DiskReplicas, RedisReplicas, Replicas

REDIS_SCHEMES = ("redis://", "rediss://")


@dataclass
class Backend:
    """One backend's stores; they share its directory (disk) or connection pool (Redis)."""

    prefixes: PrefixStore
    keys: KeyStore
    counters: Counters
    replicas: Replicas  # which replicas are up and what each holds (the console's replica column)

    @property
    def url(self) -> str:
        """The backend's URL as logs show it (no password)."""
        return self.prefixes.url

    async def close(self) -> None:
        """Release the directory's files or the connection pool (the three stores' alike)."""
        await self.prefixes.close()


def open_backend(url: str, **options: Any) -> Backend:
    """Open the backend at `url` (see the module docstring); `options` override the URL's (e.g. keep_versions)."""
    if url.startswith(REDIS_SCHEMES):
        from prefix_store.redis import RedisStore
        from prefix_store.redis_counters import RedisCounters
        from prefix_store.redis_keys import RedisKeyStore

        store = RedisStore(url, **options)
        return Backend(store, RedisKeyStore(store.conn), RedisCounters(store.conn), RedisReplicas(store.conn))
    from prefix_store.disk import DiskStore
    from prefix_store.disk_keys import DiskKeyStore

    if url.startswith("file://"):
        path, opts = store_options(url[len("file://"):])
        disk = DiskStore(path, **{**opts, **options})
    elif "://" in url:
        raise ValueError(f"unsupported store URL {url!r}: give a directory path, file://DIR, redis:// or rediss://")
    else:
        disk = DiskStore(url, **options)
    return Backend(disk, DiskKeyStore(disk), LocalCounters(), DiskReplicas(disk.root))


def open_store(url: str, **options: Any) -> PrefixStore:
    """The prefix store of `open_backend(url)`, for tools that need no keys or counters (copying, listing)."""
    return open_backend(url, **options).prefixes
