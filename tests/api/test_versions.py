"""Versions over HTTP: list, rollback (POST and PUT ?version=), If-Match/ETag, NAME@VERSION pinning, /ready."""
from __future__ import annotations

import json

import pytest

from prefix_store.base import StoreError, StoreUnavailable, VersionConflict, VersionNotFound
from server.api.errors import to_api_error
from tests.api.conftest import native_files, peft_adapter, upload

BODY = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 3}}


@pytest.fixture(scope="module")
def base_model(server) -> dict:
    """The tiny model's fingerprint, as the server writes it into manifests."""
    with server.client() as c:
        r = upload(c, "ver-base", peft_adapter(seed=30))
        assert r.status_code in (200, 201), r.text
        return r.json()["manifest"]["base_model"]


def _two_versions(http, base_model, name: str) -> tuple[str, str]:
    v1 = upload(http, name, native_files(base_model, 1)).json()["version"]
    r = upload(http, name, native_files(base_model, 2))
    assert r.status_code == 200 and r.headers["ETag"] == f'"{r.json()["version"]}"'
    return v1, r.json()["version"]


def test_versions_list_and_rollback(http, base_model):
    v1, v2 = _two_versions(http, base_model, "ver-roll")
    body = http.get("/prefixes/ver-roll/versions").json()
    assert body["task"] == "ver-roll" and [v["version"] for v in body["versions"]] == [v2, v1]
    assert [v["current"] for v in body["versions"]] == [True, False]
    assert body["versions"][1]["manifest"]["sha256"] == v1 and body["versions"][0]["created"] > 0
    r = http.post("/prefixes/ver-roll/rollback", json={"version": v1[:12]})
    assert r.status_code == 200 and r.json()["version"] == v1 and r.headers["ETag"] == f'"{v1}"'
    assert http.post("/generate?task=ver-roll", json=BODY).headers["X-Prefix-Version"] == v1
    r = http.put(f"/prefixes/ver-roll?version={v2}")
    assert r.status_code == 200 and r.json()["version"] == v2
    assert http.post("/generate?task=ver-roll", json=BODY).headers["X-Prefix-Version"] == v2
    missing = http.post("/prefixes/ver-roll/rollback", json={"version": "0" * 64})
    assert missing.status_code == 404 and missing.json()["error_type"] == "not_found"
    assert http.post("/prefixes/ver-roll/rollback", json={"version": "xyz"}).status_code == 422
    assert http.get("/prefixes/no-such/versions").status_code == 404


def test_if_match(http, base_model):
    v1, v2 = _two_versions(http, base_model, "ver-match")
    stale = upload_with(http, "ver-match", native_files(base_model, 3), {"If-Match": f'"{v1}"'})
    assert stale.status_code == 412 and stale.json()["error_type"] == "precondition_failed"
    assert stale.headers["ETag"] == f'"{v2}"' and v2 in stale.json()["error"]
    ok = upload_with(http, "ver-match", native_files(base_model, 3), {"If-Match": f'W/"{v2}"'})
    assert ok.status_code == 200
    v3 = ok.json()["version"]
    assert http.post("/prefixes/ver-match/rollback", json={"version": v1}, headers={"If-Match": f'"{v2}"'}
                     ).status_code == 412
    assert http.delete("/prefixes/ver-match", headers={"If-Match": f'"{v1}"'}).status_code == 412
    assert http.delete("/prefixes/ver-match", headers={"If-Match": "nonsense"}).status_code == 422
    assert http.get("/prefixes/ver-match").headers["ETag"] == f'"{v3}"'
    assert http.delete("/prefixes/ver-match", headers={"If-Match": f'"{v3}"'}).status_code == 200
    absent = upload_with(http, "ver-match", native_files(base_model, 4), {"If-Match": "*"})
    assert absent.status_code == 412  # '*': the task must exist


def upload_with(http, name: str, files: dict[str, bytes], headers: dict[str, str]):
    """PUT /prefixes/NAME with extra headers."""
    parts = [("files", (n, data, "application/octet-stream")) for n, data in files.items()]
    return http.put(f"/prefixes/{name}", files=parts, headers=headers)


def test_pinned_versions_on_every_route(http, base_model):
    v1, v2 = _two_versions(http, base_model, "ver-pin")
    pin = f"ver-pin@{v1[:10]}"
    assert http.post(f"/generate?task={pin}", json=BODY).headers["X-Prefix-Version"] == v1
    assert http.post("/generate?task=ver-pin", json=BODY).headers["X-Prefix-Version"] == v2
    with http.stream("POST", f"/generate_stream?task={pin}", json=BODY) as s:
        assert s.status_code == 200 and s.headers["X-Prefix-Version"] == v1
        s.read()
    r = http.post("/", json={**BODY, "parameters": {**BODY["parameters"], "adapter_id": pin}})
    assert r.status_code == 200 and r.headers["X-Prefix-Version"] == v1
    r = http.post("/v1/completions", json={"model": pin, "prompt": "hello", "max_tokens": 2})
    assert r.status_code == 200 and r.headers["X-Prefix-Version"] == v1
    assert http.get(f"/prefixes/{pin}").json()["version"] == v1
    assert http.get(f"/prefixes/{pin}/download?file=manifest.json").headers["ETag"] == f'"{v1}"'
    gone = http.post(f"/generate?task=ver-pin@{'0' * 64}", json=BODY)
    assert gone.status_code == 404 and "no version" in gone.json()["error"]
    assert http.post("/generate?task=ver-pin@zz", json=BODY).status_code == 422
    metrics = http.get("/metrics").text
    assert 'prefixserve_prefix_tier_lookups_total{result="hit",tier="map"}' in metrics
    assert 'prefixserve_prefix_cold_load_seconds_count{tier="store"}' in metrics


def test_ready_reports_the_store(http):
    body = http.get("/ready").json()
    assert body["status"] == "ready" and body["store"]["ok"] is True and "disk store" in body["store"]["detail"]
    assert set(body["cached"]) == {"tasks", "device_prefixes", "host_prefixes"}


@pytest.mark.parametrize("exc, status, header", [
    (VersionConflict("t", "a" * 64, "b" * 64), 412, ("ETag", f'"{"b" * 64}"')),
    (StoreUnavailable("redis store redis://h:1/0: unreachable"), 503, ("Retry-After", "1")),
    (StoreError("disk store /x cannot be written (read-only)"), 503, ("Retry-After", "1")),
    (VersionNotFound("t", "abcdef0"), 404, None),
])
def test_store_errors_map_to_http(exc, status, header):
    err = to_api_error(exc)
    assert err.status == status
    if header:
        assert err.headers[header[0]] == header[1]
    if status == 503:
        assert "store" in err.message and json.dumps(err.message)
