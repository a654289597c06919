"""API keys and tenants, kept in the same backend as the prefixes (so every replica sees one set of keys).

Only a key's hash is stored (server/tenants/keys.py makes and checks keys); no device code, no engine imports.

    disk:   ROOT/auth.json      {"tenants": {name: record}, "keys": {id: record}, "namespaces": {name: n}},
                                replaced by one atomic rename (mode 0600) under the store's writer lock; readers
                                re-read it when its inode, size or mtime changes, so a revocation by any process
                                is seen by the next request
    Redis:  P:auth:tenants      hash  tenant name -> record JSON
            P:auth:keys         hash  key id -> record JSON (id, tenant, sha256 of the key, created, label)
            P:auth:namespaces   hash  tenant name -> namespace version (HINCRBY)

`lookup(key_id)` answers in one read (one Lua script on Redis, a stat on disk): whether auth is enabled (a tenant
exists), the key's record, its tenant's record and the version of its tenant's namespace. Nothing is cached across
requests on Redis, so a revoked key stops working on every replica at once. The namespace version is a counter
the server bumps after every upload into that namespace (`namespace_changed`), so a request that starts after an
upload has returned knows, without another read, that what it remembers as absent there may exist now.
"""
from __future__ import annotations

import asyncio
import json
import os
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple, Protocol

from prefix_store.base import PrefixStore, StoreError
from prefix_store.disk import DiskStore, _atomic_write, _write_error


@dataclass
class TenantRecord:
    """A tenant: its name, whether it administers the server, and its quota overrides (absent: the defaults)."""

    name: str
    admin: bool = False
    limits: dict[str, float] = field(default_factory=dict)
    created: float = 0.0

    def to_json(self) -> str:
        """Compact JSON of the record."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes | dict) -> TenantRecord:
        """Parse a stored record."""
        d = raw if isinstance(raw, dict) else json.loads(raw)
        return cls(str(d["name"]), bool(d.get("admin", False)), dict(d.get("limits") or {}),
                   float(d.get("created", 0.0)))


@dataclass
class KeyRecord:
    """A key as stored: its public id, its tenant, the sha256 of the whole key (never the key), a label."""

    id: str
    tenant: str
    hash: str
    created: float
    label: str = ""

    def to_json(self) -> str:
        """Compact JSON of the record."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes | dict) -> KeyRecord:
        """Parse a stored record."""
        d = raw if isinstance(raw, dict) else json.loads(raw)
        return cls(str(d["id"]), str(d["tenant"]), str(d["hash"]), float(d["created"]), str(d.get("label", "")))

    def public(self) -> dict[str, Any]:
        """The record without its hash (what listings show)."""
        return {"id": self.id, "tenant": self.tenant, "created": self.created, "label": self.label}


class Lookup(NamedTuple):
    """One authentication read: auth enabled (some tenant exists), the key's record, its tenant's record, the
    version of its tenant's namespace (0 before the first `namespace_changed`)."""

    enabled: bool
    key: KeyRecord | None
    tenant: TenantRecord | None
    namespace_version: int = 0


class KeyStore(Protocol):
    """Tenants and hashed API keys in a prefix store's backend.

    Contract: every write is atomic and visible to every process sharing the backend by the next `lookup`
    (no cross-request caching that a change could outlive); failures raise StoreError (StoreUnavailable when the
    backend cannot be reached), within bounded time.
    """

    url: str

    async def lookup(self, key_id: str | None) -> Lookup:
        """Whether auth is enabled, and the key `key_id` with its tenant (None, None when unknown)."""
        ...

    async def get_tenant(self, name: str) -> TenantRecord | None:
        """The tenant `name`, or None."""
        ...

    async def put_tenant(self, tenant: TenantRecord) -> None:
        """Create or replace a tenant record."""
        ...

    async def list_tenants(self) -> list[TenantRecord]:
        """Every tenant, by name."""
        ...

    async def put_key(self, key: KeyRecord) -> None:
        """Store a new key record (its tenant must exist)."""
        ...

    async def delete_key(self, key_id: str) -> KeyRecord | None:
        """Remove a key (revocation); the removed record, or None if there was none."""
        ...

    async def list_keys(self) -> list[KeyRecord]:
        """Every key record, oldest first."""
        ...

    async def namespace_changed(self, tenant: str) -> None:
        """Bump the version of `tenant`'s namespace (after a write to it); every later `lookup` of its keys, on
        every process, returns the new version."""
        ...


class DiskKeyStore:
    """Keys and tenants in ROOT/auth.json next to a disk store's prefixes (see the module docstring)."""

    def __init__(self, store: DiskStore):
        self._store = store  # its writer lock guards auth.json too
        self.root = store.root
        self.url = store.url
        self.path = self.root / "auth.json"
        self._seen: tuple[int, int, int] | None = None
        self._data: dict[str, dict[str, Any]] = {"tenants": {}, "keys": {}, "namespaces": {}}
        self._mutex = threading.Lock()

    def _read(self) -> dict[str, dict[str, Any]]:
        """The current file's contents, re-read only when the file changed (inode, size or mtime)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return {"tenants": {}, "keys": {}, "namespaces": {}}
        except OSError as e:
            raise StoreError(f"disk key store {self.path}: {e.strerror}") from None
        sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._mutex:
            if sig != self._seen:
                try:
                    data = json.loads(self.path.read_bytes())
                except (OSError, ValueError) as e:
                    raise StoreError(f"disk key store {self.path}: unreadable ({e})") from None
                self._data = {part: dict(data.get(part, {})) for part in ("tenants", "keys", "namespaces")}
                self._seen = sig
            return self._data

    def _change(self, apply) -> Any:
        """Read, apply `apply(data)` and write back atomically under the lock; return what `apply` returned."""
        with self._store._locked():
            self._seen = None  # read the file as it is now, not as cached
            data = {k: dict(v) for k, v in self._read().items()}
            out = apply(data)
            try:
                _atomic_write(self.path, json.dumps(data, sort_keys=True, indent=1).encode())
            except OSError as e:
                raise _write_error(self.root, e) from None
            return out

    async def lookup(self, key_id: str | None) -> Lookup:
        """One stat (and a re-read when the file changed)."""
        data = self._read()
        key = data["keys"].get(key_id) if key_id else None
        if key is None:
            return Lookup(bool(data["tenants"]), None, None)
        tenant = data["tenants"].get(key["tenant"])
        return Lookup(True, KeyRecord.from_json(key), TenantRecord.from_json(tenant) if tenant else None,
                      int(data["namespaces"].get(key["tenant"], 0)))

    async def get_tenant(self, name: str) -> TenantRecord | None:
        """The tenant `name`, or None."""
        raw = self._read()["tenants"].get(name)
        return TenantRecord.from_json(raw) if raw else None

    async def put_tenant(self, tenant: TenantRecord) -> None:
        """Create or replace a tenant record."""
        await asyncio.to_thread(self._change, lambda d: d["tenants"].__setitem__(tenant.name, asdict(tenant)))

    async def list_tenants(self) -> list[TenantRecord]:
        """Every tenant, by name."""
        return [TenantRecord.from_json(t) for _, t in sorted(self._read()["tenants"].items())]

    async def put_key(self, key: KeyRecord) -> None:
        """Store a new key record."""
        await asyncio.to_thread(self._change, lambda d: d["keys"].__setitem__(key.id, asdict(key)))

    async def delete_key(self, key_id: str) -> KeyRecord | None:
        """Remove a key; the removed record or None."""
        raw = await asyncio.to_thread(self._change, lambda d: d["keys"].pop(key_id, None))
        return KeyRecord.from_json(raw) if raw else None

    async def list_keys(self) -> list[KeyRecord]:
        """Every key record, oldest first."""
        return sorted((KeyRecord.from_json(k) for k in self._read()["keys"].values()), key=lambda k: k.created)

    async def namespace_changed(self, tenant: str) -> None:
        """One more in auth.json's namespace versions."""
        def bump(d: dict[str, dict[str, Any]]) -> None:
            d["namespaces"][tenant] = int(d["namespaces"].get(tenant, 0)) + 1

        await asyncio.to_thread(self._change, bump)


# ARGV: prefix, key id ('' = none). Returns {number of tenants, key JSON | nil, tenant JSON | nil, namespace
# version | nil}.
LOOKUP = """
local p, id = ARGV[1], ARGV[2]
local n = redis.call('HLEN', p..':auth:tenants')
if id == '' then return {n} end
local k = redis.call('HGET', p..':auth:keys', id)
if not k then return {n} end
local t = cjson.decode(k)['tenant']
return {n, k, redis.call('HGET', p..':auth:tenants', t), redis.call('HGET', p..':auth:namespaces', t)}
"""


class RedisKeyStore:
    """Keys and tenants in Redis, on the prefix store's own connection pool (see the module docstring)."""

    def __init__(self, store: Any):
        self._store = store  # a RedisStore: its client, key names and error mapping are shared
        self.url = store.url
        self._tenants, self._keys = store._key("auth", "tenants"), store._key("auth", "keys")
        self._namespaces = store._key("auth", "namespaces")
        self._lookup = store._client.register_script(LOOKUP)

    def _call(self, coro: Any) -> Any:
        return self._store._call(coro)

    async def lookup(self, key_id: str | None) -> Lookup:
        """One Lua script: tenant count, key record, tenant record."""
        res = await self._call(self._lookup(args=[self._store.prefix, key_id or ""]))
        key = KeyRecord.from_json(res[1]) if len(res) > 1 and res[1] else None
        tenant = TenantRecord.from_json(res[2]) if len(res) > 2 and res[2] else None
        version = int(res[3]) if len(res) > 3 and res[3] else 0
        return Lookup(int(res[0]) > 0, key, tenant, version)

    async def get_tenant(self, name: str) -> TenantRecord | None:
        """The tenant `name`, or None."""
        raw = await self._call(self._store._client.hget(self._tenants, name))
        return TenantRecord.from_json(raw) if raw else None

    async def put_tenant(self, tenant: TenantRecord) -> None:
        """Create or replace a tenant record."""
        await self._call(self._store._client.hset(self._tenants, tenant.name, tenant.to_json()))

    async def list_tenants(self) -> list[TenantRecord]:
        """Every tenant, by name."""
        raw = await self._call(self._store._client.hgetall(self._tenants))
        return [TenantRecord.from_json(v) for _, v in sorted(raw.items())]

    async def put_key(self, key: KeyRecord) -> None:
        """Store a new key record."""
        await self._call(self._store._client.hset(self._keys, key.id, key.to_json()))

    async def delete_key(self, key_id: str) -> KeyRecord | None:
        """Remove a key atomically (HGET + HDEL in one transaction); the removed record or None."""
        async with self._store._client.pipeline(transaction=True) as pipe:
            pipe.hget(self._keys, key_id)
            pipe.hdel(self._keys, key_id)
            raw, _ = await self._call(pipe.execute())
        return KeyRecord.from_json(raw) if raw else None

    async def list_keys(self) -> list[KeyRecord]:
        """Every key record, oldest first."""
        raw = await self._call(self._store._client.hgetall(self._keys))
        return sorted((KeyRecord.from_json(v) for v in raw.values()), key=lambda k: k.created)

    async def namespace_changed(self, tenant: str) -> None:
        """HINCRBY, atomic across replicas."""
        await self._call(self._store._client.hincrby(self._namespaces, tenant, 1))


def open_key_store(store: PrefixStore) -> KeyStore:
    """The key store living in the same backend as `store` (disk directory or Redis namespace)."""
    if isinstance(store, DiskStore):
        return DiskKeyStore(store)
    from prefix_store.redis import RedisStore

    if isinstance(store, RedisStore):
        return RedisKeyStore(store)
    raise StoreError(f"store {store.url} has no key storage")
