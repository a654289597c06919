"""The task registry in process: tiers (device over host over store), store events, resync, preload, and the
cold-load latency per tier on SmolLM2-135M-shaped prefixes in the shared Redis."""
from __future__ import annotations

import asyncio
import logging
import statistics
import time
import uuid

import pytest
import torch

from prefix_store.artifact import build_artifact
from prefix_store.backend import open_store
from prefix_store.base import RESYNC, PrefixNotFound, StoreEvent, StoreUnavailable
from server.tiers.registry import TaskRegistry
from tests.tiers.test_tiers import held_bytes, prefix_tiers
from tests.prefix_store.conftest import SHARED_REDIS, drop_namespace

logger = logging.getLogger(__name__)
SMOL = {"num_layers": 30, "num_kv_heads": 3, "head_dim": 64}  # SmolLM2-135M's KV geometry
TINY = {"num_layers": 1, "num_kv_heads": 1, "head_dim": 2}


def make(fp: dict, seed: int, prefix_len: int = 4):
    """A random artifact for the fingerprint `fp`: kv [layers, 2, kv_heads, P, head_dim]."""
    shape = (fp["num_layers"], 2, fp["num_kv_heads"], prefix_len, fp["head_dim"])
    return build_artifact(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), fp)


async def put(store, name: str, art) -> str:
    """Store an artifact; its version."""
    return (await store.put(name, art.manifest, art.to_bytes()[1])).sha256


def registry(store, fp: dict, device_bytes: int, host_bytes: int, loads: list | None = None) -> TaskRegistry:
    """A registry on CPU prefix tiers; `loads` collects (tier, seconds) of cold loads."""
    on_load = (lambda tier, s: loads.append((tier, s))) if loads is not None else None
    return TaskRegistry(store, prefix_tiers(device_bytes, host_bytes), fp, 2**26, on_load=on_load)


@pytest.fixture
async def disk(tmp_path):
    s = open_store(str(tmp_path / "store"))
    yield s
    await s.close()


async def test_tiers_device_host_store(disk):
    arts = [make(TINY, i) for i in range(3)]
    for i, a in enumerate(arts):
        await put(disk, f"t{i}", a)
    loads: list = []
    reg = registry(disk, TINY, device_bytes=2 * arts[0].nbytes, host_bytes=2**20, loads=loads)
    for i in range(3):
        (await reg.acquire(f"t{i}")).release()
    # on CPU the device tier's tensors are the artifacts' memory: host memory holds only the one evicted from it
    assert [t for t, _ in loads] == ["store"] * 3 and len(reg.tiers.device) == 2 and len(reg.tiers.host) == 1
    (await reg.acquire("t0")).release()  # evicted from the device, still in host memory
    assert loads[-1][0] == "host" and reg.tiers.host.stats.hits == 1 and "t0" not in reg.tiers.host
    before = len(loads)
    (await reg.acquire("t0")).release()
    assert len(loads) == before and reg.stats.map_hits >= 2  # a device hit: no load, no store read


async def test_on_cpu_each_prefix_is_held_once_and_budgets_count_real_bytes(disk):
    """CPU, fp32 model and artifacts: a device prefix is the parsed artifact's own memory (same data_ptr), so the
    host tier holds only what the device tier does not. Room for 2 on the device and 1 in host memory keeps 3
    tasks out of the store, and the two tiers' byte counts (the prefixserve_*_cache_bytes gauges) add up to the
    memory that exists, never counting a prefix twice."""
    arts = [make(TINY, 20 + i) for i in range(3)]
    for i, a in enumerate(arts):
        await put(disk, f"t{i}", a)
    size, loads = arts[0].nbytes, []
    reg = registry(disk, TINY, device_bytes=2 * size, host_bytes=size, loads=loads)
    held = await reg.acquire("t2")
    host_art = reg.tiers.host.peek((await reg.manifest("t2")).sha256)
    assert host_art is None  # the device tier holds it: no second entry for the same memory
    held.release()
    for _round in range(3):
        for i in range(3):
            (await reg.acquire(f"t{i}")).release()
    # 10 loads (3 tasks cycling through room for 2): after each task's first, never the store again
    assert [t for t, _ in loads] == ["store"] * 3 + ["host"] * 7
    assert len(reg.tiers.device) == 2 and len(reg.tiers.host) == 1
    assert reg.tiers.device.bytes_used + reg.tiers.host.bytes_used == held_bytes(reg.tiers) == 3 * size


async def test_events_and_resync(disk):
    a, b = make(TINY, 1), make(TINY, 2)
    va = await put(disk, "t", a)
    reg = registry(disk, TINY, 2**20, 2**20)
    (await reg.acquire("t")).release()
    assert va in reg.tiers.device
    vb = await put(disk, "t", b)  # another replica's upload
    await reg.on_event(StoreEvent("t", vb))
    assert reg.manifests["t"].sha256 == vb and va not in reg.tiers.device
    pinned = await reg.acquire(f"t@{va[:8]}")  # an old kept version still serves when pinned
    assert pinned.version == va
    pinned.release()
    await disk.delete("t")
    await reg.on_event(StoreEvent("t", None))
    assert "t" not in reg.manifests
    with pytest.raises(PrefixNotFound):
        await reg.acquire("t")
    # missed events: the store changed behind our back, RESYNC drops what differs
    await put(disk, "u", a)
    (await reg.acquire("u")).release()
    await put(disk, "u", b)
    await reg.on_event(RESYNC)
    assert "u" not in reg.manifests and reg.stats.resyncs == 1
    assert (await reg.acquire("u")).version == vb


async def test_map_serves_while_the_store_is_down_and_reads_are_shared(disk):
    await put(disk, "t", make(TINY, 3))
    reg = registry(disk, TINY, 2**20, 2**20)
    (await reg.acquire("t")).release()

    class Down:
        url = "redis://down"
        calls = 0

        async def get_manifest(self, *a):
            Down.calls += 1
            raise StoreUnavailable("redis store redis://down: unreachable")

        get = get_manifest

    reg.store = Down()
    (await reg.acquire("t")).release()  # cached: no store call at all
    assert Down.calls == 0
    with pytest.raises(StoreUnavailable):
        await reg.acquire("other")
    assert Down.calls == 2  # a fast failure is retried once (a stale pooled connection), then raised


async def test_concurrent_misses_share_one_store_read(disk):
    await put(disk, "t", make(TINY, 4))
    reg = registry(disk, TINY, 2**20, 2**20)
    reads = 0
    real_get = disk.get

    async def counting_get(*a, **kw):
        nonlocal reads
        reads += 1
        await asyncio.sleep(0.05)
        return await real_get(*a, **kw)

    disk.get = counting_get
    prefixes = await asyncio.gather(*(reg.acquire("t") for _ in range(16)))
    assert reads == 1 and len({p.version for p in prefixes}) == 1
    for p in prefixes:
        p.release()


async def test_preload(disk):
    for i in range(4):
        await put(disk, f"p{i}", make(TINY, 10 + i))
    reg = registry(disk, TINY, 2**20, 2**20)
    assert await reg.preload("p1, missing ,p2") == ["p1", "p2"]
    assert len(reg.tiers.device) == 2
    small = registry(disk, TINY, device_bytes=2 * make(TINY, 0).nbytes, host_bytes=2**20)
    assert len(await small.preload("*")) == 2  # stops when the device cache is full


async def test_cold_load_latency_per_tier():
    """SmolLM2-135M-shaped prefixes (P=10, 0.46 MB each) in the shared Redis: store, host and device tiers."""
    ns = f"pstest-{uuid.uuid4().hex[:10]}"
    store = open_store(f"{SHARED_REDIS}?prefix={ns}")
    try:
        n = 40
        arts = [make(SMOL, 100 + i, prefix_len=10) for i in range(n)]
        for i, a in enumerate(arts):
            await put(store, f"smol{i}", a)
        loads: list = []
        reg = registry(store, SMOL, device_bytes=4 * arts[0].nbytes, host_bytes=2**30, loads=loads)
        for _round in range(2):  # round 1 from the store, round 2 from host memory (the device holds only 4)
            for i in range(n):
                (await reg.acquire(f"smol{i}")).release()
        (await reg.acquire("smol0")).release()  # back on the device
        del loads[-1]
        hits = []
        for _ in range(n):
            t0 = time.perf_counter()
            (await reg.acquire("smol0")).release()
            hits.append(time.perf_counter() - t0)
        assert reg.tiers.device.bytes_used <= reg.tiers.device.capacity_bytes and reg.tiers.host.bytes_used <= 2**30
        report = {"device": hits}
        for tier in ("store", "host"):
            report[tier] = [s for t, s in loads if t == tier]
            assert len(report[tier]) == n
        line = ", ".join(f"{tier} p50 {statistics.median(v) * 1e3:.3f} ms p99 "
                         f"{sorted(v)[int(0.99 * (len(v) - 1))] * 1e3:.3f} ms" for tier, v in report.items())
        logger.warning("cold load per tier (SmolLM2-shaped P=10, %d tasks): %s", n, line)
        assert statistics.median(report["host"]) < statistics.median(report["store"])
    finally:
        await store.close()
        drop_namespace(SHARED_REDIS, ns)
