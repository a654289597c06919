"""Fair scheduling: the virtual-token-counter queue's ordering rules, and tenants sharing a saturated engine."""
from __future__ import annotations

import pytest

from server.engine.engine import Engine, EngineConfig
from server.engine.request import Request, RequestHandle
from server.engine.sampling import SamplingParams
from server.engine.scheduler import MAX_IDLE_COUNTERS, FairQueue


def req(tenant: str, prompt_len: int = 10, tag: str = "", weight: float = 1.0) -> RequestHandle:
    return RequestHandle(Request(list(range(1, prompt_len + 1)), SamplingParams(), None, tag, tenant, weight), None)


def admit_all(q: FairQueue, output_tokens: int = 0) -> list[RequestHandle]:
    """Pop everything, charging each admitted request `output_tokens` generated tokens as if it ran at once."""
    out = []
    while q:
        h = q.pop()
        q.charge(h.request.tenant, output_tokens=output_tokens)
        out.append(h)
    return out


def test_fifo_within_a_tenant():
    q = FairQueue()
    hs = [req("a", prompt_len=n) for n in (5, 1, 9, 3)]
    for h in hs:
        q.push(h)
    assert admit_all(q) == hs


def test_backlogged_tenants_alternate_by_tokens_served():
    q = FairQueue()
    a = [req("a", tag=f"a{i}") for i in range(6)]
    b = [req("b", tag=f"b{i}") for i in range(6)]
    for h in a + b:  # all of a's arrive first
        q.push(h)
    order = [h.request.tag for h in admit_all(q, output_tokens=5)]
    assert order == ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "b3", "a4", "b4", "a5", "b5"]


def test_smallest_counter_first_and_costs_in_tokens():
    q = FairQueue(prompt_weight=1.0, output_weight=2.0)
    for _ in range(4):
        q.push(req("big", prompt_len=100))
        q.push(req("small", prompt_len=10))
    order = [h.request.tenant for h in admit_all(q)]
    # ties go to the earlier arrival; after that 'small' gets ~10 requests per 'big' request, in tokens
    assert order == ["big", "small", "small", "small", "small", "big", "big", "big"]
    assert q.counter("big") == 400 and q.counter("small") == 40
    q.charge("small", output_tokens=10)
    assert q.counter("small") == 60  # generated tokens cost output_weight each


def test_returning_tenant_is_lifted_and_cannot_bank_credit():
    q = FairQueue()
    q.push(req("b", prompt_len=1))
    admit_all(q)  # b was served once, then went idle
    for _ in range(3):
        q.push(req("a", prompt_len=100))
    q.pop()
    q.pop()  # a (which started from b's 1, the last admitted counter): 200 tokens while b was away
    q.push(req("b", prompt_len=100))
    assert q.counter("b") == q.counter("a") == 201  # lifted to the backlogged minimum, not left at 1
    order = [h.request.tenant for h in admit_all(q)]
    assert order == ["a", "b"]  # tie: arrival order; b gets no 199-token head start


def test_lift_when_nobody_waits_uses_the_last_admitted_counter():
    q = FairQueue()
    q.push(req("a", prompt_len=50))
    q.pop()
    q.push(req("b", prompt_len=1))
    assert q.counter("b") == 50
    q.pop()
    q.push(req("a", prompt_len=1))
    assert q.counter("a") == 51  # max(own 50, floor 51)


def test_tenant_weights_share_tokens_in_proportion():
    q = FairQueue()
    for _ in range(30):
        q.push(req("gold", weight=2.0))
        q.push(req("plain"))
    first = [h.request.tenant for h in admit_all(q)][:30]
    assert first.count("gold") == 20 and first.count("plain") == 10
    with pytest.raises(ValueError):
        q.push(req("x", weight=0))


def test_remove_if_and_drain_keep_order_and_count_without_charging():
    q = FairQueue()
    hs = [req(t, tag=str(i)) for i, t in enumerate("abab")]
    for h in hs:
        q.push(h)
    hs[1].cancel()
    assert q.remove_if(lambda h: h.request.cancelled) == [hs[1]]
    assert len(q) == 3 and q.depths() == {"a": 2, "b": 1} and q.counter("b") == 0
    assert list(q.drain()) == [hs[0], hs[2], hs[3]]
    assert len(q) == 0 and q.peek() is None and q.depths() == {}
    with pytest.raises(IndexError):
        q.pop()


def test_idle_counters_are_bounded():
    q = FairQueue()
    for i in range(MAX_IDLE_COUNTERS + 500):
        q.push(req(f"t{i}", prompt_len=1))
        q.pop()
    assert len(q._counters) <= MAX_IDLE_COUNTERS + 1


# ---------------------------------------------------------------- engine level
def _first_token_steps(engine: Engine, handles: list[RequestHandle], steps: int) -> dict[int, int]:
    """Step the (unstarted) engine until every handle has a token (or `steps` steps): each one's first-token step."""
    first: dict[int, int] = {}
    for i in range(steps):
        engine.step()
        first.update({h.id: i for h in handles if h.events and h.id not in first})
        if len(first) == len(handles):
            break
    return first


@pytest.mark.parametrize("mode", ["fair", "one tenant", "fifo"])
def test_light_tenant_is_not_starved_by_a_flood(loaded, mode):
    """A submits 40 requests, then B submits 4: B's start among the next few admissions, not after A's backlog.

    Controls: with one tenant name for both, or with fair scheduling off, the queue is plain FIFO and B waits for
    all of A.
    """
    engine = Engine(loaded, EngineConfig(max_batch_size=2, fair_scheduling=mode != "fifo"))
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    flood = [engine.submit([11, 12, 13, 14], params, tenant="A", loop=None) for _ in range(40)]
    assert len(_first_token_steps(engine, flood, steps=1)) == 2  # A has run and is backlogged
    light = [engine.submit([21, 22, 23, 24], params, tenant="A" if mode == "one tenant" else "B", loop=None)
             for _ in range(4)]
    assert len(_first_token_steps(engine, light, steps=200)) == 4
    started_a = sum(1 for h in flood if h.events)  # A's requests that got a row before B's last one did
    if mode == "fair":
        assert started_a <= 8, started_a  # 2 started before B came, then B's and A's alternate
        assert engine.queue_depths() == {"A": engine.queue_depth} and engine.queue_depth >= 30
    else:
        assert started_a == 40  # FIFO: B's last request starts after all of A's backlog


def test_queue_depths_per_tenant(loaded):
    engine = Engine(loaded, EngineConfig(max_batch_size=1))
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    hs = [engine.submit([1, 2], params, tenant=t, loop=None) for t in ("x", "x", "y", "")]
    assert engine.queue_depths() == {"x": 2, "y": 1, "": 1} and engine.queue_depth == 4
    _first_token_steps(engine, hs, steps=20)
    assert engine.queue_depths() == {} and engine.queue_depth == 0
    with pytest.raises(ValueError, match="weight"):
        engine.submit([1, 2], params, tenant="x", weight=0, loop=None)


def test_deadline_ends_queued_and_running_requests_with_timeout(loaded):
    engine = Engine(loaded, EngineConfig(max_batch_size=1, request_timeout_s=1000))
    params = SamplingParams(max_new_tokens=200, ignore_eos=True)
    running = engine.submit([1, 2, 3], params, loop=None)
    waiting = engine.submit([4, 5, 6], params, loop=None, timeout_s=0.0)  # expires in the queue
    assert running.request.timeout_s == 1000
    for _ in range(3):
        engine.step()
    assert waiting.done and waiting.wait(0).finish_reason == "timeout" and waiting.wait(0).token_ids == []
    assert not running.done and len(running.events) >= 2
    running.request.timeout_s = 0.0  # its deadline passes mid-generation: the row is retired at the next step
    engine.step()
    r = running.wait(0)
    assert r.finish_reason == "timeout" and 2 <= len(r.token_ids) < 200
    assert engine.batch_size == 0 and engine.stats.finished["timeout"] == 2


def _rows_of(engine: Engine, tenant: str) -> int:
    return sum(1 for r in engine.batch.all_rows() if r.request.tenant == tenant)


@pytest.mark.parametrize("reserved", [1, 0])
def test_a_reserved_row_starts_a_light_request_at_once_while_a_flood_holds_the_batch(loaded, reserved):
    """Batch 4, A floods and holds all 4 rows: with one reserved row B's request starts at the next step in a fifth
    row, and so does B's next one after the first ends (A refilled nothing beyond its 4); without (control) B waits
    for one of A's rows. A never takes the reserved row."""
    engine = Engine(loaded, EngineConfig(max_batch_size=4, reserved_rows=reserved))
    assert engine.cache.max_rows == 4 + reserved
    long = SamplingParams(max_new_tokens=30, ignore_eos=True)
    flood = [engine.submit([11, 12, 13], long, tenant="A", loop=None) for _ in range(10)]
    for _ in range(3):
        engine.step()
    assert _rows_of(engine, "A") == 4 and engine.batch_size == 4
    for n in (3, 5):  # one light request, then the next just after it ends
        b = engine.submit([23, 24, 25], SamplingParams(max_new_tokens=n, ignore_eos=True), tenant="B", loop=None)
        engine.step()
        assert bool(b.events) == bool(reserved)  # with the reserved row, its first token at once
        assert _rows_of(engine, "A") == 4 and engine.batch_size == 4 + bool(reserved)
        if not reserved:
            break
        while not b.done:
            engine.step()
            assert _rows_of(engine, "A") == 4
    assert sum(1 for h in flood if h.events) == 4 and not any(h.done for h in flood)


def test_reserved_rows_are_only_for_tenants_that_hold_none(loaded):
    """Two reserved rows: a tenant alone uses max_batch_size rows, never the reserved ones; B and C, holding none,
    take one each; B's second request waits for a row like anyone's."""
    engine = Engine(loaded, EngineConfig(max_batch_size=4, reserved_rows=2))
    long = SamplingParams(max_new_tokens=30, ignore_eos=True)
    flood = [engine.submit([11, 12, 13], long, tenant="A", loop=None) for _ in range(6)]
    engine.step()
    assert _rows_of(engine, "A") == 4 and engine.batch_size == 4  # the 2 reserved rows stay free
    b = [engine.submit([5, 6], long, tenant="B", loop=None) for _ in range(2)]
    c = engine.submit([7, 8], long, tenant="C", loop=None)
    engine.step()
    assert bool(b[0].events) and bool(c.events) and not b[1].events
    assert (_rows_of(engine, "A"), _rows_of(engine, "B"), _rows_of(engine, "C")) == (4, 1, 1)
    assert not any(h.done for h in flood[:4])
    with pytest.raises(ValueError, match="reserved_rows"):
        Engine(loaded, EngineConfig(max_batch_size=4, reserved_rows=5))
    assert Engine(loaded, EngineConfig(max_batch_size=4, reserved_rows=2, fair_scheduling=False)).cache.max_rows == 4
