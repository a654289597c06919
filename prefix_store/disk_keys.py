"""The disk backend's key store: tenants and hashed API keys in ROOT/auth.json beside the prefixes (the layout and
the guarantees are in prefix_store/keys.py)."""
from __future__ import annotations

import asyncio
import json
import os
import threading
from dataclasses import asdict
from typing import Any

from prefix_store.base import StoreError
from prefix_store.disk import DiskStore, atomic_write, write_error
from prefix_store.keys import KeyRecord, Lookup, TenantRecord


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
        with self._store.locked():
            self._seen = None  # read the file as it is now, not as cached
            data = {k: dict(v) for k, v in self._read().items()}
            out = apply(data)
            try:
                atomic_write(self.path, json.dumps(data, sort_keys=True, indent=1).encode())
            except OSError as e:
                raise write_error(self.root, e) from None
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
