"""Which replicas are up and which prefixes each holds, shared through the backend every replica already uses.

Each replica publishes its own record (a heartbeat) every few seconds and removes it on shutdown; a record that
was not renewed within `stale_s` is left out of listings (and dropped), so a replica that died disappears too.

    disk:   ROOT/replicas/<id>.json
    Redis:  P:replicas   hash id -> the record's JSON
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from prefix_store.base import StoreError

STALE_S = 15.0  # three missed heartbeats of the server's default 5 s


@dataclass
class ReplicaRecord:
    """One replica as it last said: who, since when, and the prefixes (stored name -> version) in its tiers."""

    id: str
    name: str
    started: float
    seen: float = 0.0
    device: dict[str, str] = field(default_factory=dict)  # on the model's device
    host: dict[str, str] = field(default_factory=dict)  # parsed in host memory (not also on the device)

    def to_json(self) -> str:
        """The record as stored."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, data: str | bytes) -> ReplicaRecord | None:
        """A stored record; None for one that does not parse (written by another version, or damaged)."""
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None


class Replicas(Protocol):
    """The backend's registry of live replicas. Contract: `publish` replaces the replica's own record (setting
    `seen` to now), `list` returns the records renewed within `stale_s`, `remove` deletes one; StoreError on
    backend failure."""

    async def publish(self, record: ReplicaRecord) -> None:
        """Write (or renew) `record`."""
        ...

    async def list(self) -> list[ReplicaRecord]:
        """The live records, by name."""
        ...

    async def remove(self, replica_id: str) -> None:
        """Delete a replica's record (on its shutdown)."""
        ...


def _live(records: list[ReplicaRecord | None], stale_s: float) -> tuple[list[ReplicaRecord], list[str]]:
    """(live records by name, ids of stale ones)."""
    now = time.time()
    live = [r for r in records if r is not None and now - r.seen <= stale_s]
    stale = [r.id for r in records if r is not None and now - r.seen > stale_s]
    return sorted(live, key=lambda r: (r.name, r.id)), stale


class DiskReplicas:
    """Records as files in ROOT/replicas (replicas sharing a directory see each other)."""

    def __init__(self, root: Path, stale_s: float = STALE_S):
        self.dir, self.stale_s = Path(root) / "replicas", stale_s

    def _path(self, replica_id: str) -> Path:
        if not replica_id.isalnum():
            raise ValueError(f"replica id {replica_id!r}: letters and digits only")
        return self.dir / f"{replica_id}.json"

    async def publish(self, record: ReplicaRecord) -> None:
        """Write ROOT/replicas/<id>.json (atomically: readers never see half a record)."""
        from prefix_store.disk import atomic_write, write_error

        record.seen = time.time()
        try:
            await asyncio.to_thread(self.dir.mkdir, parents=True, exist_ok=True)
            await asyncio.to_thread(atomic_write, self._path(record.id), record.to_json().encode(), sync=False)
        except OSError as e:
            raise write_error(self.dir, e) from None

    async def list(self) -> list[ReplicaRecord]:
        """Read every record; stale ones are deleted."""
        def read() -> list[ReplicaRecord | None]:
            out = []
            for p in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []:
                try:
                    out.append(ReplicaRecord.from_json(p.read_bytes()))
                except FileNotFoundError:  # removed meanwhile
                    continue
            return out
        try:
            live, stale = _live(await asyncio.to_thread(read), self.stale_s)
        except OSError as e:
            raise StoreError(f"disk store {self.dir}: cannot read the replica records: {e.strerror}") from None
        for replica_id in stale:
            await self.remove(replica_id)
        return live

    async def remove(self, replica_id: str) -> None:
        """Delete the record's file (absent: nothing to do)."""
        try:
            await asyncio.to_thread(self._path(replica_id).unlink, missing_ok=True)
        except OSError:
            pass  # a read-only store keeps it until it goes stale


class RedisReplicas:
    """Records in the hash P:replicas on the backend's connection."""

    def __init__(self, conn: Any, stale_s: float = STALE_S):
        self.conn, self.stale_s = conn, stale_s
        self.key = conn.key("replicas")

    async def publish(self, record: ReplicaRecord) -> None:
        """HSET the record."""
        record.seen = time.time()
        await self.conn.call(self.conn.client.hset(self.key, record.id, record.to_json()))

    async def list(self) -> list[ReplicaRecord]:
        """HGETALL; stale records are HDELed."""
        raw = await self.conn.call(self.conn.client.hgetall(self.key))
        live, stale = _live([ReplicaRecord.from_json(v) for v in raw.values()], self.stale_s)
        if stale:
            await self.conn.call(self.conn.client.hdel(self.key, *stale))
        return live

    async def remove(self, replica_id: str) -> None:
        """HDEL the record."""
        await self.conn.call(self.conn.client.hdel(self.key, replica_id))
