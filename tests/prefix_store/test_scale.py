"""10,000 stored prefixes per backend: list, lookup and cold-load timings (reported, not asserted as timings)."""
from __future__ import annotations

import asyncio
import json
import random
import statistics
import time

import pytest
import torch

from prefix_store.artifact import PrefixArtifact, build_artifact
from prefix_store.backend import open_store
from tests.prefix_store.conftest import FP

N = 10_000


def tiny_arts(n: int) -> list[PrefixArtifact]:
    """n distinct 1-layer, P=2 artifacts (32 bytes of tensors each)."""
    kv = torch.randn(n, 1, 2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    return [build_artifact(kv[i], FP) for i in range(n)]


def populate_disk(root, arts: list[PrefixArtifact]) -> None:
    """Write the disk layout directly (put() fsyncs three files per call: too slow to fill 10k in a test)."""
    for sub in ("blobs", "tasks", "versions"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arts):
        m, t = a.to_bytes()
        (root / "blobs" / f"{a.manifest.sha256}.safetensors").write_bytes(t)
        (root / "tasks" / f"p{i:05d}.json").write_bytes(m)
        (root / "versions" / f"p{i:05d}").mkdir()
        rec = {"manifest": json.loads(m), "created": a.manifest.created}
        (root / "versions" / f"p{i:05d}" / f"{a.manifest.sha256}.json").write_text(json.dumps(rec))


def pct(samples: list[float]) -> str:
    s = sorted(x * 1000 for x in samples)
    return f"p50 {statistics.median(s):.2f} ms, p99 {s[int(len(s) * 0.99) - 1]:.2f} ms"


async def timed(n: int, make) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await make(i)
        out.append(time.perf_counter() - t0)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["disk", "redis"])
async def test_ten_thousand_prefixes(kind, tmp_path, namespace, capsys):
    from tests.prefix_store.conftest import SHARED_REDIS
    arts = tiny_arts(N)
    fill = time.perf_counter()
    if kind == "disk":
        populate_disk(tmp_path / "s", arts)
        store = open_store(str(tmp_path / "s"))
    else:
        # the shared Redis serves other tests (and, on a shared machine, other jobs) meanwhile: a per-call deadline
        # of 30 s instead of 2 s, so a slow moment is a slow sample here, not a failure (the deadline has its own tests)
        store = open_store(f"{SHARED_REDIS}?prefix={namespace}&timeout=30")
        for start in range(0, N, 250):  # 250 uploads in flight at a time, through the real put()
            await asyncio.gather(*(store.put(f"p{i:05d}", arts[i].manifest, arts[i].to_bytes()[1])
                                   for i in range(start, min(N, start + 250))))
    fill = time.perf_counter() - fill
    rng = random.Random(0)
    names = [f"p{rng.randrange(N):05d}" for _ in range(500)]
    listed = await store.list()
    assert len(listed) == N and len(await store.snapshot()) == N
    t_list = await timed(5, lambda i: store.list())
    t_snap = await timed(5, lambda i: store.snapshot())
    t_manifest = await timed(len(names), lambda i: store.get_manifest(names[i]))

    async def cold(i: int) -> None:
        m, t = await store.get(names[i])
        art = PrefixArtifact.from_bytes(m.to_json(), t)  # what a device-cache miss does before the copy
        assert art.manifest.sha256 == listed[names[i]].sha256

    t_cold = await timed(len(names), cold)
    with capsys.disabled():
        print(f"\n{kind} store, {N} prefixes (filled in {fill:.1f} s): list {pct(t_list)}; snapshot {pct(t_snap)}; "
              f"get_manifest {pct(t_manifest)}; cold load (get + parse + hash check) {pct(t_cold)}")
    assert statistics.median(t_manifest) < 0.05  # a generous bound: a lookup never scans all names
    await store.close()
