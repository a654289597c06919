"""The tenant directory: authenticate a presented key, and manage keys and tenants (the CLI and /admin use it).

Auth is on when the setting says `required`, or as soon as the store holds a tenant (one is created with its
first key and stays when keys are revoked, so revoking every key locks everyone out rather than opening the
server). Until then every request is the anonymous caller, who owns the shared namespace and is no admin.

While the store cannot be reached (Redis down), keys cannot be revoked either, so a key this replica verified in
the last STALE_KEY_S seconds is still accepted (and a server whose store had no tenants stays open); any other
request gets the store's 503. Cached tasks thus keep serving through a Redis outage, as without auth.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

from prefix_store.base import StoreUnavailable
from prefix_store.keys import KeyRecord, KeyStore, TenantRecord
from server.tenants.keys import key_hash, key_id, matches, new_key
from server.tenants.limits import LIMIT_NAMES, Limits, check_overrides
from server.tenants.namespaces import Caller, validate_tenant_name

logger = logging.getLogger(__name__)
AUTH_MODES = ("auto", "required")
STALE_KEY_S = 60.0  # while the store is unreachable, keys verified this recently are still accepted
RECENT_KEYS = 4096  # keys remembered for that (least recently verified dropped first)


class Unauthorized(Exception):
    """No key, or a key that is unknown, revoked or malformed (HTTP 401)."""


@dataclass
class TenantDirectory:
    """Keys and tenants in the store's backend, the default limits, and the auth mode."""

    keys: KeyStore
    defaults: Limits
    mode: str = "auto"
    _was_enabled: bool | None = field(default=None, init=False)  # auth state at the last store answer
    _recent: OrderedDict[str, tuple[Caller, float]] = field(default_factory=OrderedDict, init=False)

    def __post_init__(self) -> None:
        if self.mode not in AUTH_MODES:
            raise ValueError(f"auth: must be one of {', '.join(AUTH_MODES)}, got {self.mode!r}")

    @property
    def anonymous(self) -> Caller:
        """The caller of every request while auth is off."""
        return Caller("", False, self.defaults)

    def caller(self, tenant: TenantRecord, kid: str | None = None, namespace_version: int | None = None) -> Caller:
        """The Caller a tenant's key authenticates as."""
        return Caller(tenant.name, tenant.admin, self.defaults.with_overrides(tenant.limits), kid, namespace_version)

    async def enabled(self) -> bool:
        """Whether requests need a key now."""
        return self.mode == "required" or (await self.keys.lookup(None)).enabled

    async def authenticate(self, key: str | None) -> Caller:
        """The caller a presented key (None: none sent) stands for; Unauthorized when it does not do."""
        kid = key_id(key) if key else None
        try:
            found = await self.keys.lookup(kid)
        except StoreUnavailable as e:
            return self._while_unreachable(key, e)
        self._was_enabled = found.enabled or self.mode == "required"
        if not self._was_enabled:
            return self.anonymous  # auth off: any key a client sends anyway (OpenAI clients always do) is ignored
        if key is None:
            raise Unauthorized("missing API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'")
        if found.key is None or found.tenant is None or not matches(key, found.key):
            self._recent.pop(key_hash(key), None)
            raise Unauthorized("invalid API key (unknown, revoked or malformed)")
        caller = self.caller(found.tenant, kid, found.namespace_version)
        self._recent[key_hash(key)] = (caller, time.monotonic())
        self._recent.move_to_end(key_hash(key))
        if len(self._recent) > RECENT_KEYS:
            self._recent.popitem(last=False)
        return caller

    def _while_unreachable(self, key: str | None, error: StoreUnavailable) -> Caller:
        """The caller as last verified, while the store cannot answer (else the store's error: 503)."""
        if self._was_enabled is False:
            return self.anonymous
        seen = self._recent.get(key_hash(key)) if key else None
        if seen is not None and time.monotonic() - seen[1] < STALE_KEY_S:
            return replace(seen[0], namespace_version=None)  # not known now: remembered absences are not used
        raise error

    async def create_key(self, tenant: str, *, admin: bool = False, label: str = "") -> tuple[str, KeyRecord,
                                                                                             TenantRecord]:
        """A new key for `tenant` (created if new; `admin` makes it an admin). Returns (key, record, tenant)."""
        validate_tenant_name(tenant)
        record = await self.keys.get_tenant(tenant)
        if record is None or (admin and not record.admin):
            record = replace(record, admin=True) if record else TenantRecord(tenant, admin, {}, time.time())
            await self.keys.put_tenant(record)
        key, key_record = new_key(tenant, label)
        await self.keys.put_key(key_record)
        return key, key_record, record

    async def namespace_changed(self, tenant: str) -> None:
        """Record a write to `tenant`'s namespace: requests that start from now on carry its new version."""
        await self.keys.namespace_changed(tenant)

    async def revoke(self, kid: str) -> KeyRecord | None:
        """Remove a key (every replica refuses it from its next request); the removed record, or None."""
        return await self.keys.delete_key(kid)

    async def list_keys(self, tenant: str | None = None) -> list[KeyRecord]:
        """Key records (no hashes shown by callers), of one tenant or all."""
        return [k for k in await self.keys.list_keys() if tenant is None or k.tenant == tenant]

    async def list_tenants(self) -> list[dict[str, Any]]:
        """Every tenant with its admin flag, overrides, effective limits and number of keys."""
        keys = await self.keys.list_keys()
        out = []
        for t in await self.keys.list_tenants():
            limits = self.defaults.with_overrides(t.limits)
            out.append({"name": t.name, "admin": t.admin, "created": t.created, "overrides": t.limits,
                        "limits": limits.__dict__, "keys": sum(k.tenant == t.name for k in keys)})
        return out

    async def update_tenant(self, name: str, *, admin: bool | None = None,
                            limits: dict[str, Any] | None = None) -> TenantRecord:
        """Set a tenant's admin flag and limit overrides (None values remove an override); creates it if new."""
        validate_tenant_name(name)
        record = await self.keys.get_tenant(name) or TenantRecord(name, False, {}, time.time())
        overrides = dict(record.limits)
        for k, v in (limits or {}).items():
            if v is None and k in LIMIT_NAMES:
                overrides.pop(k, None)
            else:
                overrides.update(check_overrides({k: v}))
        record = replace(record, admin=record.admin if admin is None else admin, limits=overrides)
        await self.keys.put_tenant(record)
        return record
