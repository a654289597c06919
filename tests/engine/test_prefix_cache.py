"""The device prefix cache is bounded by bytes, LRU, never evicts a pinned prefix, and with a host tier below it
holds each byte of prefix memory in one tier."""
from __future__ import annotations

import torch

from prefix_store.artifact import build_artifact
from server.engine.device_prefix import PrefixCache
from server.tiers.host import HostCache, artifact_bytes

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


def held_bytes(cache: PrefixCache, host: HostCache) -> int:
    """Bytes of the distinct storages behind both tiers' tensors: memory that exists once counts once."""
    tensors = [t for e in cache._entries.values() for t in (e.kv, e.encoder_kv, e.cross_kv) if t is not None]
    tensors += [t for a, _ in host._entries.values() for t in a.tensors.values()]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def use(cache: PrefixCache, host: HostCache, a) -> None:
    """What the task registry does for a request: device tier, else host tier, else the store (here: `a`)."""
    v = a.manifest.sha256
    cache.acquire(v, lambda: host.get(v) or a).release()


def test_on_cpu_the_device_prefix_is_the_artifacts_memory_and_one_tier_holds_it():
    """CPU, model dtype = artifact dtype: `.to(device, dtype)` returns the artifact's own tensor, so the host tier
    keeps only prefixes the device tier does not hold (evicted ones move down, host hits move up), and the two
    byte counts add up to the memory that exists."""
    arts = [art(i) for i in range(4)]
    size = artifact_bytes(arts[0])
    host = HostCache(2 * size)
    cache = PrefixCache(2 * size, torch.device("cpu"), torch.float32, host=host)
    p = cache.acquire(arts[0].manifest.sha256, lambda: arts[0])
    assert p.kv.data_ptr() == arts[0].kv.data_ptr()  # one storage: the device tier's bytes are the artifact's
    p.release()
    for a in arts[1:]:
        use(cache, host, a)
    resident = {a.manifest.sha256 for a in arts if a.manifest.sha256 in cache}
    below = {a.manifest.sha256 for a in arts if a.manifest.sha256 in host}
    assert resident == {arts[2].manifest.sha256, arts[3].manifest.sha256} and below == {
        arts[0].manifest.sha256, arts[1].manifest.sha256}  # no prefix in both: 4 prefixes in room for 2 + 2
    assert cache.bytes_used + host.bytes_used == held_bytes(cache, host) == 4 * size
    use(cache, host, arts[0])  # a host hit moves up, the device's least recent (arts[2]) moves down
    assert arts[0].manifest.sha256 in cache and arts[0].manifest.sha256 not in host
    assert arts[2].manifest.sha256 in host and host.stats.hits == 1 and host.stats.evictions == 0
    assert cache.bytes_used + host.bytes_used == held_bytes(cache, host) == 4 * size
    cache.drop(arts[3].manifest.sha256)  # a moved name's old version leaves the device but stays warm in host
    assert arts[3].manifest.sha256 in host and arts[1].manifest.sha256 not in host  # the host's LRU made room
    assert host.stats.evictions == 1 and host.bytes_used == 2 * size
    assert cache.bytes_used + host.bytes_used == held_bytes(cache, host) == 3 * size


def test_a_device_copy_in_another_dtype_is_separate_memory_and_the_host_keeps_its_own():
    """bf16 model, fp32 artifacts (on a GPU: any artifact): the device tensors are a copy, so the host tier keeps
    the artifact of a resident prefix too, and each tier counts the memory it alone holds."""
    arts = [art(i) for i in range(3)]
    size = artifact_bytes(arts[0])
    host = HostCache(3 * size)
    cache = PrefixCache(size, torch.device("cpu"), torch.bfloat16, host=host)  # room for two bf16 prefixes
    for a in arts:
        use(cache, host, a)
    p = cache.acquire(arts[2].manifest.sha256, lambda: arts[2])
    assert p.kv.data_ptr() != arts[2].kv.data_ptr() and p.kv.dtype == torch.bfloat16
    p.release()
    assert len(cache) == 2 and len(host) == 3 and cache.bytes_used == size
    assert cache.bytes_used + host.bytes_used == held_bytes(cache, host) == 4 * size
