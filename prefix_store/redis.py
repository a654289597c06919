"""A `PrefixStore` on Redis (6+), shared by many replicas: content-addressed blobs plus atomic alias swaps.

Keys, under a namespace P (default "prefixserve"; `?prefix=NAME` in the URL, so deployments and tests can share
one Redis; the Lua scripts in prefix_store/redis_lua.py are the only writers):

    P:blob:<sha256>        the safetensors bytes of a version (content-addressed, shared between names)
    P:alias                hash  name -> current version (sha256)
    P:current              hash  name -> manifest JSON of the current version (what `list` reads)
    P:v:<name>             hash  sha256 -> manifest JSON, one field per kept version
    P:order:<name>         zset  sha256 scored by creation time (retention drops the oldest, never the current)
    P:refs                 hash  sha256 -> number of kept (name, version) pairs pointing to the blob
    P:events               pub/sub channel: {"name", "version"} after every put, rollback and delete

A put first writes the blob (SET NX with a one-hour expiry, so an interrupted upload leaves nothing behind), then
one script checks the expected version, verifies the blob is there, records the version, moves the alias, applies
retention and publishes the event, all atomically. Reads of manifest + tensors are one script too, so a reader
never sees a manifest without its tensors or a mix of two versions. A blob lost to maxmemory eviction is a
StoreError naming it, never another prefix's bytes (keys are content hashes). Every call is bounded by timeouts.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from redis.exceptions import RedisError

from prefix_store import redis_lua
from prefix_store.artifact import Manifest
from prefix_store.base import (DEFAULT_KEEP_VERSIONS, RESYNC, EventCallback, PrefixNotFound, StoreError, StoreEvent,
                               StoreUnavailable, VersionConflict, VersionInfo, VersionNotFound, store_options,
                               validate_task_name, validate_version)
from prefix_store.redis_conn import RedisConnection
from prefix_store.watch import Backoff, deliver, diff_snapshots, resolve_version

logger = logging.getLogger(__name__)

PENDING_BLOB_TTL_S = 3600  # a blob written by a put that never committed expires after this


class RedisStore:
    """A `PrefixStore` on Redis (see the module docstring for the key layout)."""

    def __init__(self, url: str, *, prefix: str | None = None, keep_versions: int | str | None = None,
                 timeout: float | str | None = None, idle_ping_s: float = 5.0):
        self.conn = RedisConnection(url, prefix=prefix, timeout=timeout)  # shared with the backend's other stores
        self.url, self.prefix, self.timeout = self.conn.url, self.conn.prefix, self.conn.timeout
        self.keep_versions = max(1, int(keep_versions or store_options(url)[1].get("keep_versions")
                                        or DEFAULT_KEEP_VERSIONS))
        self.idle_ping_s = idle_ping_s
        self._client = self.conn.client
        self._scripts = {n: self.conn.script(getattr(redis_lua, n)) for n in ("PUT", "SET_VERSION", "DELETE", "GET")}
        self._channel = self.conn.key("events")

    def _key(self, *parts: str) -> str:
        return self.conn.key(*parts)

    async def _call(self, coro: Any) -> Any:
        return await self.conn.call(coro)

    async def _script(self, name: str, *args: Any) -> list[Any]:
        return await self.conn.run(self._scripts[name], *args)

    def _missing_blob(self, name: str, sha: str) -> StoreError:
        return StoreError(f"redis store {self.url}: blob {self._key('blob', sha)} of {name!r} (version {sha}) is "
                          "missing (evicted by maxmemory, or deleted); upload the prefix again")

    def _fail(self, name: str, status: bytes, value: bytes, expected: str | None = None) -> Exception:
        """The exception for a script's non-ok status."""
        v = value.decode() if value else None
        if status == b"conflict":
            return VersionConflict(name, expected or "", v)
        if status == b"noversion":
            return VersionNotFound(name, v or "")
        if status == b"noblob":
            return self._missing_blob(name, v or "")
        return PrefixNotFound(name)

    async def _resolve(self, name: str, version: str) -> str:
        """The full sha256 that `version` (full or a >= 7-digit prefix) names among `name`'s kept versions."""
        validate_version(version)
        if len(version) == 64:
            return version
        kept = [v.decode() for v in await self._call(self._client.hkeys(self._key("v", name)))]
        if not kept and not await self._call(self._client.hexists(self._key("alias"), name)):
            raise PrefixNotFound(name)
        return resolve_version(name, version, kept)

    # -- the PrefixStore interface --
    async def put(self, name: str, manifest: Manifest, tensors: bytes, *, expected_version: str | None = None,
                  created: float | None = None) -> Manifest:
        """Store a version (blob first, then one atomic script moves the alias) and return its manifest."""
        validate_task_name(name)
        blob = self._key("blob", manifest.sha256)
        for _ in range(3):  # the blob may be evicted or collected between the SET and the script: write again
            await self._call(self._client.set(blob, tensors, nx=True, ex=PENDING_BLOB_TTL_S))
            status, value = await self._script("PUT", name, manifest.sha256, manifest.to_json(),
                                               expected_version or "", self.keep_versions,
                                               "" if created is None else repr(float(created)))
            if status == b"ok":
                return Manifest.from_json(value)
            if status != b"noblob":
                raise self._fail(name, status, value, expected_version)
        raise self._missing_blob(name, manifest.sha256)

    async def get(self, name: str, version: str | None = None) -> tuple[Manifest, bytes]:
        """Manifest and tensors of `name` (current or pinned) read in one atomic script."""
        validate_task_name(name)
        sha = await self._resolve(name, version) if version else ""
        res = await self._script("GET", name, sha)
        if res[0] != b"ok":
            raise self._fail(name, res[0], res[1])
        return Manifest.from_json(res[1]), bytes(res[2])

    async def get_manifest(self, name: str, version: str | None = None) -> Manifest:
        """Manifest of `name` (current or pinned), one HGET."""
        validate_task_name(name)
        if version:
            sha = await self._resolve(name, version)
            raw = await self._call(self._client.hget(self._key("v", name), sha))
            if raw is None:
                raise VersionNotFound(name, version)
        else:
            raw = await self._call(self._client.hget(self._key("current"), name))
            if raw is None:
                raise PrefixNotFound(name)
        return Manifest.from_json(raw)

    async def list(self) -> dict[str, Manifest]:
        """All names with their current manifests (one HGETALL), sorted by name."""
        raw = await self._call(self._client.hgetall(self._key("current")))
        return {k.decode(): Manifest.from_json(v) for k, v in sorted(raw.items())}

    async def list_versions(self, name: str) -> list[VersionInfo]:
        """Kept versions of `name`, newest first."""
        validate_task_name(name)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.zrange(self._key("order", name), 0, -1, desc=True, withscores=True)
            pipe.hgetall(self._key("v", name))
            order, manifests = await self._call(pipe.execute())
        if not order:
            raise PrefixNotFound(name)
        return [VersionInfo(sha.decode(), Manifest.from_json(manifests[sha]), float(score))
                for sha, score in order if sha in manifests]

    async def set_version(self, name: str, version: str, *, expected_version: str | None = None) -> Manifest:
        """Point `name` at one of its kept versions (rollback)."""
        validate_task_name(name)
        sha = await self._resolve(name, version)
        status, value = await self._script("SET_VERSION", name, sha, expected_version or "")
        if status != b"ok":
            raise self._fail(name, status, value, expected_version)
        return Manifest.from_json(value)

    async def delete(self, name: str, *, expected_version: str | None = None) -> None:
        """Remove `name` and its versions (blobs other names keep stay)."""
        validate_task_name(name)
        status, value = await self._script("DELETE", name, expected_version or "")
        if status != b"ok":
            raise self._fail(name, status, value, expected_version)

    async def snapshot(self) -> dict[str, str]:
        """Every name with its current version (one HGETALL)."""
        raw = await self._call(self._client.hgetall(self._key("alias")))
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def watch(self, callback: EventCallback) -> None:
        """Deliver pub/sub events until cancelled; after each (re)subscribe, reconcile against a snapshot."""
        last: dict[str, str] | None = None
        backoff = Backoff()
        while True:
            pubsub = self._client.pubsub()
            try:
                await self._call(pubsub.subscribe(self._channel))
                snap = await self.snapshot()  # subscribed first: nothing between the two is missed
                for event in diff_snapshots(last, snap) if last is not None else []:
                    await deliver(callback, event)
                await deliver(callback, RESYNC)
                last = snap
                backoff.reset()
                await self._listen(pubsub, last, callback)
            except StoreError as e:
                logger.warning("%s; watch reconnecting", e)
            finally:
                try:
                    await asyncio.wait_for(pubsub.aclose(), self.timeout)
                except (RedisError, OSError, asyncio.TimeoutError):
                    pass
            await backoff.sleep()

    async def _listen(self, pubsub: Any, last: dict[str, str], callback: EventCallback) -> None:
        """Read events; ping when idle and give up (to reconnect) when nothing, not even a pong, comes back."""
        loop = asyncio.get_running_loop()
        seen = pinged = loop.time()
        while True:
            msg = await self._call(pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0))
            now = loop.time()
            if msg is not None:
                seen = now
                if msg.get("type") == "message":
                    try:
                        d = json.loads(msg["data"])
                        event = StoreEvent(d["name"], d.get("version"))
                    except (ValueError, KeyError, TypeError):
                        logger.warning("ignoring a malformed store event %r", msg["data"])
                        continue
                    if event.version is None:
                        last.pop(event.name, None)
                    else:
                        last[event.name] = event.version
                    await deliver(callback, event)
            elif now - seen > 3 * self.idle_ping_s:
                raise StoreUnavailable(f"redis store {self.url}: unreachable (no reply to PING in "
                                       f"{3 * self.idle_ping_s:.0f} s)")
            if now - max(seen, pinged) > self.idle_ping_s:
                pinged = now
                await self._call(pubsub.ping())

    async def health(self) -> dict[str, Any]:
        """PING and count the names; never raises."""
        try:
            await self._call(self._client.ping())
            n = await self._call(self._client.hlen(self._key("alias")))
        except StoreError as e:
            return {"ok": False, "detail": str(e)}
        return {"ok": True, "detail": f"redis store {self.url}: reachable, {n} tasks"}

    async def close(self) -> None:
        """Close the connection pool (the backend's key and counter stores share it)."""
        await self.conn.close()
