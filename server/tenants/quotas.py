"""Quota checks for one tenant, on counters shared through the store's backend (prefix_store/counters.py).

The API layer calls these; they raise QuotaExceeded (HTTP 429 with Retry-After) or LimitExceeded (a 4xx naming
the limit). Bucket keys use the tenant label, so the anonymous caller has its own buckets. While the counters'
store cannot be reached (Redis down), rate and concurrency quotas are not counted (logged) rather than refuse
the requests that cached tasks can still serve.
"""
from __future__ import annotations

import logging
import math
import secrets
import time
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import AsyncIterator, Awaitable, TypeVar

from prefix_store.base import StoreError, StoreUnavailable
from prefix_store.counters import Counters
from server.tenants.namespaces import Caller

logger = logging.getLogger(__name__)
T = TypeVar("T")
SLOT_TTL_S = 3600.0  # a concurrency slot whose replica died without freeing it expires after this


class QuotaExceeded(Exception):
    """A rate or concurrency quota is used up for now: HTTP 429, retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))


class LimitExceeded(Exception):
    """A request or upload is larger than the tenant may ever send: `status` (422 or 403), naming the limit."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


class Quotas:
    """The quota checks of one server, on shared counters."""

    def __init__(self, counters: Counters):
        self.counters = counters
        self._warned = 0.0

    async def _counted(self, call: Awaitable[T], unreachable: T) -> T:
        """A counter call; `unreachable` (let the request through) when the store cannot be reached."""
        try:
            return await call
        except StoreUnavailable as e:
            if time.monotonic() - self._warned > 10:
                self._warned = time.monotonic()
                logger.warning("quotas not counted while the store is unreachable: %s", e)
            return unreachable

    async def admit(self, caller: Caller) -> None:
        """Count one request against requests_per_second (429 when the bucket is empty)."""
        rate = caller.limits.requests_per_second
        if rate <= 0:
            return
        wait = await self._counted(self.counters.take(f"rps:{caller.label}", rate, caller.limits.burst, 1), 0.0)
        if wait > 0:
            raise QuotaExceeded(f"tenant {caller.label!r}: over requests_per_second ({rate:g})", wait)

    @asynccontextmanager
    async def slot(self, caller: Caller) -> AsyncIterator[None]:
        """Hold one of the tenant's concurrent_requests slots for the body of the `async with` (429 if none)."""
        limit = caller.limits.concurrent_requests
        if limit <= 0:
            yield
            return
        key, member = f"conc:{caller.label}", secrets.token_hex(8)
        if not await self._counted(self.counters.enter(key, limit, member, SLOT_TTL_S), True):
            raise QuotaExceeded(f"tenant {caller.label!r}: over concurrent_requests ({limit})", 1)
        try:
            yield
        finally:
            try:
                await self.counters.leave(key, member)
            except StoreError as e:  # the slot expires after SLOT_TTL_S
                logger.warning("could not free a concurrency slot of %s: %s", caller.label, e)

    def check_lengths(self, caller: Caller, prompt_tokens: int, max_new_tokens: int) -> None:
        """max_prompt_tokens and max_new_tokens (422 naming the limit)."""
        lim = caller.limits
        if lim.max_prompt_tokens and prompt_tokens > lim.max_prompt_tokens:
            raise LimitExceeded(f"prompt: {prompt_tokens} tokens, more than this tenant's max_prompt_tokens "
                                f"({lim.max_prompt_tokens})")
        if lim.max_new_tokens and max_new_tokens > lim.max_new_tokens:
            raise LimitExceeded(f"max_new_tokens: {max_new_tokens}, more than this tenant's max_new_tokens "
                                f"({lim.max_new_tokens})")

    async def reserve_tokens(self, caller: Caller, tokens: int) -> int:
        """Take `tokens` (prompt + max_new_tokens) from tokens_per_minute; the number taken (0: no quota)."""
        tpm = caller.limits.tokens_per_minute
        if tpm <= 0:
            return 0
        if tokens > tpm:
            raise LimitExceeded(f"prompt + max_new_tokens: {tokens} tokens, more than this tenant's "
                                f"tokens_per_minute ({tpm}) allows in one request")
        wait = await self._counted(self.counters.take(f"tpm:{caller.label}", tpm / 60.0, tpm, tokens), 0.0)
        if wait > 0:
            raise QuotaExceeded(f"tenant {caller.label!r}: over tokens_per_minute ({tpm})", wait)
        return tokens

    async def refund_tokens(self, caller: Caller, tokens: int) -> None:
        """Give back reserved tokens a request did not use."""
        if tokens > 0 and caller.limits.tokens_per_minute > 0:
            try:
                await self.counters.take(f"tpm:{caller.label}", caller.limits.tokens_per_minute / 60.0,
                                         caller.limits.tokens_per_minute, -tokens)
            except StoreError as e:  # the request is done; the tenant only waits a little longer
                logger.warning("could not refund %d tokens to %s: %s", tokens, caller.label, e)

    def storage_lock(self, caller: Caller) -> AbstractAsyncContextManager:
        """Held around the storage check and the write of an upload, so concurrent uploads cannot overshoot
        (only for a tenant with a storage quota: other uploads do not wait for each other)."""
        if not (caller.limits.prefixes or caller.limits.prefix_bytes):
            return nullcontext()
        return self.counters.lock(f"upload:{caller.label}")

    def check_storage(self, caller: Caller, count: int, nbytes: int) -> None:
        """`count` tasks totalling `nbytes` after an upload must fit prefixes and prefix_bytes (403)."""
        lim = caller.limits
        if lim.prefixes and count > lim.prefixes:
            raise LimitExceeded(f"tenant {caller.label!r}: the upload would make {count} prefixes, more than its "
                                f"prefixes quota ({lim.prefixes})", 403)
        if lim.prefix_bytes and nbytes > lim.prefix_bytes:
            raise LimitExceeded(f"tenant {caller.label!r}: the upload would make {nbytes} stored bytes, more than "
                                f"its prefix_bytes quota ({lim.prefix_bytes})", 403)
