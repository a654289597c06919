"""A tenant using a shared task it has no own task of: the absence of its own name is remembered (no store read
per request), and never served to a request that starts after an upload of that name on any replica (the
namespace version every key lookup returns, bumped by the upload before it answers), nor after a store event
naming it or a RESYNC, nor remembered from a read that overlapped an event naming it (or a RESYNC)."""
from __future__ import annotations

import re
import signal
from pathlib import Path

import httpx
import pytest

from prefix_store.backend import open_backend
from prefix_store.base import RESYNC, PrefixNotFound, StoreEvent
from server.tenants.directory import TenantDirectory
from server.tenants.limits import Limits
from server.tiers.registry import TaskRegistry
from tests.api.conftest import peft_adapter, start_server, stop_server, upload
from tests.api.test_tenants import make_key
from tests.prefix_store.conftest import FP, art, backend, namespace, store, stores, tensors  # noqa: F401  (fixtures)
from tests.tiers.test_tiers import prefix_tiers

BODY = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 2}}


async def test_every_lookup_carries_the_namespace_version(stores, backend):
    d = TenantDirectory(stores.keys, Limits())
    alice, _, _ = await d.create_key("alice")
    bob, _, _ = await d.create_key("bob")
    assert (await d.authenticate(alice)).namespace_version == 0
    await d.namespace_changed("alice")
    await d.namespace_changed("alice")
    elsewhere = open_backend(backend)  # another process on the same store
    other = TenantDirectory(elsewhere.keys, Limits())
    assert (await other.authenticate(alice)).namespace_version == 2
    assert (await d.authenticate(alice)).namespace_version == 2
    assert (await other.authenticate(bob)).namespace_version == 0
    await elsewhere.close()


class CountedReads:
    """The store, counting manifest reads; `during_read` runs inside the next one (an event arriving meanwhile)."""

    def __init__(self, store):
        self.store, self.reads, self.during_read = store, 0, None

    async def get_manifest(self, name, version=None):
        self.reads += 1
        if self.during_read is not None:
            work, self.during_read = self.during_read, None
            await work()
        return await self.store.get_manifest(name, version)

    def __getattr__(self, name):
        return getattr(self.store, name)


async def test_remembered_absence_and_what_forgets_it(store):
    counted = CountedReads(store)
    reg = TaskRegistry(counted, prefix_tiers(2**20, 2**20), FP, 2**20)
    a = art(1)

    async def absent(name: str, version: int | None) -> bool:
        try:
            await reg.manifest(name, absent_as_of=version)
            return False
        except PrefixNotFound:
            return True

    assert await absent("alice~e2e", 0) and counted.reads == 1
    assert await absent("alice~e2e", 0) and counted.reads == 1 and reg.stats.absent_hits == 1  # no store read
    assert await absent("alice~e2e", None) and counted.reads == 2  # no version: always the store
    m = await store.put("alice~e2e", a.manifest, tensors(a))  # no event, no bump: only the version tells
    assert await absent("alice~e2e", 0)  # what the namespace version is for: requests of before the upload
    assert (await reg.manifest("alice~e2e", absent_as_of=1)).sha256 == m.sha256  # a request after it

    for name, forget in (("bob~e2e", lambda m: reg.on_event(StoreEvent("bob~e2e", m.sha256))),
                         ("carol~e2e", lambda m: reg.on_event(RESYNC))):
        assert await absent(name, 0)
        m = await store.put(name, a.manifest, tensors(a))
        await forget(m)
        assert (await reg.manifest(name, absent_as_of=0)).sha256 == m.sha256, name
    assert await absent("dave~e2e", 0)
    reg.remember("dave~e2e", m)  # an upload on this replica
    assert (await reg.manifest("dave~e2e", absent_as_of=0)) is m

    # a read that overlapped an event naming it (or RESYNC) is not remembered; one for another name does not matter
    for name, event, remembered in (("erin~e2e", StoreEvent("erin~e2e", None), False), ("fay~e2e", RESYNC, False),
                                    ("gus~e2e", StoreEvent("someone~else", None), True)):
        counted.during_read = lambda event=event: reg.on_event(event)
        reads = counted.reads
        assert await absent(name, 0) and await absent(name, 0)
        assert counted.reads == reads + (1 if remembered else 2), (name, event)
    m = await store.put("hal~e2e", a.manifest, tensors(a))
    counted.during_read = lambda: reg.on_event(StoreEvent("someone~else", None))
    reads = counted.reads
    assert (await reg.manifest("hal~e2e")) == m and (await reg.manifest("hal~e2e")) == m
    assert counted.reads == reads + 1  # mapped by the first read


def _map_lookups(c: httpx.Client) -> dict[str, float]:
    text = c.get("/metrics").text
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'^prefixserve_prefix_tier_lookups_total\{result="(\w+)",tier="map"\} (\S+)$', text, re.M)}


def _served(c: httpx.Client, task: str) -> str:
    r = c.post(f"/generate?task={task}", json=BODY)
    assert r.status_code == 200, r.text
    return r.headers["X-Prefix-Version"]


def test_upload_on_one_replica_is_used_at_once_on_the_other(model_dir, tmp_path: Path):
    """Two replicas on one disk store (whose watch polls, so its events come a moment late): alice's requests for
    shared tasks read no store for her own names, and her upload on replica a serves her next request on b."""
    store = tmp_path / "store"
    keys = {t: make_key(str(store), t, admin=t == "ops") for t in ("ops", "alice", "bob")}
    servers = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            servers.append(start_server(model_dir, tmp_path / name, store=str(store), max_seq_len=128))
        a, b = (s.client(headers={"Authorization": f"Bearer {keys['alice']}"}) for s in servers)
        with a, b, servers[0].client(headers={"Authorization": f"Bearer {keys['ops']}"}) as ops, \
                servers[1].client(headers={"Authorization": f"Bearer {keys['bob']}"}) as bob:
            for i in range(3):
                task = f"common{i}"
                shared = upload(ops, f"shared~{task}", peft_adapter(seed=10 + i)).json()["version"]
                assert _served(b, task) == shared
                before = _map_lookups(b)
                assert [_served(b, task) for _ in range(3)] == [shared] * 3
                after = _map_lookups(b)
                assert after["miss"] == before["miss"] and after["absent"] == before["absent"] + 3
                own = upload(a, task, peft_adapter(seed=20 + i))
                assert own.status_code == 201, own.text
                assert _served(b, task) == own.json()["version"]  # at once, not when b's watch polls
                assert _served(bob, task) == shared  # another tenant still gets the shared one
    finally:
        for s in servers:
            assert stop_server(s) in (0, -signal.SIGTERM), s.log.read_text()[-4000:]
