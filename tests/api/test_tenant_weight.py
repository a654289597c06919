"""A tenant's fair-scheduling share weight is a per-tenant setting (`prefixserve tenants set NAME --limit weight=W`,
PATCH /admin/tenants/NAME) that reaches the engine's Request on every generation route; invalid weights are 4xx
(2 on the command line) naming the field. The app runs in this process (the real app, routes and engine; no
socket) so the requests the engine receives can be looked at."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx

from server.app import create_app
from server.engine.request import Request
from server.settings import Settings
from tests.api.test_tenants import make_key
from tests.api.test_tenants_auth import BODY, cli


async def _weights_seen(model_dir: Path, store: str, keys: dict[str, str]) -> dict[str, list[float]]:
    """Start the app on `store`, send generations as each key's tenant, return {tenant: [Request.weight, ...]}."""
    app = create_app(Settings(model=str(model_dir), store=store, max_seq_len=128, max_new_tokens_default=2))
    seen: list[Request] = []
    async with app.router.lifespan_context(app):
        engine = app.state.prefixserve.engine
        submit = engine.submit

        def spy(*args, **kw):
            handle = submit(*args, **kw)
            seen.append(handle.request)
            return handle

        engine.submit = spy
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://in-process", timeout=60) as c:
            for tenant, key in keys.items():
                auth = {"Authorization": f"Bearer {key}"}
                for path, body in (("/generate", BODY), ("/v1/completions", {"model": "tiny-gpt2", "prompt": "hi", "max_tokens": 2}),
                                   ("/generate_stream", BODY)):
                    r = await c.post(path, json=body, headers=auth)
                    assert r.status_code == 200, (tenant, path, r.text)
            ops = {"Authorization": f"Bearer {keys['ops']}"}
            for value in (0, -1, "abc", float("inf")):  # json.dumps writes inf as Infinity, which Python parses
                body = json.dumps({"limits": {"weight": value}})
                r = await c.patch("/admin/tenants/alice", headers={**ops, "Content-Type": "application/json"},
                                  content=body)
                assert r.status_code == 422 and "limits.weight" in r.json()["error"], (value, r.text)
            tenants = {t["name"]: t for t in (await c.get("/admin/tenants", headers=ops)).json()["tenants"]}
            assert tenants["alice"]["limits"]["weight"] == 2.5 and tenants["ops"]["limits"]["weight"] == 1.0
            r = await c.patch("/admin/tenants/alice", headers=ops, json={"limits": {"weight": None}})  # the default
            assert r.status_code == 200 and "weight" not in r.json()["overrides"]
            r = await c.post("/generate", json=BODY, headers={"Authorization": f"Bearer {keys['alice']}"})
            assert r.status_code == 200, r.text
    out: dict[str, list[float]] = {}
    for req in seen:
        out.setdefault(req.tenant, []).append(req.weight)
    return out


def test_tenant_weight_reaches_the_engine(model_dir, tmp_path):
    store = str(tmp_path / "store")
    keys = {t: make_key(store, t, admin=t == "ops") for t in ("ops", "alice", "bob")}
    done = cli("tenants", "set", "alice", "--limit", "weight=2.5", "--store", store)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["overrides"] == {"weight": 2.5}
    for bad, words in (("weight=0", "limits.weight: must be a number > 0"), ("weight=-2", "limits.weight"),
                       ("weight=abc", "weight: not a number"), ("weight=nan", "limits.weight")):
        done = cli("tenants", "set", "bob", "--limit", bad, "--store", store)
        assert done.returncode == 2 and words in done.stderr, (bad, done.stderr)
    done = cli("tenants", "set", "bob", "--limit", "weight=0.5", "--store", store)
    assert done.returncode == 0, done.stderr

    seen = asyncio.run(_weights_seen(model_dir, store, keys))
    assert seen == {"alice": [2.5, 2.5, 2.5, 1.0], "bob": [0.5] * 3, "ops": [1.0] * 3}, seen
