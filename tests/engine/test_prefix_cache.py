"""The device prefix cache is bounded by bytes, LRU, and never evicts a pinned prefix."""
from __future__ import annotations

import torch

from prefix_store.artifact import build_artifact
from server.engine.prefix_cache import PrefixCache

FP = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 4}


def art(seed: int, p: int = 4):
    return build_artifact(torch.randn(2, 2, 2, p, 4, generator=torch.Generator().manual_seed(seed)), FP)


def test_lru_by_bytes_and_pins():
    a, b, c = art(1), art(2), art(3)
    size = a.kv.numel() * 4
    cache = PrefixCache(2 * size, torch.device("cpu"), torch.float32)
    loads = []

    def loader(x):
        return lambda: loads.append(x.manifest.sha256) or x

    pa = cache.acquire(a.manifest.sha256, loader(a))  # pinned
    pb = cache.acquire(b.manifest.sha256, loader(b))
    pb.release()
    pc = cache.acquire(c.manifest.sha256, loader(c))  # over budget: b (unpinned, least recent) goes, a stays
    assert a.manifest.sha256 in cache and c.manifest.sha256 in cache and b.manifest.sha256 not in cache
    assert cache.bytes_used == 2 * size and cache.stats.evictions == 1
    pa2 = cache.acquire(a.manifest.sha256, loader(a))
    assert pa2 is pa and loads.count(a.manifest.sha256) == 1 and cache.stats.hits == 1
    assert torch.equal(pa.kv, a.kv)
    # everything pinned: the cache goes over budget rather than evict under a running row
    pb = cache.acquire(b.manifest.sha256, loader(b))
    assert len(cache) == 3 and pa.pins == 2 and pc.pins == 1
    for p in (pa, pa, pb, pc):
        p.release()
    assert cache.bytes_used <= 2 * size


def test_drop_keeps_pinned_entry_usable():
    a = art(1)
    cache = PrefixCache(10**6, torch.device("cpu"), torch.float32)
    pa = cache.acquire(a.manifest.sha256, lambda: a)
    cache.drop(a.manifest.sha256)
    assert a.manifest.sha256 in cache  # still pinned by a running row
    pa.release()
    cache.drop(a.manifest.sha256)
    assert a.manifest.sha256 not in cache
