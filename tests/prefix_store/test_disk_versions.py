"""Disk-store specifics of versions (a store from before versions, the writer lock) and `prefixserve store copy`."""
from __future__ import annotations

import asyncio
import json

from prefix_store.backend import open_store
from prefix_store.disk import DiskStore
from prefixserve.cli import main
from tests.prefix_store.conftest import SHARED_REDIS, art, tensors


def test_store_written_before_versions_is_migrated(tmp_path):
    a, b = art(1), art(2)
    (tmp_path / "blobs").mkdir()
    (tmp_path / "tasks").mkdir()
    (tmp_path / "blobs" / f"{a.manifest.sha256}.safetensors").write_bytes(tensors(a))
    (tmp_path / "tasks" / "old.json").write_bytes(a.manifest.to_json())
    store = DiskStore(tmp_path)
    versions = asyncio.run(store.list_versions("old"))
    assert [v.version for v in versions] == [a.manifest.sha256]
    asyncio.run(store.put("old", b.manifest, tensors(b)))
    asyncio.run(store.set_version("old", a.manifest.sha256))  # the pre-versions artifact is a version
    assert asyncio.run(store.get("old"))[1] == tensors(a)


def test_two_store_objects_on_one_directory_stay_consistent(tmp_path):
    """Two processes' worth of writers (separate objects, one flock) racing on one name."""
    s1, s2 = DiskStore(tmp_path, keep_versions=2), DiskStore(tmp_path, keep_versions=2)
    arts = [art(i) for i in range(8)]

    async def race() -> None:
        await asyncio.gather(*((s1 if i % 2 else s2).put("t", a.manifest, tensors(a)) for i, a in enumerate(arts)))

    asyncio.run(race())
    m, t = asyncio.run(s1.get("t"))
    assert t == {a.manifest.sha256: tensors(a) for a in arts}[m.sha256]
    kept = {v.version for v in asyncio.run(s2.list_versions("t"))}
    assert len(kept) == 2 and m.sha256 in kept
    blobs = {p.stem.split(".")[0] for p in (tmp_path / "blobs").iterdir()}
    assert blobs == kept  # dropped versions' blobs are collected


def test_cli_store_copy_disk_to_redis(tmp_path, namespace, capsys):
    src = DiskStore(tmp_path)
    a, b = art(1), art(2)
    asyncio.run(src.put("e2e", a.manifest, tensors(a)))
    asyncio.run(src.put("e2e", b.manifest, tensors(b)))
    dst_url = f"{SHARED_REDIS}?prefix={namespace}"
    assert main(["store", "copy", str(tmp_path), dst_url]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["names"], out["versions_copied"]) == (1, 2) and out["dst"].startswith("redis://")

    async def check() -> None:
        dst = open_store(dst_url)
        assert await dst.snapshot() == {"e2e": b.manifest.sha256}
        assert (await dst.get("e2e", a.manifest.sha256))[1] == tensors(a)
        await dst.close()

    asyncio.run(check())
    assert main(["store", "copy", str(tmp_path), "redis://127.0.0.1:1/0?timeout=0.3"]) == 2
    assert "unreachable" in capsys.readouterr().err
