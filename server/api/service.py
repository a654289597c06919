"""Between the routes and the engine: resolve a task to a lease on its device payload, submit, and follow the
tokens as text (stop strings, detokenisation, metrics). No model work here: only `engine.submit` and awaits."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Annotated, AsyncIterator

from fastapi import Depends, Request

from prefix_store.artifact import Manifest
from server.api.deps import AppState
from server.api.errors import APIError, validation
from server.api.text import IncrementalDecoder, StopMatcher
from server.engine.request import GenerationResult, RequestHandle
from server.engine.sampling import SamplingParams
from server.tenants.namespaces import Caller, first_found, public_name, split_ref, split_stored
from server.tiers.tiers import Lease

logger = logging.getLogger(__name__)
request_log = logging.getLogger("prefixserve.requests")  # one line per finished generation, with its tenant
RETIRED_POLL_S = 0.05  # how often an abandoned request is checked for its end (the engine retires it next step)


async def acquire_task(state: AppState, caller: Caller, task: str) -> tuple[Lease, str]:
    """A lease on the device payload serving `task` (NAME or NAME@VERSION) for `caller`, and its stored name: their
    own task first, then the shared one (server/tenants/namespaces.py). The engine gives the lease back."""
    name, version = split_ref(task)
    at = f"@{version}" if version else ""

    async def acquire(stored: str, shadowing: bool) -> Lease:
        # the caller's own name, with a shared one behind it: its absence is remembered (StoreError -> 503)
        return await state.tasks.acquire(stored + at, caller.namespace_version if shadowing else None)

    stored, lease = await first_found(caller, name, version, acquire)
    return lease, stored


async def visible_tasks(state: AppState, caller: Caller) -> dict[str, tuple[str, Manifest]]:
    """Every stored task `caller` can use, by the name they use: {public name: (stored name, manifest)}."""
    listing = await state.store.list()
    names = set(listing)
    seen = ((public_name(caller, stored, names), stored, m) for stored, m in listing.items())
    return {public: (stored, m) for public, stored, m in sorted(seen, key=lambda x: x[0] or "") if public}


@dataclass
class TokenOut:
    """One generated token as the routes see it."""

    id: int
    logprob: float
    text: str  # the token's own text (TGI's token.text)
    special: bool
    visible: str  # text to show now: stop strings removed and possible stop prefixes held back
    index: int
    last: bool = False  # the final token: finish_reason and text are settled
    top: tuple[tuple[int, float], ...] = ()  # the most likely tokens at this step, when the request asked


@dataclass
class Generation:
    """One submitted request followed as text; iterate `tokens()`, then read `text`, `finish_reason`, `result`.

    However it ends (its tokens all read, the reader gone mid-way, never read at all), it is booked exactly once:
    metrics, the log line, and the tokens_per_minute reservation it did not use given back (`abandon()` for the
    endings where nobody reads it to the end).
    """

    state: AppState
    handle: RequestHandle
    task: str | None
    route: str
    version: str | None
    stops: list[str]
    caller: Caller
    reserved: int = 0  # tokens_per_minute reserved at admission (unused ones are refunded at the end)
    private: bool = False  # the task is a tenant's own (metrics do not name it unless the operator asks)
    decoder: IncrementalDecoder = field(init=False)
    matcher: StopMatcher = field(init=False)
    emitted: list[TokenOut] = field(default_factory=list)
    result: GenerationResult | None = None
    finish_reason: str = ""
    booking: asyncio.Task | None = field(default=None, init=False)  # set once: the request is (being) booked

    def __post_init__(self) -> None:
        self.decoder = IncrementalDecoder(self.state.tokenizer)
        self.matcher = StopMatcher(self.stops)

    @property
    def text(self) -> str:
        """The generated text so far (stop string and what follows it removed)."""
        return self.matcher.text

    async def tokens(self) -> AsyncIterator[TokenOut]:
        """Yield tokens until the request ends or a stop string appears; the last one has `last` set.

        The end is known from the token itself (the engine's finish reason on its event, or a stop string here), so
        the final event needs no look-ahead. A request that ends otherwise (cancelled, engine error) raises APIError.
        """
        try:
            async for ev in self.handle.stream():
                special = ev.token_id in self.decoder.special
                visible = self.matcher.feed(self.decoder.add(ev.token_id))
                tok = TokenOut(ev.token_id, ev.logprob, self.decoder.token_text(ev.token_id), special, visible,
                               ev.index, top=ev.top)
                self.emitted.append(tok)
                if self.matcher.stopped:
                    self.handle.cancel()
                    self._settle("stop_sequence")
                elif ev.finish_reason is not None:  # the engine's rule (request.finish_reason): its last token
                    self._settle(ev.finish_reason)
                tok.last = bool(self.finish_reason)
                yield tok
                if tok.last:
                    break
            r = self.result = await self.handle.result()
        except BaseException:  # the reader went away (client disconnect, cancelled): free the row, book it later
            self.abandon()
            raise
        await asyncio.shield(self._book(r))  # booked even if this reader is cancelled meanwhile
        if not self.finish_reason:
            self._settle(r.finish_reason)
            if r.finish_reason == "error" and self.state.engine.dead:  # not this request's doing: retry elsewhere
                raise APIError(503, f"generation failed: {r.error}", "unavailable", {"Retry-After": "1"})
            if r.finish_reason == "error":
                raise APIError(500, f"generation failed: {r.error}", "generation")
            if r.finish_reason == "cancelled":
                raise APIError(503, "the request was cancelled (the server is shutting down)", "unavailable",
                               {"Retry-After": "1"})
            if r.finish_reason == "timeout":
                raise APIError(504, f"generation did not finish within the request timeout "
                                    f"({self.handle.request.timeout_s:g} s; {len(self.emitted)} tokens generated)",
                               "timeout")

    def abandon(self) -> None:
        """Nobody will read this request to its end: cancel it (its row is freed at the engine's next step) and
        book it once the engine has retired it. Does nothing to a request already booked."""
        if self.booking is None:
            self.handle.cancel()
            self._book(None)

    def _book(self, result: GenerationResult | None) -> asyncio.Task:
        """The task booking this request (started on the first call): with `result`, or once the engine has one."""
        if self.booking is None:
            self.booking = self.state.spawn(self._booked(result))
        return self.booking

    async def _booked(self, r: GenerationResult | None) -> None:
        """Metrics, the log line and the refund: the reservation less the prompt and the tokens generated (all of
        it for a request that ended before its first token: the tenant got nothing)."""
        while r is None:
            if self.handle.done:  # polled, not awaited on the handle's queue: a reader may still hold that
                r = await self.handle.result()
            else:
                await asyncio.sleep(RETIRED_POLL_S)
        generated = len(r.token_ids)
        used = r.prompt_tokens + generated if generated else 0
        reason = self.finish_reason or r.finish_reason
        self.state.metrics.observe(self.task, self.caller.label, self.route, reason, r.prompt_tokens, generated,
                                   r.submitted_at, r.first_token_at, r.finished_at, private=self.private)
        request_log.info("tenant=%s task=%s route=%s finish=%s prompt_tokens=%d generated=%d seconds=%.3f",
                         self.caller.label, self.task or "-", self.route, reason, r.prompt_tokens, generated,
                         r.finished_at - r.submitted_at)
        await self.state.quotas.refund_tokens(self.caller, self.reserved - used)

    def _settle(self, reason: str) -> None:
        """Fix the finish reason and flush the text still held back into the last token's `visible`."""
        self.finish_reason = reason
        if not self.matcher.stopped:
            tail = self.matcher.feed(self.decoder.flush())
            tail += self.matcher.flush()
            if tail and self.emitted:
                self.emitted[-1].visible += tail

    async def run(self) -> Generation:
        """Consume every token."""
        async for _ in self.tokens():
            pass
        return self


class Started:
    """The generations one HTTP request started. Once the request is over (its response sent, or given up), any
    still going or never read (a stream whose client left before it began) are abandoned: cancelled and booked."""

    def __init__(self) -> None:
        self.generations: list[Generation] = []

    def abandon(self) -> None:
        """Abandon every generation not booked yet."""
        for g in self.generations:
            g.abandon()


async def started_generations() -> AsyncIterator[Started]:
    """The request's Started; FastAPI runs the part after `yield` when the response is over, however it ended."""
    started = Started()
    try:
        yield started
    finally:
        started.abandon()


StartedDep = Annotated[Started, Depends(started_generations)]


async def start(state: AppState, caller: Caller, started: Started, task: str | None, prompt_ids: list[int],
                params: SamplingParams, stops: list[str], route: str) -> Generation:
    """Check the caller's limits, reserve its tokens, lease the task's payload and submit (the engine gives the
    lease back when the request ends); on any refusal before that the lease is given back here, the tokens
    refunded and the error raised. The generation joins `started`."""
    state.quotas.check_lengths(caller, len(prompt_ids), params.max_new_tokens)
    reserved = await state.quotas.reserve_tokens(caller, len(prompt_ids) + params.max_new_tokens)
    lease, stored = None, None
    name = task.partition("@")[0] if task else None  # metrics and engine tags by name, not by version
    try:
        if task:
            lease, stored = await acquire_task(state, caller, task)
        handle = state.engine.submit(prompt_ids, params, lease, tag=name or "", tenant=caller.tenant,
                                     weight=caller.limits.weight)
    except BaseException as e:
        if lease is not None:
            lease.release()
        await state.quotas.refund_tokens(caller, reserved)
        if isinstance(e, ValueError):
            raise validation(str(e)) from None
        raise
    private = stored is not None and split_stored(stored)[0] is not None
    gen = Generation(state, handle, name, route, lease.version if lease else None, stops, caller, reserved,
                     private)
    started.generations.append(gen)
    return gen


Job = tuple[str | None, list[int], SamplingParams, list[str]]  # task, prompt ids, sampling, stop strings


async def start_many(state: AppState, caller: Caller, started: Started, jobs: list[Job],
                     route: str) -> list[Generation]:
    """Submit several requests all or nothing: if one is refused, the ones already queued are abandoned."""
    gens: list[Generation] = []
    try:
        for task, ids, params, stops in jobs:
            gens.append(await start(state, caller, started, task, ids, params, stops, route))
    except BaseException:
        for g in gens:
            g.abandon()
        raise
    return gens


async def until_disconnect(request: Request) -> None:
    """Return when the client disconnects (the request body must already be read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _retrieved(fut: asyncio.Future) -> None:
    """Mark a future's outcome as seen. A cancelled gather finishes with its children's CancelledError set as an
    exception (not as cancelled), which asyncio would log as 'exception was never retrieved' once collected."""
    if not fut.cancelled():
        fut.exception()


async def run_or_cancel(request: Request, gens: list[Generation]) -> list[Generation]:
    """Run generations to the end; if the client goes away first (or one fails), abandon the others so their rows
    are freed."""
    work = asyncio.gather(*(g.run() for g in gens))
    work.add_done_callback(_retrieved)  # when cancelled below, nobody awaits it
    watch = asyncio.ensure_future(until_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        gone = not work.done()  # the client left (or this request is being cancelled)
        if gone or work.exception() is not None:
            for g in gens:
                g.abandon()
        if gone:
            work.cancel()
    if gone:
        raise APIError(499, "client disconnected", "cancelled")
    return work.result()
