"""Which waiting request gets the next free row: fair sharing between tenants by tokens served.

A virtual token counter (VTC; Sheng et al., "Fairness in Serving Large Language Models", OSDI 2024). Each tenant
has a counter of the service it has received: prompt tokens (charged at admission) times `prompt_weight` plus
generated tokens (charged as they are produced) times `output_weight`, divided by the tenant's share weight.
When a row frees up, the waiting request of the backlogged tenant with the smallest counter is admitted; within a
tenant, requests are served first in, first out. A tenant that becomes backlogged again is lifted to the smallest
counter among the backlogged tenants (or, when nobody waits, to the counter of the tenant admitted last), so time
spent idle is not banked as credit to flood with later. Ties go to the request that arrived first.

Reserved rows (`reserved_rows`, off by default): R rows beyond `max_batch_size` that only a tenant holding no row
may take. A flooder holding the whole batch keeps it, and a light tenant's request still starts at the next step
instead of waiting for one of the flood's rows to finish (rows are never preempted). The engine applies it
(`Engine._admit`); this queue lets it pass over the tenants that hold a row (`peek(exclude=...)`).

Priorities are share weights, not classes: a tenant of weight 2 is charged half per token, so while both are
backlogged it gets twice the tokens of a tenant of weight 1; nobody is starved. A tenant's weight comes with its
requests (`Request.weight`, the latest one counts). The engine knows tenants only as strings ("" = anonymous, one
tenant like any other); the queue is not thread-safe: the engine holds its lock. With `fifo=True` every request
counts as one tenant's: plain first in, first out (the baseline the fairness benchmark compares against).
"""
from __future__ import annotations

import itertools
from collections import deque
from typing import Callable, Iterator

from server.engine.request import RequestHandle

MAX_IDLE_COUNTERS = 4096  # idle tenants' counters kept before those that would be lifted anyway are forgotten


class FairQueue:
    """Waiting requests, one FIFO per tenant, served by smallest virtual token counter (see the module docstring)."""

    def __init__(self, prompt_weight: float = 1.0, output_weight: float = 2.0, fifo: bool = False):
        if prompt_weight < 0 or output_weight < 0 or prompt_weight + output_weight <= 0:
            raise ValueError("token weights must be >= 0 and not both 0")
        self.prompt_weight, self.output_weight, self.fifo = prompt_weight, output_weight, fifo
        self._weights: dict[str, float] = {}  # share weights other than 1
        self._queues: dict[str, deque[tuple[int, RequestHandle]]] = {}  # backlogged tenants only
        self._counters: dict[str, float] = {}
        self._floor = 0.0  # counter of the tenant admitted last: the lift when nobody is backlogged
        self._arrivals = itertools.count()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[RequestHandle]:
        for q in self._queues.values():
            for _, h in q:
                yield h

    def counter(self, tenant: str) -> float:
        """The tenant's virtual token counter (service received, in weighted tokens)."""
        return self._counters.get(tenant, 0.0)

    def depths(self) -> dict[str, int]:
        """Waiting requests per backlogged tenant."""
        return {t: len(q) for t, q in self._queues.items()}

    def push(self, handle: RequestHandle) -> None:
        """Queue a request behind its tenant's earlier ones; lift a newly backlogged tenant's counter."""
        tenant, weight = self._tenant(handle), handle.request.weight
        if weight <= 0:
            raise ValueError(f"weight must be > 0, got {weight}")
        if weight != 1.0:
            self._weights[tenant] = weight
        else:
            self._weights.pop(tenant, None)
        q = self._queues.get(tenant)
        if q is None:
            lift = min((self._counters.get(t, 0.0) for t in self._queues), default=self._floor)
            self._counters[tenant] = max(self._counters.get(tenant, 0.0), lift)
            q = self._queues[tenant] = deque()
            if len(self._counters) > MAX_IDLE_COUNTERS + len(self._queues):
                self._forget_idle()
        q.append((next(self._arrivals), handle))
        self._len += 1

    def peek(self, exclude: frozenset[str] | set[str] = frozenset()) -> RequestHandle | None:
        """The request to admit next: the head of the backlogged tenant with the smallest counter (tenants in
        `exclude` passed over)."""
        tenants = [t for t in self._queues if t not in exclude] if exclude else self._queues
        if not tenants:
            return None
        tenant = min(tenants, key=lambda t: (self._counters[t], self._queues[t][0][0]))
        return self._queues[tenant][0][1]

    def tenant_of(self, handle: RequestHandle) -> str:
        """The tenant a request is scheduled as ("" for everyone under fifo)."""
        return self._tenant(handle)

    def pop(self, charge: bool = True, exclude: frozenset[str] | set[str] = frozenset()) -> RequestHandle:
        """Take the request `peek(exclude)` names; when it is admitted (`charge`), charge its tenant for its
        prompt."""
        handle = self.peek(exclude)
        if handle is None:
            raise IndexError("pop from an empty FairQueue")
        tenant = self._tenant(handle)
        self._take(tenant)
        if charge:
            self.charge(tenant, prompt_tokens=len(handle.request.prompt_ids))
            self._floor = max(self._floor, self._counters[tenant])
        return handle

    def charge(self, tenant: str, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        """Add served tokens to a tenant's counter (weighted, divided by the tenant's share weight)."""
        if self.fifo:
            return
        cost = prompt_tokens * self.prompt_weight + output_tokens * self.output_weight
        self._counters[tenant] = self._counters.get(tenant, 0.0) + cost / self._weights.get(tenant, 1.0)

    def remove_if(self, pred: Callable[[RequestHandle], bool]) -> list[RequestHandle]:
        """Take out (uncharged) every waiting request for which `pred` is true; return them in arrival order."""
        out: list[tuple[int, RequestHandle]] = []
        for tenant in list(self._queues):
            keep: deque[tuple[int, RequestHandle]] = deque()
            for item in self._queues[tenant]:
                (out if pred(item[1]) else keep).append(item)  # pred once per item: flags may flip meanwhile
            self._len -= len(self._queues[tenant]) - len(keep)
            if keep:
                self._queues[tenant] = keep
            else:
                del self._queues[tenant]
        return [h for _, h in sorted(out, key=lambda item: item[0])]

    def drain(self) -> list[RequestHandle]:
        """Take out every waiting request (uncharged), in arrival order."""
        return self.remove_if(lambda _: True)

    def _tenant(self, handle: RequestHandle) -> str:
        return "" if self.fifo else handle.request.tenant

    def _take(self, tenant: str) -> None:
        q = self._queues[tenant]
        q.popleft()
        self._len -= 1
        if not q:
            del self._queues[tenant]

    def _forget_idle(self) -> None:
        """Drop counters of idle tenants that a lift would raise anyway (at or below the floor)."""
        for t in [t for t, c in self._counters.items() if t not in self._queues and c <= self._floor]:
            del self._counters[t]
            self._weights.pop(t, None)
