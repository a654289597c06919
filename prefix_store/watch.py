"""Helpers shared by the backends' `watch`: snapshot diffs, callback calls, reconnect backoff, version refs."""
from __future__ import annotations

import asyncio
import inspect
import logging
import random
from typing import Iterable

from prefix_store.base import EventCallback, InvalidTaskName, StoreEvent, VersionNotFound

logger = logging.getLogger(__name__)


def diff_snapshots(old: dict[str, str], new: dict[str, str]) -> list[StoreEvent]:
    """Events that turn `old` into `new`: changed or added names, then deleted ones (version None)."""
    events = [StoreEvent(n, v) for n, v in sorted(new.items()) if old.get(n) != v]
    return events + [StoreEvent(n, None) for n in sorted(old) if n not in new]


async def deliver(callback: EventCallback, event: StoreEvent) -> None:
    """Call a sync or async callback; log (never propagate) its errors so the watcher keeps running."""
    try:
        result = callback(event)
        if inspect.isawaitable(result):
            await result
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception("store watch callback failed on %s", event)


class Backoff:
    """Exponential reconnect delays with jitter: 0.1 s doubling up to `cap` seconds; `reset` after success."""

    def __init__(self, first: float = 0.1, cap: float = 5.0):
        self.first, self.cap, self.delay = first, cap, first

    async def sleep(self) -> None:
        """Wait the current delay (with +-20% jitter) and double it."""
        await asyncio.sleep(self.delay * random.uniform(0.8, 1.2))
        self.delay = min(self.cap, self.delay * 2)

    def reset(self) -> None:
        """Start again from the first delay."""
        self.delay = self.first


def resolve_version(name: str, ref: str, versions: Iterable[str]) -> str:
    """The one stored version that `ref` (a full sha256 or a prefix of >= 7 hex digits) names."""
    if len(ref) == 64:
        if ref in versions:
            return ref
        raise VersionNotFound(name, ref)
    hits = sorted(v for v in versions if v.startswith(ref))
    if not hits:
        raise VersionNotFound(name, ref)
    if len(hits) > 1:
        raise InvalidTaskName(f"version {ref!r} of {name!r} is ambiguous ({len(hits)} versions): give more digits")
    return hits[0]
