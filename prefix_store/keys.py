"""API keys and tenants, kept in the same backend as the prefixes (so every replica sees one set of keys).

Only a key's hash is stored (server/tenants/keys.py makes and checks keys); no device code, no engine imports.
This module holds the interface and the records; each backend implements it (prefix_store/disk_keys.py,
prefix_store/redis_keys.py), and `open_backend` (prefix_store/backend.py) opens the one beside its prefix store.

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

import json
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple, Protocol


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
