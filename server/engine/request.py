"""What goes into the engine and what comes out: token ids in, token events and a result out. No HTTP, no text."""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol

from server.engine.device_prefix import DevicePrefix
from server.engine.lora import DeviceLora
from server.engine.sampling import SamplingParams

_ids = itertools.count(1)


class EngineOverloaded(RuntimeError):
    """The bounded request queue is full; retry later."""


class EngineStopped(RuntimeError):
    """The engine is shutting down or has stopped."""


@dataclass
class TokenEvent:
    """One generated token of one request."""

    token_id: int
    logprob: float
    index: int  # 0-based position among the generated tokens
    top: tuple[tuple[int, float], ...] = ()  # the most likely tokens and their logprobs, when the request asked
    finish_reason: str | None = None  # set on the token that ends the request (see `finish_reason`)


def finish_reason(token: int, generated: int, params: SamplingParams, eos_token_ids: frozenset[int]) -> str | None:
    """Why a request ends with `token` as its `generated`-th token, or None while it goes on: max_new_tokens
    reached ('length'), else an EOS token unless ignore_eos ('eos_token'), else a stop token id ('stop_sequence').
    The one rule: the engine retires rows by it and the API ends its streams by it (TokenEvent.finish_reason)."""
    if generated >= params.max_new_tokens:
        return "length"
    if token in eos_token_ids and not params.ignore_eos:
        return "eos_token"
    if token in params.stop_token_ids:
        return "stop_sequence"
    return None


@dataclass
class GenerationResult:
    """The end of a request. finish_reason: length | eos_token | stop_sequence | cancelled | timeout | error."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    prompt_tokens: int
    seed: int | None
    prefix_version: str | None
    submitted_at: float
    first_token_at: float | None
    finished_at: float
    error: str | None = None

    @property
    def generated_tokens(self) -> int:
        """Number of tokens generated."""
        return len(self.token_ids)


class TaskLease(Protocol):
    """A task's device payload held for one request by its owner (server/tiers/tiers.py's Lease): the engine reads
    `payload` and the request gives the lease back with `release()` when it ends, whichever way it ends."""

    version: str
    payload: Any

    def release(self) -> None:
        """Give the hold back (once)."""


@dataclass(frozen=True)
class Unheld:
    """A payload that nothing holds (tests, benchmarks and tools that build their payloads): nothing to give back."""

    payload: DevicePrefix | DeviceLora

    @property
    def version(self) -> str:
        """The payload's version."""
        return self.payload.version

    def release(self) -> None:
        """Nothing to give back."""


@dataclass(eq=False)
class Request:
    """A request as the engine sees it; created by `Engine.submit`."""

    prompt_ids: list[int]
    params: SamplingParams
    task: TaskLease | None  # the lease on its task's payload (None: the base model alone)
    tag: str = ""  # free-form label for metrics (the task name)
    tenant: str = ""  # whose request: the scheduler shares the engine fairly between tenants
    weight: float = 1.0  # the tenant's share weight: 2 = twice the tokens of a weight-1 tenant when both wait
    timeout_s: float | None = None  # deadline after submission (queue + generation); None: no deadline
    id: int = field(default_factory=lambda: next(_ids))
    submitted_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    decoder_ids: list[int] | None = None  # encoder-decoder models: what the decoder is fed first (prompt_ids: encoder)

    @property
    def prefix(self) -> DevicePrefix | None:
        """The task's prefix on the device when its task is a prefix, else None."""
        payload = self.task.payload if self.task is not None else None
        return payload if isinstance(payload, DevicePrefix) else None

    @property
    def lora(self) -> DeviceLora | None:
        """The task's LoRA adapter on the device when its task is a LoRA adapter, else None."""
        payload = self.task.payload if self.task is not None else None
        return payload if isinstance(payload, DeviceLora) else None

    @property
    def decoder_prompt(self) -> list[int]:
        """The ids fed to the decoder (or the only stack) before generating: decoder_ids, else prompt_ids."""
        return self.prompt_ids if self.decoder_ids is None else self.decoder_ids

    @property
    def final_length(self) -> int:
        """Cache positions its row needs once it has generated max_new_tokens: prefix, decoder prompt, tokens."""
        return (self.prefix.length if self.prefix else 0) + len(self.decoder_prompt) + self.params.max_new_tokens

    def expired(self, now: float) -> bool:
        """True once the request's deadline has passed."""
        return self.timeout_s is not None and now - self.submitted_at > self.timeout_s


class RequestHandle:
    """The caller's side of a request: an async stream of TokenEvents, a result, and cancel().

    Events are produced on the engine thread and delivered to the event loop the handle was created on
    (or, with no loop, collected for `wait()` from plain threads).
    """

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop | None):
        self.request = request
        self._loop = loop
        self._queue: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._done = threading.Event()
        self._result: GenerationResult | None = None
        self.events: list[TokenEvent] = []

    @property
    def id(self) -> int:
        """The request id."""
        return self.request.id

    def cancel(self) -> None:
        """Ask the engine to stop this request; its row is freed at the next step."""
        self.request.cancelled = True

    # -- engine side: called on the engine thread; deliveries to the event loop go through an Outbox --
    def _emit(self, event: TokenEvent, outbox: Outbox) -> None:
        self.events.append(event)
        if self._loop is not None:
            outbox.add(self._loop, self._queue, event)

    def _finish(self, result: GenerationResult, outbox: Outbox) -> None:
        if self.request.task is not None:
            self.request.task.release()  # the one place a lease goes back, however the request ended
        self._result = result
        self._done.set()
        if self._loop is not None:
            outbox.add(self._loop, self._queue, result)

    # -- caller side --
    @property
    def done(self) -> bool:
        """True once the result is set."""
        return self._done.is_set()

    async def stream(self) -> AsyncIterator[TokenEvent]:
        """Yield tokens as they are generated; ends when the request finishes (result() then returns at once)."""
        assert self._queue is not None, "stream() needs a handle created inside an event loop"
        while True:
            item = await self._queue.get()
            if isinstance(item, GenerationResult):
                return
            yield item

    async def result(self) -> GenerationResult:
        """Wait for the end of the request."""
        if self._result is not None:
            return self._result
        async for _ in self.stream():
            pass
        assert self._result is not None
        return self._result

    def wait(self, timeout: float | None = None) -> GenerationResult:
        """Block the calling (non-event-loop) thread until the request finishes."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        assert self._result is not None
        return self._result


class Outbox:
    """Events of one engine step, delivered with one wake-up per event loop instead of one per token."""

    def __init__(self) -> None:
        self._items: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}

    def add(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item: object) -> None:
        """Queue an item for a handle's asyncio queue."""
        self._items.setdefault(loop, []).append((queue, item))

    def flush(self) -> None:
        """Hand everything collected to the event loops (a closed loop has nobody listening: skipped)."""
        items, self._items = self._items, {}
        for loop, batch in items.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:
                pass


def _deliver(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in batch:
        queue.put_nowait(item)
