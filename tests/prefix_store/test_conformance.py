"""The PrefixStore contract, run against both backends: versions, aliases, retention, conditions, watch, copy."""
from __future__ import annotations

import asyncio

import pytest

from prefix_store.artifact import PrefixArtifact
from prefix_store.backend import open_store
from prefix_store.base import (RESYNC, InvalidTaskName, PrefixNotFound, StoreEvent, VersionConflict, VersionNotFound,
                               split_task_ref)
from prefix_store.copy import copy_store
from tests.prefix_store.conftest import art, tensors


async def test_round_trip_list_delete(store):
    a, b = art(1), art(2)
    assert (await store.put("e2e", a.manifest, tensors(a))).sha256 == a.manifest.sha256
    await store.put("webnlg", b.manifest, tensors(b))
    m, t = await store.get("e2e")
    assert m == a.manifest and t == tensors(a)
    assert (await store.get_manifest("webnlg")) == b.manifest
    assert list(await store.list()) == ["e2e", "webnlg"]
    assert await store.snapshot() == {"e2e": a.manifest.sha256, "webnlg": b.manifest.sha256}
    await store.delete("e2e")
    assert list(await store.list()) == ["webnlg"]
    with pytest.raises(PrefixNotFound):
        await store.get("e2e")


async def test_versions_pin_and_rollback(store):
    a, b = art(1), art(2)
    await store.put("t", a.manifest, tensors(a))
    await store.put("t", b.manifest, tensors(b))
    versions = await store.list_versions("t")
    assert [v.version for v in versions] == [b.manifest.sha256, a.manifest.sha256]  # newest first
    assert versions[0].created >= versions[1].created and versions[1].manifest == a.manifest
    # pinned reads by full id and by a short prefix, while the alias stays on b
    m, t = await store.get("t", a.manifest.sha256)
    assert m == a.manifest and t == tensors(a)
    assert (await store.get_manifest("t", a.manifest.sha256[:8])) == a.manifest
    assert (await store.get_manifest("t")).sha256 == b.manifest.sha256
    # rollback
    assert (await store.set_version("t", a.manifest.sha256[:10])).sha256 == a.manifest.sha256
    m, t = await store.get("t")
    assert m.sha256 == a.manifest.sha256 and t == tensors(a)
    assert (await store.list())["t"].sha256 == a.manifest.sha256
    with pytest.raises(VersionNotFound):
        await store.get("t", "0" * 64)
    with pytest.raises(VersionNotFound):
        await store.set_version("t", "abcdef0")
    with pytest.raises(InvalidTaskName):
        await store.get("t", "not-a-version")


async def test_retention_keeps_newest_and_never_the_current(store):
    arts = [art(i) for i in range(5)]
    for a in arts[:4]:  # keep_versions=3: the oldest goes
        await store.put("t", a.manifest, tensors(a))
    kept = [v.version for v in await store.list_versions("t")]
    assert kept == [a.manifest.sha256 for a in reversed(arts[1:4])]
    with pytest.raises(VersionNotFound):
        await store.get("t", arts[0].manifest.sha256)
    # a version stored with an old creation time (as copy_store does) is the oldest, but current: it stays
    await store.put("t", arts[4].manifest, tensors(arts[4]), created=1.0)
    kept = [v.version for v in await store.list_versions("t")]
    assert kept[-1] == arts[4].manifest.sha256 and len(kept) == 4
    assert (await store.get("t"))[1] == tensors(arts[4])
    await store.set_version("t", arts[1].manifest.sha256)  # rollback to the oldest kept
    assert (await store.get("t"))[1] == tensors(arts[1])


async def test_same_version_is_immutable_and_shared(store):
    a = art(1)
    first = await store.put("x", a.manifest, tensors(a))
    a2 = art(1, description="changed")
    again = await store.put("x", a2.manifest, tensors(a2))
    assert again == first and len(await store.list_versions("x")) == 1
    await store.put("y", a2.manifest, tensors(a2))  # another name, same tensors: its own manifest
    assert (await store.get_manifest("y")).description == "changed"
    await store.delete("x")  # the blob y shares survives
    assert (await store.get("y"))[1] == tensors(a)
    with pytest.raises(PrefixNotFound):
        await store.get("x", a.manifest.sha256)


async def test_expected_version_conflicts(store):
    a, b = art(1), art(2)
    with pytest.raises(VersionConflict):
        await store.put("t", a.manifest, tensors(a), expected_version="*")  # must exist
    with pytest.raises(VersionConflict):
        await store.put("t", a.manifest, tensors(a), expected_version=b.manifest.sha256)
    await store.put("t", a.manifest, tensors(a))
    with pytest.raises(VersionConflict) as err:
        await store.put("t", b.manifest, tensors(b), expected_version=b.manifest.sha256)
    assert err.value.found == a.manifest.sha256
    await store.put("t", b.manifest, tensors(b), expected_version=a.manifest.sha256)
    with pytest.raises(VersionConflict):
        await store.set_version("t", a.manifest.sha256, expected_version=a.manifest.sha256)
    await store.set_version("t", a.manifest.sha256, expected_version="*")
    with pytest.raises(VersionConflict):
        await store.delete("t", expected_version=b.manifest.sha256)
    assert (await store.get_manifest("t")).sha256 == a.manifest.sha256  # nothing changed by a conflict
    await store.delete("t", expected_version=a.manifest.sha256)
    assert await store.list() == {}


async def test_unknown_and_invalid_names(store):
    for call in (store.get("nope"), store.get_manifest("nope"), store.list_versions("nope"),
                 store.set_version("nope", "a" * 64), store.delete("nope")):
        with pytest.raises(PrefixNotFound):
            await call
    for call in (store.get("../x"), store.put("a/b", art(1).manifest, tensors(art(1))), store.delete("")):
        with pytest.raises(InvalidTaskName):
            await call
    assert split_task_ref("e2e@abcdef12") == ("e2e", "abcdef12") and split_task_ref("e2e") == ("e2e", None)
    with pytest.raises(InvalidTaskName):
        split_task_ref("e2e@zz")


async def test_concurrent_puts_of_one_name_are_atomic(backend):
    """10 writers (own connections) replace one name while readers check every read is one whole version."""
    writers = [open_store(backend) for _ in range(10)]
    reader = open_store(backend)
    arts = [art(100 + i, prefix_len=64) for i in range(10)]
    by_sha = {a.manifest.sha256: tensors(a) for a in arts}
    await writers[0].put("hot", arts[0].manifest, tensors(arts[0]))
    done, reads = asyncio.Event(), 0

    async def read_loop() -> None:
        nonlocal reads
        while not done.is_set():
            m, t = await reader.get("hot")
            assert by_sha[m.sha256] == t  # never a manifest with another version's tensors
            PrefixArtifact.from_bytes(m.to_json(), t)  # hash verified
            reads += 1
            await asyncio.sleep(0)

    readers = [asyncio.create_task(read_loop()) for _ in range(3)]
    results = await asyncio.gather(*(w.put("hot", a.manifest, tensors(a)) for w, a in zip(writers, arts)))
    done.set()
    await asyncio.gather(*readers)
    final = await reader.get("hot")
    assert final[0].sha256 in {r.sha256 for r in results} and final[1] == by_sha[final[0].sha256]
    kept = await reader.list_versions("hot")
    assert len(kept) == 3 and final[0].sha256 in {v.version for v in kept}
    for v in kept:  # every kept version is complete
        assert (await reader.get("hot", v.version))[1] == by_sha[v.version]
    assert reads > 0
    for s in (*writers, reader):
        await s.close()


async def test_watch_delivers_changes(backend):
    writer, watcher = open_store(backend), open_store(backend)
    events: list[StoreEvent] = []
    got = asyncio.Event()

    def on_event(e: StoreEvent) -> None:
        if e != RESYNC:
            events.append(e)
            got.set()

    task = asyncio.create_task(watcher.watch(on_event))
    await asyncio.sleep(0.3)  # subscribed
    a, b = art(1), art(2)
    expected = []
    for step in (lambda: writer.put("w", a.manifest, tensors(a)), lambda: writer.put("w", b.manifest, tensors(b)),
                 lambda: writer.set_version("w", a.manifest.sha256), lambda: writer.delete("w")):
        got.clear()
        await step()
        await asyncio.wait_for(got.wait(), 2.0)
    expected = [StoreEvent("w", a.manifest.sha256), StoreEvent("w", b.manifest.sha256),
                StoreEvent("w", a.manifest.sha256), StoreEvent("w", None)]
    task.cancel()
    assert events == expected
    await writer.close()
    await watcher.close()


async def test_health(store):
    h = await store.health()
    assert h["ok"] is True and store.url.split("?")[0] in h["detail"]


async def test_copy_between_backends(tmp_path, namespace):
    from tests.prefix_store.conftest import SHARED_REDIS
    disk = open_store(str(tmp_path / "src"))
    red = open_store(f"{SHARED_REDIS}?prefix={namespace}")
    back = open_store(str(tmp_path / "back"))
    a, b, c = art(1), art(2), art(3)
    await disk.put("e2e", a.manifest, tensors(a))
    await disk.put("e2e", b.manifest, tensors(b))
    await disk.set_version("e2e", a.manifest.sha256)  # the alias is not the newest version
    await disk.put("dart", c.manifest, tensors(c))
    for dst in (red, back):
        src = disk if dst is red else red
        report = await copy_store(src, dst)
        assert (report.names, report.versions_copied) == (2, 3)
        assert await dst.snapshot() == await disk.snapshot()
        assert [(v.version, round(v.created, 3)) for v in await dst.list_versions("e2e")] == \
            [(v.version, round(v.created, 3)) for v in await disk.list_versions("e2e")]
        assert (await dst.get("e2e", b.manifest.sha256))[1] == tensors(b)
    again = await copy_store(disk, red)  # idempotent
    assert (again.versions_copied, again.versions_skipped) == (0, 3)
    for s in (disk, red, back):
        await s.close()


async def test_lora_artifacts_are_stored_versioned_and_read_back_like_prefixes(store):
    """A LoRA adapter (kind lora, format version 3) is bytes like any task: stored, versioned, read back equal."""
    import torch

    from prefix_store.lora import build_lora_artifact
    from tests.prefix_store.conftest import FP

    g = torch.Generator().manual_seed(0)
    entry = {"r": 2, "lora_alpha": 4, "use_rslora": False, "modules": ["m"]}
    loras = [build_lora_artifact({"m.lora_A": torch.randn(2, 3, generator=g),
                                  "m.lora_B": torch.randn(4, 2, generator=g)}, entry, FP) for _ in range(2)]
    for a in loras:
        await store.put("lora", a.manifest, tensors(a))
    m, t = await store.get("lora", loras[0].manifest.sha256)
    assert m == loras[0].manifest and m.lora["modules"] == ["m"] and t == tensors(loras[0])
    assert PrefixArtifact.from_bytes(m.to_json(), t).tensors.keys() == loras[0].tensors.keys()
    assert (await store.get_manifest("lora")).sha256 == loras[1].manifest.sha256
