"""GET /replicas across two real servers sharing one store: each lists both replicas and which of the caller's
tasks each holds (another tenant's private task never shows), and a stopped replica leaves the list. Also the
prefix store's own metrics (every call timed) and /docs served offline."""
from __future__ import annotations

import re
import signal
import time

import httpx

from basemodel.model import load_model
from tests.api.conftest import native_files, start_server, stop_server, upload
from tests.api.test_tenants import make_key


def _held(client: httpx.Client) -> dict[str, tuple[list[str], list[str], bool]]:
    r = client.get("/replicas")
    assert r.status_code == 200, r.text
    return {x["name"]: (x["device"], x["host"], x["self"]) for x in r.json()["replicas"]}


def test_replicas_list_who_holds_what(model_dir, tmp_path):
    store = tmp_path / "shared-store"
    admin, alice, bob = (make_key(str(store), t, admin=t == "ops") for t in ("ops", "alice", "bob"))
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a = start_server(model_dir, tmp_path / "a", store=str(store), replica_name="replica-a")
    b = start_server(model_dir, tmp_path / "b", store=str(store), replica_name="replica-b")
    try:
        ha, hb = ({"Authorization": f"Bearer {k}"} for k in (alice, bob))
        base = load_model(str(model_dir)).spec.fingerprint()
        with a.client(headers={"Authorization": f"Bearer {admin}"}) as ops:
            up = upload(ops, "shared~pub", native_files(base, 1))
            assert up.status_code == 201, up.text
        with a.client(headers=ha) as ca, b.client(headers=ha) as cb, b.client(headers=hb) as bob_b:
            assert upload(ca, "secret", native_files(base, 2)).status_code == 201
            body = {"inputs": "hi", "parameters": {"max_new_tokens": 1}}
            assert ca.post("/generate?task=secret", json=body).status_code == 200
            assert ca.post("/generate?task=pub", json=body).status_code == 200
            held = _held(cb)  # asked on b, about a: published by a's heartbeat (every 5 s)
            deadline = time.monotonic() + 15
            while "secret" not in held["replica-a"][0] and time.monotonic() < deadline:
                time.sleep(0.25)
                held = _held(cb)
            assert held["replica-a"] == (["pub", "secret"], [], False) and held["replica-b"] == ([], [], True)
            assert cb.post("/generate?task=pub", json=body).status_code == 200
            assert _held(cb)["replica-b"] == (["pub"], [], True)  # this replica: as it is now
            seen_by_bob = _held(bob_b)
            assert seen_by_bob["replica-a"][0] == ["pub"]  # alice's own task is not bob's to see
            assert "secret" not in httpx.get(f"{b.url}/replicas", headers=hb).text
            metrics = ca.get("/metrics").text
            assert re.search(r'prefixserve_store_request_seconds_count\{op="put"\} [1-9]', metrics), metrics
            assert "prefixserve_max_batch_size " in metrics
        assert stop_server(b) in (0, -signal.SIGTERM)
        with a.client(headers=ha) as ca:
            assert set(_held(ca)) == {"replica-a"}  # b removed its record as it stopped
    finally:
        for s in (a, b):
            if s.proc.poll() is None:
                stop_server(s)


def test_docs_use_only_local_assets(http):
    page = http.get("/docs")
    assert page.status_code == 200 and "swagger-ui" in page.text
    assert not re.search(r"https?://", page.text), page.text  # no CDN, no favicon or validator elsewhere
    links = re.findall(r'(?:src|href)="([^"]+)"', page.text) + re.findall(r"url: '([^']+)'", page.text)
    assert len(links) == 4, links  # css, favicon, js, the schema
    for link in links:
        r = http.get(link)
        assert r.status_code == 200 and len(r.content) > 500, (link, r.status_code)
    assert http.get("/docs-assets/swagger-ui-bundle.js").headers["content-type"].startswith(("text/javascript",
                                                                                          "application/javascript"))
    assert http.get("/redoc").status_code == 404  # it would load from a CDN: not offered
