"""The tiers' one owner: the device tier is bounded by bytes, LRU, never evicts a pinned payload, takes pins only
through leases given back once, and with the host tier below it holds each byte of prefix memory in one tier."""
from __future__ import annotations

import torch

from prefix_store.artifact import build_artifact
from server.engine.device_prefix import DevicePrefix
from server.tiers.tiers import Tiers

FP = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 4}


def art(seed: int, p: int = 4):
    return build_artifact(torch.randn(2, 2, 2, p, 4, generator=torch.Generator().manual_seed(seed)), FP)


def prefix_tiers(device_bytes: int, host_bytes: int = 0, dtype: torch.dtype = torch.float32) -> Tiers:
    """Tiers whose payloads are prefixes on the CPU in `dtype` (as the server builds them)."""
    return Tiers(device_bytes, host_bytes,
                 lambda version, a: DevicePrefix.from_artifact(version, a, torch.device("cpu"), dtype))


def test_lru_by_bytes_and_pins():
    a, b, c = art(1), art(2), art(3)
    size = a.nbytes
    tiers = prefix_tiers(2 * size)
    loads = []

    def loader(x):
        return lambda: loads.append(x.manifest.sha256) or x

    la = tiers.lease(a.manifest.sha256, loader(a))  # pinned
    tiers.lease(b.manifest.sha256, loader(b)).release()
    lc = tiers.lease(c.manifest.sha256, loader(c))  # over budget: b (unpinned, least recent) goes, a stays
    device = tiers.device
    assert a.manifest.sha256 in device and c.manifest.sha256 in device and b.manifest.sha256 not in device
    assert device.bytes_used == 2 * size and device.stats.evictions == 1
    la2 = tiers.lease(a.manifest.sha256, loader(a))
    assert la2.payload is la.payload and loads.count(a.manifest.sha256) == 1 and device.stats.hits == 1
    assert torch.equal(la.payload.kv, a.kv) and la.version == a.manifest.sha256
    # everything pinned: the tier goes over budget rather than evict under a running request
    lb = tiers.lease(b.manifest.sha256, loader(b))
    assert len(device) == 3
    for lease in (lc, lb):
        lease.release()
    assert len(device) == 2 and a.manifest.sha256 in device  # a is still held twice
    la.release()
    la.release()  # a lease gives its pin back once: la2 still holds a
    tiers.lease(b.manifest.sha256, loader(b)).release()
    tiers.lease(c.manifest.sha256, loader(c)).release()  # over budget: b goes, though a is least recently used
    assert a.manifest.sha256 in device and b.manifest.sha256 not in device and len(device) == 2
    la2.release()
    assert device.bytes_used <= 2 * size


def test_drop_keeps_pinned_payload_usable():
    a = art(1)
    tiers = prefix_tiers(10**6)
    lease = tiers.lease(a.manifest.sha256, lambda: a)
    tiers.drop(a.manifest.sha256, host=True)
    assert a.manifest.sha256 in tiers.device  # still leased by a running request
    lease.release()
    tiers.drop(a.manifest.sha256, host=True)
    assert a.manifest.sha256 not in tiers.device


def held_bytes(tiers: Tiers) -> int:
    """Bytes of the distinct storages behind both tiers' tensors: memory that exists once counts once."""
    payloads = [e.payload for e in tiers.device.values()]
    tensors = [t for p in payloads for t in (p.kv, p.encoder_kv, p.cross_kv) if t is not None]
    tensors += [t for a in tiers.host.values() for t in a.tensors.values()]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def use(tiers: Tiers, a) -> None:
    """What the task registry does for a request: device tier, else host tier, else the store (here: `a`)."""
    tiers.lease(a.manifest.sha256, lambda: a).release()


def test_on_cpu_the_device_prefix_is_the_artifacts_memory_and_one_tier_holds_it():
    """CPU, model dtype = artifact dtype: `.to(device, dtype)` returns the artifact's own tensor, so the host tier
    keeps only prefixes the device tier does not hold (evicted ones move down, host hits move up), and the two
    byte counts add up to the memory that exists."""
    arts = [art(i) for i in range(4)]
    size = arts[0].nbytes
    tiers = prefix_tiers(2 * size, 2 * size)
    p = tiers.lease(arts[0].manifest.sha256, lambda: arts[0])
    assert p.payload.kv.data_ptr() == arts[0].kv.data_ptr()  # one storage: the device tier's bytes are the artifact's
    p.release()
    for a in arts[1:]:
        use(tiers, a)
    resident = {a.manifest.sha256 for a in arts if a.manifest.sha256 in tiers.device}
    below = {a.manifest.sha256 for a in arts if a.manifest.sha256 in tiers.host}
    assert resident == {arts[2].manifest.sha256, arts[3].manifest.sha256} and below == {
        arts[0].manifest.sha256, arts[1].manifest.sha256}  # no prefix in both: 4 prefixes in room for 2 + 2
    assert tiers.device.bytes_used + tiers.host.bytes_used == held_bytes(tiers) == 4 * size
    use(tiers, arts[0])  # a host hit moves up, the device's least recent (arts[2]) moves down
    assert arts[0].manifest.sha256 in tiers.device and arts[0].manifest.sha256 not in tiers.host
    assert arts[2].manifest.sha256 in tiers.host and tiers.host.stats.hits == 1 and tiers.host.stats.evictions == 0
    assert tiers.device.bytes_used + tiers.host.bytes_used == held_bytes(tiers) == 4 * size
    tiers.drop(arts[3].manifest.sha256, host=False)  # a moved name's old version leaves the device, stays warm below
    assert arts[3].manifest.sha256 in tiers.host and arts[1].manifest.sha256 not in tiers.host  # host LRU made room
    assert tiers.host.stats.evictions == 1 and tiers.host.bytes_used == 2 * size
    assert tiers.device.bytes_used + tiers.host.bytes_used == held_bytes(tiers) == 3 * size


def test_a_device_copy_in_another_dtype_is_separate_memory_and_the_host_keeps_its_own():
    """bf16 model, fp32 artifacts (on a GPU: any artifact): the device tensors are a copy, so the host tier keeps
    the artifact of a resident prefix too, and each tier counts the memory it alone holds."""
    arts = [art(i) for i in range(3)]
    size = arts[0].nbytes
    tiers = prefix_tiers(size, 3 * size, torch.bfloat16)  # room for two bf16 prefixes
    for a in arts:
        use(tiers, a)
    p = tiers.lease(arts[2].manifest.sha256, lambda: arts[2])
    assert p.payload.kv.data_ptr() != arts[2].kv.data_ptr() and p.payload.kv.dtype == torch.bfloat16
    p.release()
    assert len(tiers.device) == 2 and len(tiers.host) == 3 and tiers.device.bytes_used == size
    assert tiers.device.bytes_used + tiers.host.bytes_used == held_bytes(tiers) == 4 * size


def test_payloads_of_any_kind():
    """The tiers ask a payload only its bytes and whether it is its artifact's memory: another task kind (LoRA
    weights, say) lives in the same budget, evicted and pinned the same way."""
    class Adapter:
        nbytes = 100

    class OnDevice:
        def __init__(self, version: str):
            self.version, self.nbytes, self.shares_host_memory = version, 60, False

    tiers = Tiers(100, 1000, lambda version, a: OnDevice(version))
    held = tiers.lease("lora-1", Adapter)
    tiers.lease("lora-2", Adapter).release()  # over the device budget: the unpinned one leaves
    assert held.payload.version == "lora-1" and [e.payload for e in tiers.device.values()] == [held.payload]
    assert "lora-1" in tiers.host and "lora-2" in tiers.host  # payloads of their own: the artifacts stay below
    held.release()
