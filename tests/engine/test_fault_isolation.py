"""A failure in one row's forward, sampling or admission fails that row alone: every other row (and every queued
request) finishes with the tokens it gives alone. What a step cannot confine to rows kills the engine loudly."""
from __future__ import annotations

import math

import pytest
import server.engine.sampling as sampling
from server.engine.engine import Engine, EngineConfig, generate_sync
from server.engine.request import EngineStopped
from server.engine.sampling import SamplingParams
from tests.engine.test_exactness import PROMPTS, device_prefix

POISON = 4242  # a token id the tests below treat as poison


def greedy(n: int = 6) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def requests(adapters, loaded) -> list[tuple[list[int], SamplingParams, object]]:
    """Ten mixed requests: prefix and prompt-tuning tasks, bare rows, greedy and seeded sampling."""
    prefixes = [device_prefix(p, loaded) for p in adapters.values()] + [None]
    out = []
    for i in range(10):
        sp = greedy(4 + i % 5) if i % 3 else SamplingParams(max_new_tokens=7, do_sample=True, seed=i, top_k=30,
                                                            ignore_eos=True)
        out.append((PROMPTS[i % len(PROMPTS)], sp, prefixes[i % len(prefixes)]))
    return out


def alone(loaded, reqs) -> list[list[int]]:
    out = []
    for ids, sp, px in reqs:
        e = Engine(loaded)
        e.start()
        try:
            out.append(generate_sync(e, [ids], sp, [px])[0].token_ids)
        finally:
            e.stop()
    return out


def poisoned_forward(engine: Engine, phase: str) -> None:
    """Make any forward of `phase` ('prefill' or 'decode') whose block holds a row tagged 'bad' raise."""
    real = engine.runner.forward

    def forward(ids, write_pos, row_start, kv_len):
        block = engine.batch.all_rows()[row_start:row_start + ids.shape[0]]  # cache rows: decoding, then prefilling
        here = "decode" if block[0] in engine.batch.decoding else "prefill"
        if here == phase and any(r.request.tag == "bad" for r in block):
            raise RuntimeError("poisoned row")
        return real(ids, write_pos, row_start, kv_len)

    engine.runner.forward = forward


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_a_row_whose_forward_fails_fails_alone(loaded, adapters, phase):
    reqs = requests(adapters, loaded)
    expected = alone(loaded, reqs)
    engine = Engine(loaded, EngineConfig(max_batch_size=4))  # 11 requests: most wait in the queue at first
    poisoned_forward(engine, phase)
    engine.start()
    try:
        handles = [engine.submit(ids, sp, px, tenant=f"t{i % 3}") for i, (ids, sp, px) in enumerate(reqs[:3])]
        bad = engine.submit(PROMPTS[1], greedy(8), tag="bad", tenant="bad")
        handles += [engine.submit(ids, sp, px, tenant=f"t{i % 3}") for i, (ids, sp, px) in enumerate(reqs[3:])]
        results = [h.wait(120) for h in handles]
        r_bad = bad.wait(120)
    finally:
        engine.stop()
    assert r_bad.finish_reason == "error" and "poisoned row" in r_bad.error
    assert len(r_bad.token_ids) == (0 if phase == "prefill" else 1)  # decode: its first token came from prefill
    assert [r.finish_reason for r in results] == ["length"] * 10
    assert [r.token_ids for r in results] == expected
    assert engine.stats.isolated_failures == 1 and not engine.dead


def test_a_row_whose_sampling_fails_fails_alone(loaded, adapters, monkeypatch):
    reqs = requests(adapters, loaded)
    expected = alone(loaded, reqs)
    real = sampling._sample_row

    def sample(logits, s):
        if s.params.seed == 555:
            raise RuntimeError("invalid multinomial distribution")
        return real(logits, s)

    monkeypatch.setattr(sampling, "_sample_row", sample)
    engine = Engine(loaded, EngineConfig(max_batch_size=16))
    engine.start()
    try:
        handles = [engine.submit(ids, sp, px) for ids, sp, px in reqs[:5]]
        bad = engine.submit(PROMPTS[2], SamplingParams(max_new_tokens=5, do_sample=True, seed=555))
        handles += [engine.submit(ids, sp, px) for ids, sp, px in reqs[5:]]
        results = [h.wait(120) for h in handles]
        r_bad = bad.wait(120)
    finally:
        engine.stop()
    assert r_bad.finish_reason == "error" and "multinomial" in r_bad.error
    assert [r.token_ids for r in results] == expected


def test_a_request_whose_admission_fails_fails_alone(loaded, adapters):
    reqs = requests(adapters, loaded)[:6]
    expected = alone(loaded, reqs)
    engine = Engine(loaded, EngineConfig(max_batch_size=8))
    real = engine.runner.admit

    def admit(rows):
        if any(POISON in r.request.prompt_ids for r in rows):
            raise MemoryError("cannot set this row up")
        real(rows)

    engine.runner.admit = admit
    handles = [engine.submit(ids, sp, px) for ids, sp, px in reqs[:3]]
    bad = engine.submit(PROMPTS[0] + [POISON], greedy())
    handles += [engine.submit(ids, sp, px) for ids, sp, px in reqs[3:]]
    while not all(h.done for h in handles + [bad]):  # all admitted together in the first step
        engine.step()
    assert bad.wait(0).finish_reason == "error" and "cannot set this row up" in bad.wait(0).error
    assert [h.wait(0).token_ids for h in handles] == expected


@pytest.mark.parametrize("params", [
    dict(do_sample=True, temperature=1e-300),  # logits / t overflowed: now greedy (below MIN_TEMPERATURE)
    dict(do_sample=True, top_k=1, top_p=1e-300),  # top_p became 0 in float32 and dropped every token
    dict(do_sample=True, temperature=1e300),  # every scaled logit 0: uniform
    dict(do_sample=True, repetition_penalty=1e-3),  # the bounds of the penalty
    dict(do_sample=False, repetition_penalty=1e3, top_logprobs=5),
])
def test_extreme_sampling_values_give_finite_tokens_and_leave_batch_mates_alone(loaded, adapters, params):
    reqs = requests(adapters, loaded)[:4]
    expected = alone(loaded, reqs)
    engine = Engine(loaded, EngineConfig(max_batch_size=8))
    engine.start()
    try:
        odd = engine.submit(PROMPTS[3], SamplingParams(max_new_tokens=6, seed=3, ignore_eos=True, **params))
        results = generate_sync(engine, [r[0] for r in reqs], [r[1] for r in reqs], [r[2] for r in reqs])
        r = odd.wait(60)
    finally:
        engine.stop()
    assert r.finish_reason == "length" and len(r.token_ids) == 6
    assert all(math.isfinite(lp) and lp <= 0 for lp in r.logprobs)
    assert [x.token_ids for x in results] == expected


def test_a_temperature_below_the_minimum_chooses_greedily(loaded):
    e = Engine(loaded)
    e.start()
    try:
        g = generate_sync(e, [PROMPTS[0]], greedy(8))[0].token_ids
        t = generate_sync(e, [PROMPTS[0]], SamplingParams(max_new_tokens=8, do_sample=True, temperature=1e-300,
                                                          seed=1, ignore_eos=True))[0].token_ids
    finally:
        e.stop()
    assert t == g


@pytest.mark.parametrize("field,value", [("repetition_penalty", 1e-320), ("repetition_penalty", 1e4),
                                         ("temperature", math.inf), ("top_p", 0.0), ("top_p", 1.5)])
def test_out_of_range_values_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value}).validate()


def test_non_finite_logits_fail_their_row_only(loaded):
    engine = Engine(loaded, EngineConfig(max_batch_size=8))
    real = engine.runner.forward

    def forward(ids, write_pos, row_start, kv_len):
        out = real(ids, write_pos, row_start, kv_len).clone()
        for i in range(ids.shape[0]):
            if (ids[i] == POISON).any():
                out[i, 7] = math.nan
        return out

    engine.runner.forward = forward
    good = [engine.submit(PROMPTS[i], greedy(), tenant="u") for i in range(3)]
    bad = engine.submit(PROMPTS[0] + [POISON], greedy(), tenant="t")
    while not all(h.done for h in good + [bad]):
        engine.step()
    assert bad.wait(0).finish_reason == "error" and "not finite" in bad.wait(0).error
    assert all(h.wait(0).finish_reason == "length" for h in good)


def test_what_a_step_cannot_confine_kills_the_engine_loudly(loaded):
    engine = Engine(loaded, EngineConfig(max_batch_size=3))
    real = engine._update

    def update(rows, logits):
        if any(r.request.tag == "kill" for r in rows):
            raise AssertionError("bookkeeping is broken")
        real(rows, logits)

    engine._update = update
    engine.start()
    running = [engine.submit(PROMPTS[i], greedy(400)) for i in range(2)]
    killer = engine.submit(PROMPTS[4], greedy(), tag="kill")
    queued = [engine.submit(PROMPTS[i], greedy()) for i in range(3)]  # the batch is full: these wait
    for h in running + queued + [killer]:
        assert h.wait(60).finish_reason == "error"
    engine._thread.join(10)
    assert engine.dead and not engine.running and "bookkeeping is broken" in engine.failure
    with pytest.raises(EngineStopped, match="failed"):
        engine.submit(PROMPTS[0], greedy())
    engine.stop()
