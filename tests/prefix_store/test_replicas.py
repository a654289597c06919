"""The replica registry on both backends: a record is listed while renewed, replaced by its next heartbeat, gone
once removed or stale, and an unreadable record is skipped."""
from __future__ import annotations

import asyncio
import time

from prefix_store.backend import open_backend
from prefix_store.replicas import ReplicaRecord


async def test_publish_list_renew_remove_and_stale(backend):
    b = open_backend(backend)
    try:
        reg = b.replicas
        reg.stale_s = 0.5
        a, c = ReplicaRecord("aaaa", "replica-a", time.time()), ReplicaRecord("cccc", "replica-c", time.time())
        a.device, c.host = {"e2e": "1" * 64}, {"webnlg": "2" * 64}
        await reg.publish(c)
        await reg.publish(a)
        listed = await reg.list()
        assert [r.name for r in listed] == ["replica-a", "replica-c"]
        assert listed[0].device == {"e2e": "1" * 64} and listed[1].host == {"webnlg": "2" * 64}
        a.device = {}
        await reg.publish(a)  # the next heartbeat replaces the record
        assert [r.device for r in await reg.list()] == [{}, {}]
        await reg.remove("cccc")
        assert [r.id for r in await reg.list()] == ["aaaa"]
        await asyncio.sleep(0.7)  # not renewed: stale, left out and dropped
        assert await reg.list() == []
        reg.stale_s = 60
        assert await reg.list() == []  # dropped for good, not only hidden
    finally:
        await b.close()


def test_a_damaged_record_is_skipped():
    assert ReplicaRecord.from_json(b"{not json") is None and ReplicaRecord.from_json(b'{"id": 1}') is None
