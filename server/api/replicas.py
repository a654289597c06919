"""GET /replicas: the replicas sharing this backend and which of the caller's tasks each holds (the console's
replica column); and the heartbeat that publishes this replica's record (prefix_store/replicas.py)."""
from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from typing import Any

from fastapi import APIRouter

from prefix_store.base import StoreError
from prefix_store.replicas import ReplicaRecord, Replicas
from server.api.auth import AuthenticatedRoute, CallerDep
from server.api.deps import AppState, StateDep
from server.api.errors import error_responses
from server.api.service import visible_tasks

logger = logging.getLogger(__name__)
router = APIRouter(tags=["replicas"], route_class=AuthenticatedRoute, responses=error_responses())
HEARTBEAT_S = 5.0


def this_replica(state: AppState) -> ReplicaRecord:
    """This replica's record now: the stored names whose current version is on the device, or else in host memory."""
    s = state.settings
    record = state.replica or ReplicaRecord(secrets.token_hex(8), s.replica_name or f"{socket.gethostname()}:{s.port}",
                                            time.time())
    state.replica = record
    device, host = {}, {}
    for name, m in list(state.tasks.manifests.items()):
        if m.sha256 in state.tiers.device:
            device[name] = m.sha256
        elif m.sha256 in state.tiers.host:
            host[name] = m.sha256
    record.device, record.host = device, host
    return record


async def heartbeat(state: AppState, replicas: Replicas, every: float = HEARTBEAT_S) -> None:
    """Publish this replica's record every `every` seconds until cancelled; then remove it."""
    try:
        while True:
            try:
                await replicas.publish(this_replica(state))
            except StoreError as e:  # the store is down: other replicas stop seeing this one until it is back
                logger.debug("cannot publish this replica's record: %s", e)
            await asyncio.sleep(every)
    finally:
        if state.replica is not None:
            try:
                await asyncio.shield(replicas.remove(state.replica.id))
            except (StoreError, asyncio.CancelledError):
                pass


@router.get("/replicas")
async def list_replicas(state: StateDep, caller: CallerDep) -> dict[str, Any]:
    """The live replicas sharing this server's store, each with the caller's tasks it holds on the device or in
    host memory (by the names the caller uses; a task at another version than the current one is not listed)."""
    visible = await visible_tasks(state, caller)
    public = {stored: (name, m.sha256) for name, (stored, m) in visible.items()}
    mine = this_replica(state)  # this replica as it is now, not as it last published (or before it could)
    records = sorted([r for r in await state.replicas.list() if r.id != mine.id] + [mine], key=lambda r: r.name)

    def held(tier: dict[str, str]) -> list[str]:
        return sorted(public[n][0] for n, v in tier.items() if n in public and public[n][1] == v)

    return {"replicas": [{"id": r.id, "name": r.name, "started": r.started, "seen": r.seen, "self": r.id == mine.id,
                          "device": held(r.device), "host": held(r.host)} for r in records]}
