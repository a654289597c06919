"""Keys and tenants in each backend: hashed at rest, authenticated in constant-time comparison, revoked for every
process sharing the store by its next lookup."""
from __future__ import annotations

import json
import os
import stat

import pytest

from prefix_store.backend import Backend, open_backend
from server.tenants.directory import TenantDirectory, Unauthorized
from server.tenants.keys import key_hash, key_id, matches, new_key
from server.tenants.limits import Limits


def directory(stores: Backend, **kw) -> TenantDirectory:
    return TenantDirectory(stores.keys, Limits(requests_per_second=5, max_new_tokens=64), **kw)


def test_key_format_and_hash():
    key, record = new_key("alice", "ci")
    assert key_id(key) == record.id and record.tenant == "alice" and record.hash == key_hash(key)
    assert key not in record.to_json() and matches(key, record)
    assert not matches(key[:-1] + ("A" if key[-1] != "A" else "B"), record)
    assert key_id("psk_short_x") is None and key_id("Bearer " + key) is None
    assert new_key("alice")[0] != key  # random every time


async def test_auth_off_until_a_tenant_then_keys_are_checked(stores):
    d = directory(stores)
    assert not await d.enabled()
    anon = await d.authenticate(None)
    assert anon.tenant == "" and not anon.admin and anon.limits.requests_per_second == 5
    assert (await d.authenticate("sk-anything")).tenant == ""  # ignored while auth is off

    key, record, tenant = await d.create_key("alice")
    assert await d.enabled() and not tenant.admin
    caller = await d.authenticate(key)
    assert (caller.tenant, caller.admin, caller.key_id) == ("alice", False, record.id)
    for bad in (None, "", "psk_" + record.id + "_" + "x" * 43, key + "x", "garbage"):
        with pytest.raises(Unauthorized):
            await d.authenticate(bad or None)

    admin_key, _, ops = await d.create_key("ops", admin=True)
    assert ops.admin and (await d.authenticate(admin_key)).admin
    await d.update_tenant("alice", limits={"requests_per_second": 0.5, "max_new_tokens": 8})
    limits = (await d.authenticate(key)).limits
    assert (limits.requests_per_second, limits.max_new_tokens) == (0.5, 8)
    await d.update_tenant("alice", limits={"max_new_tokens": None})  # back to the default
    assert (await d.authenticate(key)).limits.max_new_tokens == 64
    with pytest.raises(ValueError, match="unknown limit"):
        await d.update_tenant("alice", limits={"tokens": 5})
    with pytest.raises(ValueError, match=">= 0"):
        await d.update_tenant("alice", limits={"prefixes": -1})
    with pytest.raises(ValueError, match="invalid tenant name"):
        await d.create_key("shared")

    assert {k.tenant for k in await d.list_keys()} == {"alice", "ops"}
    assert [t["name"] for t in await d.list_tenants()] == ["alice", "ops"]
    assert (await d.revoke(record.id)).tenant == "alice" and await d.revoke(record.id) is None
    with pytest.raises(Unauthorized):
        await d.authenticate(key)
    await d.revoke((await d.list_keys())[0].id)
    assert await d.enabled()  # tenants stay: revoking every key locks the server, it does not open it


async def test_revocation_reaches_another_process_at_once(backend):
    a, b = open_backend(backend), open_backend(backend)  # two replicas' views of one store
    try:
        da, db = directory(a), directory(b)
        key, record, _ = await da.create_key("alice")
        assert (await db.authenticate(key)).tenant == "alice"
        await da.revoke(record.id)
        with pytest.raises(Unauthorized):
            await db.authenticate(key)
    finally:
        await a.close()
        await b.close()


async def test_required_mode_needs_a_key_without_tenants(stores):
    d = directory(stores, mode="required")
    with pytest.raises(Unauthorized, match="missing API key"):
        await d.authenticate(None)
    with pytest.raises(ValueError, match="auth"):
        directory(stores, mode="off")


async def test_disk_file_holds_hashes_only(tmp_path):
    key, record, _ = await directory(open_backend(str(tmp_path / "s"))).create_key("alice", label="app")
    path = tmp_path / "s" / "auth.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    saved = json.loads(path.read_text())
    assert key not in path.read_text() and saved["keys"][record.id]["hash"] == key_hash(key)
    assert saved["tenants"]["alice"]["admin"] is False


async def test_store_outage_keeps_recent_keys_and_open_servers(redis_server):
    """Redis down: keys verified within STALE_KEY_S still pass (nobody can revoke meanwhile), others get the
    store's error (503), and a server whose store had no tenants stays open."""
    from prefix_store.base import StoreUnavailable
    from server.tenants.namespaces import Caller
    from server.tenants.quotas import Quotas

    redis = redis_server()
    with_keys, without = (open_backend(f"{redis.url}?prefix={p}&timeout=0.5") for p in ("on", "off"))
    try:
        d, open_d = directory(with_keys), directory(without)
        key, _, _ = await d.create_key("alice")
        other, _, _ = await d.create_key("bob")
        assert (await d.authenticate(key)).tenant == "alice" and (await open_d.authenticate(None)).tenant == ""
        redis.kill()
        assert (await d.authenticate(key)).tenant == "alice"
        with pytest.raises(StoreUnavailable):
            await d.authenticate(other)  # never verified by this replica
        with pytest.raises(StoreUnavailable):
            await d.authenticate(None)
        assert (await open_d.authenticate(None)).tenant == ""
        quotas = Quotas(with_keys.counters)  # rate and concurrency are not counted while unreachable
        limited = Caller("alice", False, Limits(requests_per_second=0.001, concurrent_requests=1,
                                                tokens_per_minute=10))
        await quotas.admit(limited)
        await quotas.admit(limited)
        async with quotas.slot(limited):
            assert await quotas.reserve_tokens(limited, 10) == 10
    finally:
        await with_keys.close()
        await without.close()
