"""API keys on one real server with a disk store: auth off until the first key, then 401 without a valid key,
both headers accepted, open health routes, admin routes 403 for non-admins, revocation and the CLI contract."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.api.conftest import Server, error_of, read_until_closed, start_server, stop_server
from tests.api.test_tenants import make_key

ROOT = Path(__file__).resolve().parents[2]
BODY = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 2}}


def cli(*args: str) -> subprocess.CompletedProcess:
    """Run `prefixserve ARGS` (the real command line) and return the finished process."""
    return subprocess.run([sys.executable, "-m", "prefixserve.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def bearer(key: str) -> dict[str, str]:
    """The Authorization header for a key."""
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def open_server(model_dir, tmp_path_factory) -> Iterator[Server]:
    """A server on a store without keys (auth off), max_new_tokens default 2."""
    s = start_server(model_dir, tmp_path_factory.mktemp("auth"), max_seq_len=128, max_new_tokens_default=2)
    yield s
    assert stop_server(s) in (0, -signal.SIGTERM), s.log.read_text()[-4000:]


def test_auth_off_then_on_with_the_first_key(open_server):
    s = open_server
    assert "AUTH IS OFF" in s.log.read_text()
    with s.client() as c:
        assert c.post("/generate", json=BODY).status_code == 200
        assert c.post("/generate", json=BODY, headers=bearer("sk-anything")).status_code == 200  # ignored when off
        r = c.get("/admin/keys")  # the anonymous caller is no admin, and is told how to become one
        assert r.status_code == 403 and "auth is off" in r.json()["error"] and "--admin" in r.json()["error"], r.text

        done = cli("keys", "create", "--tenant", "ops", "--admin", "--label", "test", "--store", str(s.store))
        assert done.returncode == 0, done.stderr
        admin_key = done.stdout.strip().splitlines()[-1]  # the key alone on the last line
        assert admin_key.startswith("psk_") and " " not in admin_key
        assert admin_key not in (s.store / "auth.json").read_text()  # only its hash is stored
        audit = [json.loads(line.split("prefixserve.audit: ", 1)[1]) for line in done.stderr.splitlines()
                 if "prefixserve.audit" in line]
        assert audit and audit[0]["event"] == "key.create" and audit[0]["key_tenant"] == "ops"

        r = c.post("/generate", json=BODY)  # the next request needs a key
        assert r.status_code == 401 and r.json()["error_type"] == "unauthorized"
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert c.post("/generate", json=BODY, headers=bearer("psk_000000000000_" + "x" * 43)).status_code == 401
        tampered = admin_key[:-1] + ("A" if admin_key[-1] != "A" else "B")  # never the key itself
        assert c.post("/generate", json=BODY, headers=bearer(tampered)).status_code == 401
        assert c.post("/generate", json=BODY, headers=bearer(admin_key)).status_code == 200
        assert c.post("/generate", json=BODY, headers={"X-API-Key": admin_key}).status_code == 200
        for path in ("/health", "/ready", "/metrics", "/openapi.json", "/docs"):
            assert c.get(path).status_code == 200, path

        r = c.post("/admin/keys", json={"tenant": "alice", "label": "alice's app"}, headers=bearer(admin_key))
        assert r.status_code == 201, r.text
        alice = r.json()
        assert alice["tenant"] == "alice" and not alice["admin"]
        assert c.post("/generate", json=BODY, headers=bearer(alice["key"])).status_code == 200
        for method, path in (("GET", "/admin/keys"), ("GET", "/admin/tenants"), ("POST", "/admin/keys"),
                             ("DELETE", f"/admin/keys/{alice['id']}"), ("PATCH", "/admin/tenants/alice")):
            r = c.request(method, path, json={"tenant": "alice", "admin": True}, headers=bearer(alice["key"]))
            assert r.status_code == 403, (path, r.text)
            assert r.json() == {"error": "admin routes need an admin API key: this key's tenant 'alice' is not an "
                                         "admin", "error_type": "forbidden"}, (path, r.text)

        listed = c.get("/admin/keys", headers=bearer(admin_key)).json()["keys"]
        assert {k["tenant"] for k in listed} == {"ops", "alice"} and all("hash" not in k for k in listed)
        tenants = {t["name"]: t for t in c.get("/admin/tenants", headers=bearer(admin_key)).json()["tenants"]}
        assert tenants["ops"]["admin"] and not tenants["alice"]["admin"] and tenants["alice"]["keys"] == 1

        assert c.delete(f"/admin/keys/{alice['id']}", headers=bearer(admin_key)).json()["tenant"] == "alice"
        assert c.post("/generate", json=BODY, headers=bearer(alice["key"])).status_code == 401
        assert c.delete(f"/admin/keys/{alice['id']}", headers=bearer(admin_key)).status_code == 404

        done = cli("keys", "revoke", admin_key, "--store", str(s.store))  # by the key itself
        assert done.returncode == 0, done.stderr
        assert c.post("/generate", json=BODY, headers=bearer(admin_key)).status_code == 401
        assert c.post("/generate", json=BODY).status_code == 401  # no keys left: still on (the tenants remain)
    log = s.log.read_text()
    assert '"event":"key.create"' in log and '"event":"key.revoke"' in log


def test_required_without_keys_refuses(model_dir, tmp_path):
    s = start_server(model_dir, tmp_path, auth="required", max_seq_len=128)
    try:
        with s.client() as c:
            assert c.post("/generate", json=BODY).status_code == 401
            assert c.get("/prefixes").status_code == 401
            assert c.get("/v1/models", headers=bearer("whatever")).status_code == 401
            assert c.get("/health").status_code == 200
        assert "AUTH IS OFF" not in s.log.read_text()
    finally:
        stop_server(s)


DEEP = b'{"inputs": "x", "parameters": ' + b"[" * 100 + b"]" * 100 + b"}"
BAD_BODIES = [  # (method, path, body, content type, the status a caller with a valid key gets, a word of its error)
    ("POST", "/generate", b'{"inputs": "x", ', "application/json", 422, "JSON decode"),
    ("POST", "/generate", DEEP, "application/json", 422, "nested deeper"),
    ("POST", "/v1/completions", b'{"prompt": "' + b"x" * 5000 + b'"}', "application/json", 413, "max-body-bytes"),
    ("POST", "/v1/chat/completions", b'{"messages": 3}', "application/json", 422, "messages"),
    ("POST", "/prefixes/e2e/rollback", b"[", "application/json", 422, "JSON decode"),
    ("PUT", "/prefixes/e2e", b"--B\r\ngarbage", "multipart/form-data; boundary=B", 422, "files"),
    ("PATCH", "/admin/tenants/bob", b'{"limits": ', "application/json", 403, "admin API key"),  # not an admin
]


def test_no_valid_key_is_401_whatever_the_body(model_dir, tmp_path):
    """Authentication comes before the body is read or parsed; the open routes stay open."""
    key = make_key(str(tmp_path / "store"), "alice")
    s = start_server(model_dir, tmp_path, max_seq_len=128, max_body_bytes=4096)
    try:
        with s.client() as c:
            for method, path, body, kind, status, word in BAD_BODIES:
                for auth in ({}, bearer("psk_000000000000_" + "x" * 43), {"X-API-Key": "nope"}):
                    r = c.request(method, path, content=body, headers={"Content-Type": kind, **auth})
                    assert r.status_code == 401 and error_of(r)[1] == "unauthorized", (path, auth, r.text)
                    assert r.headers["WWW-Authenticate"].startswith("Bearer")
                r = c.request(method, path, content=body, headers={"Content-Type": kind, **bearer(key)})
                assert r.status_code == status and word in error_of(r)[0], (path, r.text)
            for path in ("/health", "/ready", "/metrics"):
                assert c.request("GET", path, content=DEEP).status_code == 200, path
        head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        for auth, status in ((b"", b"401"), (f"Authorization: Bearer {key}\r\n".encode(), b"413")):
            t0 = time.monotonic()  # a huge declared body: answered at once, unread, and the connection closed
            with socket.create_connection(("127.0.0.1", int(s.url.rsplit(":", 1)[1])), timeout=10) as sock:
                sock.sendall(head + auth + b"Content-Length: 1073741824\r\n\r\n{")
                reply = read_until_closed(sock)
            assert reply.startswith(b"HTTP/1.1 " + status), reply[:300]
            assert time.monotonic() - t0 < 5
    finally:
        stop_server(s)


def test_cli_refuses_bad_names_and_unknown_keys(tmp_path):
    store = str(tmp_path / "store")
    bad = cli("keys", "create", "--tenant", "Not Valid", "--store", store)
    assert bad.returncode == 2 and "invalid tenant name" in bad.stderr
    gone = cli("keys", "revoke", "0123456789ab", "--store", store)
    assert gone.returncode == 2 and "no key" in gone.stderr
    assert cli("keys", "list", "--store", store).stdout == ""
