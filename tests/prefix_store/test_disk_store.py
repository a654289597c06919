"""The disk store: atomic puts, validated names, list/get/delete, blob garbage collection, failures."""
from __future__ import annotations

import asyncio
import os

import pytest
import torch

from prefix_store.artifact import PrefixArtifact, build_artifact
from prefix_store.backend import open_store
from prefix_store.base import InvalidTaskName, PrefixNotFound, StoreError, validate_task_name
from prefix_store.disk import DiskStore

FP = {"num_layers": 1, "num_kv_heads": 1, "head_dim": 2}


def art(seed):
    return build_artifact(torch.randn(1, 2, 1, 3, 2, generator=torch.Generator().manual_seed(seed)), FP)


def run(coro):
    return asyncio.run(coro)


def test_put_get_list_delete(tmp_path):
    store = open_store(f"file://{tmp_path}?keep_versions=1")  # no history: a replaced version is collected
    a, b = art(1), art(2)
    m, t = a.to_bytes()
    run(store.put("e2e", a.manifest, t))
    got_m, got_t = run(store.get("e2e"))
    assert got_m == a.manifest and got_t == t
    assert torch.equal(PrefixArtifact.from_bytes(got_m.to_json(), got_t).kv, a.kv)
    run(store.put("webnlg", b.manifest, b.to_bytes()[1]))
    assert sorted(run(store.list())) == ["e2e", "webnlg"]
    # replace e2e with b's tensors: the old blob is collected, b's is shared and kept
    run(store.put("e2e", b.manifest, b.to_bytes()[1]))
    assert run(store.get_manifest("e2e")).sha256 == b.manifest.sha256
    assert not (tmp_path / "blobs" / f"{a.manifest.sha256}.safetensors").exists()
    run(store.delete("webnlg"))
    assert (tmp_path / "blobs" / f"{b.manifest.sha256}.safetensors").exists()  # e2e still uses it
    run(store.delete("e2e"))
    assert list((tmp_path / "blobs").iterdir()) == []
    with pytest.raises(PrefixNotFound):
        run(store.get("e2e"))
    with pytest.raises(PrefixNotFound):
        run(store.delete("e2e"))


@pytest.mark.parametrize("name", ["", ".", "..", "../etc", "a/b", "a\\b", "x" * 129, "-x", ".hidden", "a b",
                                  "ta\x00sk", "é", "e2e\n", "e2e@\n"])
def test_invalid_names_refused(tmp_path, name):
    with pytest.raises(InvalidTaskName):
        validate_task_name(name)
    with pytest.raises(InvalidTaskName):
        run(DiskStore(tmp_path).put(name, art(1).manifest, art(1).to_bytes()[1]))
    assert list((tmp_path / "tasks").iterdir()) == []


def test_valid_names():
    for name in ["e2e", "web_nlg", "v1.2", "A-b_c.d", "x" * 128, "_x"]:
        assert validate_task_name(name) == name


def test_crash_mid_upload_leaves_old_version(tmp_path, monkeypatch):
    store = DiskStore(tmp_path)
    a, b = art(1), art(2)
    run(store.put("t", a.manifest, a.to_bytes()[1]))
    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith("t.json"):
            raise OSError(5, "simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StoreError):
        run(store.put("t", b.manifest, b.to_bytes()[1]))
    monkeypatch.setattr(os, "replace", real_replace)
    m, t = run(store.get("t"))
    assert m.sha256 == a.manifest.sha256 and t == a.to_bytes()[1]
    assert not [p for p in (tmp_path / "tasks").iterdir() if p.name.startswith(".tmp")]


@pytest.mark.parametrize("err,word", [(30, "read-only"), (28, "full")])  # EROFS, ENOSPC
def test_read_only_or_full_store_fails_clearly(tmp_path, monkeypatch, err, word):
    import tempfile
    store = DiskStore(tmp_path)
    run(store.put("old", art(1).manifest, art(1).to_bytes()[1]))

    def refuse(*a, **k):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(StoreError, match=f"cannot be written \\({word}\\)"):
        run(store.put("t", art(2).manifest, art(2).to_bytes()[1]))
    monkeypatch.undo()
    assert sorted(run(store.list())) == ["old"]  # reading still works, nothing half-written


def test_unsupported_url():
    with pytest.raises(ValueError, match="unsupported store URL"):
        open_store("ftp://x")
