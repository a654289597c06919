"""Two tenants and an admin on two real replicas sharing a Redis the test owns: namespaces keep every tenant's
private prefixes its own (404 on every cross-tenant path, nothing changed), shared tasks resolve after the
caller's own, admins reach everything, a revoked key fails at once on the other replica, metrics and the audit log
carry the tenant, and /metrics names tenants and their own tasks only where the operator asks (replica a: the
default labels behind a metrics key; replica b: every name, open)."""
from __future__ import annotations

import asyncio
import json
import re
import signal
import uuid
from dataclasses import dataclass
from typing import Iterator

import httpx
import pytest

from prefix_store.backend import open_backend
from server.tenants.directory import TenantDirectory
from server.tenants.limits import Limits
from tests.api.conftest import Server, error_of, native_files, peft_adapter, start_server, stop_server, upload
from tests.prefix_store.conftest import RedisServer

BODY = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 2}}
METRICS_KEY = "scrape-" + uuid.uuid4().hex
REPLICA_SETTINGS = {"a": {"metrics_key": METRICS_KEY},
                    "b": {"metrics_tenant_labels": "true", "metrics_task_labels": "all"}}


@dataclass
class Tenants:
    """The cluster and a client per caller (and replica)."""

    redis: RedisServer
    url: str
    a: Server
    b: Server
    keys: dict[str, str]
    base_model: dict

    def client(self, who: str, replica: str = "a") -> httpx.Client:
        """An httpx client on a replica with `who`'s key (alice and bob: tenants; ops: admin)."""
        server = self.a if replica == "a" else self.b
        return server.client(headers={"Authorization": f"Bearer {self.keys[who]}"})


def make_key(url: str, tenant: str, admin: bool = False) -> str:
    """Create a key straight in the store (what `prefixserve keys create` does)."""
    async def run() -> str:
        backend = open_backend(url)
        try:
            return (await TenantDirectory(backend.keys, Limits()).create_key(tenant, admin=admin))[0]
        finally:
            await backend.close()
    return asyncio.run(run())


@pytest.fixture(scope="module")
def tenants(model_dir, tmp_path_factory) -> Iterator[Tenants]:
    root = tmp_path_factory.mktemp("tenants")
    redis = RedisServer().start()
    url = f"{redis.url}?prefix=pstenants-{uuid.uuid4().hex[:8]}"
    keys = {"ops": make_key(url, "ops", admin=True)}
    servers: list[Server] = []
    try:
        for name in ("a", "b"):
            (root / name).mkdir()
            servers.append(start_server(model_dir, root / name, store=url, max_seq_len=128,
                                        max_new_tokens_default=2, **REPLICA_SETTINGS[name]))
        with servers[0].client(headers={"Authorization": f"Bearer {keys['ops']}"}) as ops:
            for who in ("alice", "bob"):
                r = ops.post("/admin/keys", json={"tenant": who})
                assert r.status_code == 201, r.text
                keys[who] = r.json()["key"]
            r = upload(ops, "shared~common", peft_adapter(seed=1))
            assert r.status_code == 201, r.text
        yield Tenants(redis, url, servers[0], servers[1], keys, r.json()["manifest"]["base_model"])
    finally:
        for s in servers:
            assert stop_server(s) in (0, -signal.SIGTERM), s.log.read_text()[-4000:]
        redis.kill()


def _everything(t: Tenants) -> dict[str, str]:
    """Every stored task and its current version, as the admin sees them."""
    with t.client("ops") as ops:
        return {p["task"]: p["version"] for p in ops.get("/prefixes").json()["prefixes"]}


def _served(c: httpx.Client, task: str) -> tuple[int, str | None]:
    r = c.post(f"/generate?task={task}", json=BODY)
    return r.status_code, r.headers.get("X-Prefix-Version")


def test_cross_tenant_paths_are_404_and_change_nothing(tenants):
    t = tenants
    with t.client("alice") as alice, t.client("bob", "b") as bob:
        secret = upload(alice, "secret", native_files(t.base_model, 10)).json()["version"]
        old = upload(alice, "secret", native_files(t.base_model, 11)).json()["version"]  # a second version
        assert upload(alice, "secret", native_files(t.base_model, 10)).status_code == 200
        assert alice.get("/prefixes/secret").json()["version"] == secret != old
        before = _everything(t)
        assert before["alice~secret"] == secret
        zero = {"inputs": "x", "parameters": {"max_new_tokens": 1}}
        for ref in ("secret", "alice~secret", f"secret@{secret}", f"alice~secret@{secret[:7]}"):
            name = ref.partition("@")[0]
            attempts = [
                bob.get(f"/prefixes/{ref}"), bob.get(f"/prefixes/{ref}/download"),
                bob.get(f"/prefixes/{ref}/download?file=prefix.safetensors"),
                bob.get(f"/prefixes/{name}/versions"), bob.delete(f"/prefixes/{name}"),
                bob.post(f"/prefixes/{name}/rollback", json={"version": old}),
                bob.put(f"/prefixes/{name}?version={old}"),
                bob.post(f"/generate?task={ref}", json=zero), bob.post(f"/generate_stream?task={ref}", json=zero),
                bob.post("/generate", json={"inputs": "x", "parameters": {"adapter_id": ref, "max_new_tokens": 1}}),
                bob.post(f"/?task={ref}", json=zero),
                bob.post("/v1/completions", json={"model": ref, "prompt": "x", "max_tokens": 1}),
                bob.post("/v1/chat/completions", json={"model": ref, "messages": [{"role": "user", "content": "x"}],
                                                       "max_tokens": 1}),
            ]
            if "~" in name:
                attempts.append(upload(bob, name, native_files(t.base_model, 12)))
            for r in attempts:
                assert r.status_code == 404, (ref, r.request.method, r.request.url, r.status_code, r.text)
                assert error_of(r)[1] == "not_found"
                body = r.request.content if r.request.method != "PUT" else b""  # uploads: random tensors
                sent = str(r.request.url) + body.decode(errors="ignore")
                for leak in (secret, old, "alice"):  # nothing of alice's that bob did not send himself
                    assert leak in sent or leak[:7] in sent or leak not in r.text, r.text
        assert all("secret" not in p["task"] for p in bob.get("/prefixes").json()["prefixes"])
        assert all("secret" not in m["id"] for m in bob.get("/v1/models").json()["data"])
        assert _everything(t) == before  # nothing changed
        assert _served(alice, "secret") == (200, secret)

        # bob's own `secret` is his: alice's stays as it was, each is served their own
        mine = upload(bob, "secret", native_files(t.base_model, 13))
        assert mine.status_code == 201 and mine.json()["task"] == "secret"
        assert _served(bob, "secret") == (200, mine.json()["version"])
        assert _served(alice, "secret") == (200, secret)
        assert bob.delete("/prefixes/secret").status_code == 200
        assert _everything(t) == before


def test_shared_tasks_resolve_after_the_callers_own(tenants):
    t = tenants
    with t.client("alice") as alice, t.client("bob", "b") as bob, t.client("ops", "b") as ops:
        common = ops.get("/prefixes/shared~common").json()["version"]
        for c in (alice, bob):
            assert _served(c, "common") == (200, common)
            assert "common" in {p["task"] for p in c.get("/prefixes").json()["prefixes"]}
            assert c.delete("/prefixes/common").status_code == 404  # a tenant cannot remove a shared task
            assert c.get("/prefixes/common/download?file=manifest.json").status_code == 200  # but can read it
        own = upload(alice, "common", native_files(t.base_model, 20)).json()["version"]  # alice's own shadows it
        assert _served(alice, "common") == (200, own)
        assert _served(bob, "common") == (200, common)
        assert ops.get("/prefixes/shared~common").json()["version"] == common
        assert alice.delete("/prefixes/common").json()["deleted"] == own  # her own, not the shared one
        assert _served(alice, "common") == (200, common)
        assert alice.put("/prefixes/shared~common").status_code == 404  # publishing is for admins


def test_admin_reaches_every_namespace(tenants):
    t = tenants
    with t.client("bob") as bob, t.client("ops", "b") as ops:
        v1 = upload(bob, "task", native_files(t.base_model, 30)).json()["version"]
        v2 = upload(bob, "task", native_files(t.base_model, 31)).json()["version"]
        listed = {p["task"] for p in ops.get("/prefixes").json()["prefixes"]}
        assert {"bob~task", "common"} <= listed and "task" not in listed
        assert {m["id"] for m in ops.get("/v1/models").json()["data"]} >= {"bob~task", "common"}
        assert ops.get("/prefixes/bob~task").json()["version"] == v2
        assert ops.get(f"/prefixes/bob~task@{v1[:8]}/download").status_code == 200
        assert _served(ops, "bob~task") == (200, v2)
        r = ops.post("/v1/completions", json={"model": "bob~task", "prompt": "x", "max_tokens": 1})
        assert r.status_code == 200 and r.headers["X-Prefix-Version"] == v2
        assert ops.post("/prefixes/bob~task/rollback", json={"version": v1}).json()["version"] == v1
        assert bob.get("/prefixes/task").json()["version"] == v1
        assert ops.get("/prefixes/task").status_code == 404  # the admin's own namespace has no `task`
        assert ops.delete("/prefixes/bob~task").json()["deleted"] == v1
        assert bob.get("/prefixes/task").status_code == 404
        assert ops.get("/prefixes/nobody~task").status_code == 404
        assert ops.get("/prefixes/Bad~task").status_code == 422


def test_revoked_key_fails_at_once_on_every_replica(tenants):
    t = tenants
    with t.client("ops") as ops:
        r = ops.post("/admin/keys", json={"tenant": "carol"}).json()
    key, kid = r["key"], r["id"]
    with t.a.client(headers={"X-API-Key": key}) as on_a, t.b.client(headers={"X-API-Key": key}) as on_b:
        assert on_a.get("/prefixes").status_code == 200 and on_b.get("/prefixes").status_code == 200
        with t.client("ops") as ops:
            assert ops.delete(f"/admin/keys/{kid}").status_code == 200
        assert on_b.get("/prefixes").status_code == 401  # the other replica, no wait
        assert on_a.post("/generate", json=BODY).status_code == 401


def _audit(server: Server) -> list[dict]:
    return [json.loads(line.split("prefixserve.audit: ", 1)[1]) for line in server.log.read_text().splitlines()
            if "prefixserve.audit: " in line]


def _labels(metrics: str, name: str) -> list[set[str]]:
    return [set(re.findall(r'\w+="[^"]*"', x)) for x in metrics.splitlines() if x.startswith(name + "{")]


def test_metrics_name_tenants_and_their_tasks_only_where_asked(tenants):
    t = tenants
    with t.client("alice") as alice, t.client("alice", "b") as alice_b:
        assert upload(alice, "hidden-task", native_files(t.base_model, 30)).status_code == 201
        for c in (alice, alice_b):
            assert _served(c, "hidden-task")[0] == 200 and _served(c, "common")[0] == 200
        assert alice.get("/metrics").status_code == 401  # a tenant's key is not enough
    with t.a.client() as anyone:
        refused = anyone.get("/metrics")
        assert refused.status_code == 401 and "metrics key" in refused.json()["error"]
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
        assert anyone.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        scraped = anyone.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})
        assert scraped.status_code == 200
        by_admin = anyone.get("/metrics", headers={"X-API-Key": t.keys["ops"]})
        assert by_admin.status_code == 200
    for text in (scraped.text, by_admin.text):
        assert "hidden-task" not in text and "alice" not in text and "bob" not in text
        series = _labels(text, "prefixserve_requests_total")
        assert {'task=":private"', 'tenant=":tenant"'} <= set().union(*series)
        assert any({'task="common"', 'tenant=":tenant"'} <= x for x in series), series
    with t.b.client() as anyone:  # b names everything, as its operator asked (and warns that it is open)
        named = _labels(anyone.get("/metrics").text, "prefixserve_requests_total")
    assert any({'task="hidden-task"', 'tenant="alice"'} <= x for x in named), named
    assert "/metrics names tenants or their own tasks and needs no key" in t.b.log.read_text()
    assert "needs no key" not in t.a.log.read_text()


def test_metrics_logs_and_audit_carry_the_tenant(tenants):
    t = tenants
    with t.client("alice", "b") as alice:
        assert _served(alice, "common")[0] == 200
        metrics = alice.get("/metrics").text
    with t.client("alice") as alice:
        v1 = upload(alice, "audited", native_files(t.base_model, 40)).json()["version"]
        v2 = upload(alice, "audited", native_files(t.base_model, 41)).json()["version"]
        assert alice.post("/prefixes/audited/rollback", json={"version": v1}).status_code == 200
        assert alice.delete("/prefixes/audited").status_code == 200
    series = [set(re.findall(r'\w+="[^"]*"', x)) for x in metrics.splitlines()
              if x.startswith("prefixserve_requests_total{")]
    assert {'task="common"', 'tenant="alice"', 'route="generate"'} in [x - {'finish_reason="length"'}
                                                                       for x in series], series
    assert "tenant=alice task=common route=generate" in t.b.log.read_text()
    events = [(e["event"], e.get("version"), e.get("previous")) for e in _audit(t.a)
              if e.get("task") == "audited"]
    assert events == [("prefix.put", v1, None), ("prefix.put", v2, v1), ("prefix.rollback", v1, None),
                      ("prefix.delete", v1, None)]
    for e in _audit(t.a):
        assert e["time"] and e["client"] == "127.0.0.1" and e["tenant"] in ("ops", "alice", "bob")
    created = [e for e in _audit(t.a) if e["event"] == "key.create"]
    assert {e["key_tenant"] for e in created} >= {"alice", "bob"} and all(e["tenant"] == "ops" for e in created)
