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
def test_reserved_rows_keep_a_row_for_an_active_light_tenant(loaded, reserved):
    """Batch 4, A floods, B is active: with one reserved row A holds at most 3 rows and B's next request starts at
    the next step, ahead of A's backlog; without (control) A fills the batch and B waits for one of A's rows."""
    engine = Engine(loaded, EngineConfig(max_batch_size=4, reserved_rows=reserved, reserve_window_s=60))
    long = SamplingParams(max_new_tokens=30, ignore_eos=True)
    b0 = engine.submit([21, 22], SamplingParams(max_new_tokens=1, ignore_eos=True), tenant="B", loop=None)
    engine.step()  # B's one-token request runs and finishes: B is idle now, but sent a request within the window
    assert b0.done and engine.batch_size == 0
    flood = [engine.submit([11, 12, 13], long, tenant="A", loop=None) for _ in range(10)]
    for _ in range(3):
        engine.step()
    assert _rows_of(engine, "A") == 4 - reserved and engine.batch_size == 4 - reserved
    b1 = engine.submit([23, 24, 25], long, tenant="B", loop=None)
    engine.step()
    assert bool(b1.events) == bool(reserved)  # with the reserved row, B's request got its first token at once
    assert sum(1 for h in flood if h.events) == 4 - reserved


def test_a_tenant_stays_active_for_the_window_after_its_request_ends(loaded):
    """B sends one request at a time, each longer than the window: when one ends, B counts as active from then (its
    next one is on its way), so A does not take the row that ending freed, and B's next request starts at once."""
    import time

    engine = Engine(loaded, EngineConfig(max_batch_size=4, reserved_rows=1, reserve_window_s=0.25))
    long = SamplingParams(max_new_tokens=40, ignore_eos=True)
    b0 = engine.submit([21, 22], SamplingParams(max_new_tokens=3, ignore_eos=True), tenant="B", loop=None)
    flood = [engine.submit([11, 12, 13], long, tenant="A", loop=None) for _ in range(10)]
    engine.step()
    assert _rows_of(engine, "A") == 3 and _rows_of(engine, "B") == 1
    time.sleep(0.3)  # B queued b0 longer ago than the window
    while not b0.done:
        engine.step()
    engine.step()
    assert _rows_of(engine, "A") == 3 and engine.batch_size == 3  # the freed row waits for B
    b1 = engine.submit([23, 24, 25], long, tenant="B", loop=None)
    engine.step()
    assert b1.events  # its first token at the next step
    b1.cancel()
    engine.step()  # b1 retired: B active for the window from now
    assert _rows_of(engine, "A") == 3
    time.sleep(0.3)
    engine.step()
    assert _rows_of(engine, "A") == 4  # B quiet for longer than the window: A may use every row again
    assert not any(h.done for h in flood[:4])


def test_a_tenant_alone_uses_every_row_and_the_reservation_lapses(loaded):
    engine = Engine(loaded, EngineConfig(max_batch_size=4, reserved_rows=2, reserve_window_s=0.0))
    long = SamplingParams(max_new_tokens=30, ignore_eos=True)
    flood = [engine.submit([11, 12, 13], long, tenant="A", loop=None) for _ in range(6)]
    engine.step()
    assert _rows_of(engine, "A") == 4  # nobody else active: no row held back
    b = engine.submit([5, 6], long, tenant="B", loop=None)  # B waits (all rows busy) and is active while it waits
    for _ in range(40):
        engine.step()
        if b.events:
            break
    assert b.events and _rows_of(engine, "A") <= 2  # while B runs, A may not take the 2 reserved rows
    assert all(h.done or h.events for h in flood[:4])
    with pytest.raises(ValueError, match="reserved_rows"):
        Engine(loaded, EngineConfig(max_batch_size=4, reserved_rows=4))
