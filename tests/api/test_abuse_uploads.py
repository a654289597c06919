"""Hostile prefix uploads over HTTP: each is refused with a 4xx naming the problem, nothing is unpickled or
decompressed, and the store is unchanged (the listing and every task's versions are identical before and after).

The artifact checks themselves are unit-tested in tests/prefix_store/test_artifact.py; test_errors.py covers the
basic PEFT shape/NaN/pickle cases and the 1 GB / chunked 413s. This is the rest of the hostile set, end to end.
"""
from __future__ import annotations

import gzip
import io
import json
import pickle
import struct
import time
import zipfile
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load, save

from tests.api.conftest import native_files, peft_adapter, upload
from tests.api.test_errors import _err


class _Boom:
    """Unpickling this runs a command that creates a file: proof a pickle was (not) loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def _snapshot(http: httpx.Client) -> dict:
    listing = http.get("/prefixes").json()
    versions = {p["task"]: http.get(f"/prefixes/{p['task']}/versions").json() for p in listing["prefixes"]}
    return {"list": listing, "versions": versions}


@pytest.fixture(scope="module")
def base_model(server) -> dict:
    """The served model's fingerprint, from a valid upload that stays in the store as the victim of overwrites."""
    with server.client() as c:
        for seed in (1, 2):  # two versions
            r = upload(c, "victim", peft_adapter(seed=seed))
            assert r.status_code in (200, 201), r.text
        return r.json()["manifest"]["base_model"]


def _native(base_model: dict, **over) -> dict[str, bytes]:
    return {**native_files(base_model, seed=7), **over}


def _raw_header(raw: bytes, body: bytes = b"\0" * 64) -> bytes:
    return struct.pack("<Q", len(raw)) + raw + body


def _with_header(header: dict, body: bytes = b"\0" * 64) -> bytes:
    return _raw_header(json.dumps(header).encode(), body)


def _st(tensors: dict[str, torch.Tensor]) -> bytes:
    return save({k: v.contiguous() for k, v in tensors.items()})


def _zip(files: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for n, data in files.items():
            z.writestr(n, data)
    return buf.getvalue()


def _cases(base_model: dict, marker: Path) -> list[tuple[str, dict[str, bytes], int, tuple[str, ...]]]:
    """(label, files, status, words the error must contain)."""
    good = _native(base_model)
    st = good["prefix.safetensors"]
    kv = load(st)["kv"]
    peft = peft_adapter(seed=5)
    ptensors = load(peft["adapter_model.safetensors"])
    soft = peft_adapter(seed=6, prompt_tuning=True)  # converted by the model, on the engine's thread
    wide = {k: torch.zeros(v.shape[0], v.shape[1] + 1) for k, v in load(soft["adapter_model.safetensors"]).items()}
    huge = {"kv": {"dtype": "F32", "shape": [25_000_000_000], "data_offsets": [0, 100_000_000_000]}}
    evil = pickle.dumps(_Boom(marker))
    torch_bin = io.BytesIO()
    torch.save({"prompt_embeddings": torch.zeros(4, 8)}, torch_bin)
    bomb = _zip({"adapter_model.safetensors": b"\0" * (64 * 1024 * 1024)})  # 64 MiB of zeros in ~64 KiB
    return [
        ("truncated native", _native(base_model, **{"prefix.safetensors": st[:len(st) // 2]}), 422, ("tensors",)),
        ("truncated peft", {**peft, "adapter_model.safetensors": peft["adapter_model.safetensors"][:100]}, 422, ()),
        ("empty tensors", _native(base_model, **{"prefix.safetensors": b""}), 422, ("truncated",)),
        ("header length 1 TB", _native(base_model, **{"prefix.safetensors": struct.pack("<Q", 2**40) + b"{}"}),
         422, ("header",)),
        ("header claims 100 GB", _native(base_model, **{"prefix.safetensors": _with_header(huge)}), 413,
         ("tensors.kv.shape",)),
        ("header deeply nested", _native(base_model, **{"prefix.safetensors": _raw_header(
            b"[" * 200_000 + b"]" * 200_000)}), 422, ("header",)),
        ("offsets outside the file", _native(base_model, **{"prefix.safetensors": _with_header(
            {"kv": {"dtype": "F32", "shape": [4], "data_offsets": [32, 48]}}, b"\0" * 16)}), 422, ("data_offsets",)),
        ("wrong dtype int64", _native(base_model, **{"prefix.safetensors": _st({"kv": kv.to(torch.int64)})}), 422,
         ("dtype",)),
        ("wrong dtype float64", {**peft, "adapter_model.safetensors": _st(
            {k: v.double() for k, v in ptensors.items()})}, 422, ("dtype",)),
        ("NaN", _native(base_model, **_rehash(good, kv.index_fill(3, torch.tensor([0]), float("nan")))), 422,
         ("finite",)),
        ("inf", {**peft, "adapter_model.safetensors": _st({k: v.index_fill(0, torch.tensor([1]), float("inf"))
                                                          for k, v in ptensors.items()})}, 422, ("finite",)),
        ("wrong shape", _native(base_model, **_rehash(good, kv[:, :, :, :, :-1])), 422, ("shape",)),
        ("extra tensor", _native(base_model, **_rehash(good, kv, extra=torch.zeros(3))), 422, ("tensors",)),
        ("sha256 lies", {**good, "manifest.json": good["manifest.json"].replace(
            json.loads(good["manifest.json"])["sha256"].encode(), b"0" * 64)}, 422, ("sha256",)),
        ("manifest deeply nested", _native(base_model, **{"manifest.json": b"[" * 200_000 + b"]" * 200_000}), 422,
         ("manifest",)),
        ("adapter_config deeply nested", {**peft, "adapter_config.json": b"{\"a\":" * 50_000 + b"1" +
                                          b"}" * 50_000}, 422, ("adapter_config",)),
        ("torch.save .bin", {"adapter_config.json": peft["adapter_config.json"],
                             "adapter_model.bin": torch_bin.getvalue()}, 422, ("pickle",)),
        ("pickle named .safetensors", {**peft, "adapter_model.safetensors": evil}, 422, ()),
        ("pickle as native tensors", _native(base_model, **{"prefix.safetensors": evil}), 422, ("tensors",)),
        ("zip of the artifact", {"prefix.zip": _zip(good)}, 422, ("files",)),
        ("zip bomb as tensors", {**peft, "adapter_model.safetensors": bomb}, 422, ()),
        ("path-like part names", {"../../etc/passwd": b"x", "..\\..\\boot.ini": b"y"}, 422, ("files",)),
        ("prompt tuning of another width", {**soft, "adapter_model.safetensors": _st(wide)}, 422,
         ("prompt_embeddings.shape",)),
    ]


def _rehash(good: dict[str, bytes], kv: torch.Tensor, **extra: torch.Tensor) -> dict[str, bytes]:
    """Native files whose manifest hash matches the (bad) tensors, so the check that fires is the one meant."""
    from prefix_store.artifact import tensors_sha256

    tensors = {"kv": kv.contiguous(), **extra}
    manifest = json.loads(good["manifest.json"])
    manifest["sha256"] = tensors_sha256(tensors)
    return {"manifest.json": json.dumps(manifest).encode(), "prefix.safetensors": _st(tensors)}


def test_hostile_uploads_refused_and_store_unchanged(server, http, base_model, tmp_path):
    marker = tmp_path / "pickle-was-loaded"
    before = _snapshot(http)
    assert before["versions"]["victim"]["versions"]
    for label, files, status, words in _cases(base_model, marker):
        for name in ("victim", "newcomer"):
            t0 = time.monotonic()
            r = upload(http, name, files)
            assert r.status_code == status, (label, name, r.status_code, r.text)
            _err(r, status, *words)
            assert time.monotonic() - t0 < 10, label  # refused from the header, nothing large allocated
    assert not marker.exists()
    assert _snapshot(http) == before
    assert http.get("/prefixes/newcomer").status_code == 404


@pytest.mark.parametrize("path", ["/prefixes/..%2Fx", "/prefixes/%2e%2e", "/prefixes/a%2Fb", "/prefixes/.hidden",
                                  "/prefixes/a%5Cb", "/prefixes/%00", "/prefixes/con%20sole", "/prefixes/%E2%80%AE"])
def test_path_like_task_names_refused(server, http, base_model, path):
    before = _snapshot(http)
    files = native_files(base_model, seed=3)
    parts = [("files", (n, io.BytesIO(d), "application/octet-stream")) for n, d in files.items()]
    r = http.put(httpx.URL(server.url + path), files=parts)  # the path as written (httpx keeps %2F, %2e escapes)
    assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
    assert _snapshot(http) == before


def test_gzip_encoded_upload_is_not_decompressed(server, http, base_model):
    """Content-Encoding is not honoured for uploads: a gzip bomb body is a malformed multipart body, 4xx."""
    before = _snapshot(http)
    body = gzip.compress(b"\0" * (32 * 1024 * 1024))  # 32 MiB of zeros, ~32 KiB on the wire
    r = http.put("/prefixes/gz", content=body, headers={"Content-Encoding": "gzip",
                                                        "Content-Type": "multipart/form-data; boundary=B"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert _snapshot(http) == before
