"""Seeded sampling is batch-independent; EOS, stop ids, cancellation and limits behave."""
from __future__ import annotations

import pytest

from server.engine.engine import Engine, EngineConfig
from server.engine.request import EngineOverloaded, finish_reason
from server.engine.sampling import SamplingParams
from tests.engine.test_exactness import PROMPTS, device_prefix, run_alone


def drive(engine: Engine, handles) -> None:
    while not all(h.done for h in handles):
        engine.step()


def test_seeded_sampling_same_alone_and_in_batch(loaded, adapters):
    prefixes = [device_prefix(p, loaded) for p in adapters.values()]
    settings = [SamplingParams(max_new_tokens=12, do_sample=True, temperature=t, top_k=k, top_p=p, seed=s,
                               ignore_eos=True)
                for t, k, p, s in [(1.0, 0, 1.0, 1), (0.7, 50, 1.0, 2), (1.3, 0, 0.9, 3), (1.0, 20, 0.8, 4)]]
    alone = []
    for i, sp in enumerate(settings):
        e = Engine(loaded)
        h = e.submit(PROMPTS[i], sp, prefixes[i])
        drive(e, [h])
        alone.append(h.wait(0).token_ids)
    engine = Engine(loaded, EngineConfig(max_batch_size=16))
    # the same four requests, each surrounded by greedy and other sampled rows
    handles = []
    for i, sp in enumerate(settings):
        handles.append(engine.submit(PROMPTS[4], SamplingParams(max_new_tokens=3 + i, ignore_eos=True), prefixes[0]))
        handles.append(engine.submit(PROMPTS[i], sp, prefixes[i]))
        handles.append(engine.submit(PROMPTS[2], SamplingParams(max_new_tokens=5, do_sample=True, seed=99 + i,
                                                                ignore_eos=True), None))
    drive(engine, handles)
    assert [handles[3 * i + 1].wait(0).token_ids for i in range(4)] == alone
    assert len({tuple(a) for a in alone}) == 4  # different seeds/settings really differ
    # a different seed gives a different draw
    e = Engine(loaded)
    h = e.submit(PROMPTS[0], SamplingParams(max_new_tokens=12, do_sample=True, seed=12345, ignore_eos=True),
                 prefixes[0])
    drive(e, [h])
    assert h.wait(0).token_ids != alone[0]


def test_eos_and_stop_token_ids(loaded):
    engine = Engine(loaded)
    free = run_alone(engine, PROMPTS[0], None, 8)
    stop_at = free[3]
    h = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=8, stop_token_ids=(stop_at,)))
    drive(engine, [h])
    r = h.wait(0)
    assert r.finish_reason == "stop_sequence" and r.token_ids == free[:free.index(stop_at) + 1]
    eos_engine = Engine(loaded, EngineConfig(eos_token_ids=(stop_at,)))
    h = eos_engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=8))
    drive(eos_engine, [h])
    assert h.wait(0).finish_reason == "eos_token" and h.wait(0).token_ids[-1] == stop_at
    h = eos_engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=8, ignore_eos=True))
    drive(eos_engine, [h])
    assert h.wait(0).finish_reason == "length" and h.wait(0).token_ids == free


def test_one_finish_rule_for_results_and_token_events(loaded):
    """The token that ends a request carries the reason its result gives, no earlier token carries one, and
    max_new_tokens decides first when the last allowed token is also EOS (as the HTTP streams always said)."""
    free = run_alone(Engine(loaded), PROMPTS[0], None, 8)
    k = free.index(free[3])  # the first place that token comes
    eos_engine = Engine(loaded, EngineConfig(eos_token_ids=(free[3],)))
    for params, reason, n in ((SamplingParams(max_new_tokens=k + 1), "length", k + 1),
                              (SamplingParams(max_new_tokens=8), "eos_token", k + 1),
                              (SamplingParams(max_new_tokens=8, ignore_eos=True), "length", 8)):
        h = eos_engine.submit(PROMPTS[0], params)
        drive(eos_engine, [h])
        assert h.wait(0).finish_reason == reason and len(h.wait(0).token_ids) == n
        assert [e.finish_reason for e in h.events] == [None] * (n - 1) + [reason]
    assert finish_reason(7, 3, SamplingParams(max_new_tokens=3, stop_token_ids=(7,)), frozenset({7})) == "length"
    assert finish_reason(7, 2, SamplingParams(max_new_tokens=3, stop_token_ids=(7,)), frozenset({7})) == "eos_token"
    assert finish_reason(7, 2, SamplingParams(max_new_tokens=3, stop_token_ids=(7,), ignore_eos=True),
                         frozenset({7})) == "stop_sequence"
    assert finish_reason(8, 2, SamplingParams(max_new_tokens=3, stop_token_ids=(7,)), frozenset({7})) is None


def test_cancel_frees_row_and_gives_the_lease_back(loaded, adapters):
    from basemodel.convert import artifact_from_files
    from prefix_store.peft_io import read_dir
    from server.engine.device_prefix import DevicePrefix
    from server.tiers.tiers import Tiers

    tiers = Tiers(10**9, 0, lambda v, a: DevicePrefix.from_artifact(v, a, loaded.device, loaded.dtype))
    art = artifact_from_files(read_dir(adapters["a3"]), loaded)
    v = art.manifest.sha256
    held, held2 = tiers.lease(v, lambda: art), tiers.lease(v, lambda: art)
    assert held.payload is held2.payload and tiers.pins(v) == 2
    engine = Engine(loaded)
    keep = engine.submit(PROMPTS[1], SamplingParams(max_new_tokens=20, ignore_eos=True), held)
    gone = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=20, ignore_eos=True), held2)
    engine.step()
    engine.step()
    assert engine.batch_size == 2
    gone.cancel()
    engine.step()
    assert engine.batch_size == 1 and gone.wait(0).finish_reason == "cancelled" and tiers.pins(v) == 1
    drive(engine, [keep])
    assert keep.wait(0).token_ids == run_alone(Engine(loaded), PROMPTS[1], held.payload, 20)
    assert tiers.pins(v) == 0 and engine.batch_size == 0


def test_limits_and_overload(loaded):
    engine = Engine(loaded, EngineConfig(max_queue=2, max_seq_len=64))
    with pytest.raises(ValueError, match="exceeds the maximum sequence length 64"):
        engine.submit([1] * 50, SamplingParams(max_new_tokens=20))
    with pytest.raises(ValueError, match="at least one token"):
        engine.submit([], SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        engine.submit([10**6], SamplingParams())
    with pytest.raises(ValueError, match="temperature"):
        engine.submit([1], SamplingParams(do_sample=True, temperature=0))
    engine.submit([1], SamplingParams())
    engine.submit([1], SamplingParams())
    with pytest.raises(EngineOverloaded):
        engine.submit([1], SamplingParams())


def test_repetition_penalty_matches_hf_generate(kind, loaded):
    import torch
    from tests.tiny import tiny_model
    ids = torch.tensor([PROMPTS[2]])
    ref = tiny_model(kind).generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                    min_new_tokens=16, do_sample=False, repetition_penalty=5.0, pad_token_id=0)
    engine = Engine(loaded)
    h = engine.submit(PROMPTS[2], SamplingParams(max_new_tokens=16, repetition_penalty=5.0, ignore_eos=True))
    drive(engine, [h])
    assert h.wait(0).token_ids == ref[0, 1:].tolist()
    if kind == "gpt2":  # on this model the penalty changes the greedy output, so the equality above means something
        assert h.wait(0).token_ids != run_alone(engine, PROMPTS[2], None, 16)


def test_kv_cache_is_bounded_and_shrinks_when_idle(loaded):
    per_pos = 2 * loaded.spec.num_layers * loaded.spec.kv_dim * 4
    # room for 2 rows of 64 positions (doubling from 256 is capped at max_seq_len + 1 = 65)
    engine = Engine(loaded, EngineConfig(max_batch_size=8, max_seq_len=64, kv_cache_bytes=2 * 65 * per_pos))
    with pytest.raises(ValueError, match="bytes of KV cache"):
        Engine(loaded, EngineConfig(kv_cache_bytes=10 * per_pos)).submit([1] * 5, SamplingParams(max_new_tokens=5))
    hs = [engine.submit(PROMPTS[i % 5], SamplingParams(max_new_tokens=40, ignore_eos=True)) for i in range(4)]
    engine.step()
    assert engine.batch_size == 2 and engine.queue_depth == 2  # the budget admits two rows, the rest wait
    assert engine.cache.capacity_len == 65 and engine.cache.nbytes() <= 2 * 65 * per_pos
    while not all(h.done for h in hs):
        engine.step()
        assert engine.cache.nbytes() <= 2 * 65 * per_pos
    assert [h.wait(0).token_ids for h in hs] == [run_alone(Engine(loaded), PROMPTS[i % 5], None, 40)
                                                 for i in range(4)]
    assert engine.cache.capacity_rows == 2  # kept while a next burst may come
    engine.release_idle_memory()  # what the engine thread does after idle_release_s with nothing to do
    assert engine.cache.capacity_rows == 1 and engine.cache.capacity_len == 65  # back to the start size


def test_rows_grow_into_buffers_made_ahead_of_time(loaded):
    """Past half the rows, the next doubling is zeroed on a background thread; the growth then uses it, keeps
    what is stored, and the engine's tokens are those of a request alone. No spare unless the buffers held and the
    spare fit the budget; a spare of the wrong shape is not used."""
    from server.engine.kv_cache import SlotKVCache

    s = loaded.spec
    cache = SlotKVCache(s.num_layers, s.num_kv_heads, s.head_dim, loaded.device, loaded.dtype, max_rows=8,
                        max_len=33, rows=2, positions=32)
    cache.prefetch_limit = (2 + 4) * 32 * cache.bytes_per_position  # the 2 rows held and a spare of 4 fit
    cache.reserve(1, 10, 0)
    assert cache._spare is None  # half the rows in use: no spare yet
    cache.reserve(2, 10, 0)
    assert cache._spare is not None and cache._spare.shape == (4, 32)
    assert cache.nbytes() == (2 + 4) * 32 * cache.bytes_per_position  # the spare counts while it is held
    cache.k[:, :2, :, :5] = 1.5
    cache.reserve(3, 10, 5)
    assert cache.capacity_rows == 4 and cache.prefetched_growths == 1
    assert bool((cache.k[:, :2, :, :5] == 1.5).all()) and not cache.k[:, 2:].any() and not cache.k[:, :, :, 5:].any()
    assert cache._spare is None  # 4 rows held and a spare of 8 would exceed the limit
    cache.prefetch_limit = (4 + 8) * 32 * cache.bytes_per_position
    cache.reserve(3, 10, 5)
    assert cache._spare is not None and cache._spare.shape == (8, 32)
    cache.reserve(5, 32, 5)  # rows and positions both grow: the spare of 32 positions is not used
    assert cache.capacity_rows == 8 and cache.capacity_len == 33 and cache.prefetched_growths == 1
    cache.shrink()
    assert cache._spare is None and cache.capacity_rows == 2

    small = SlotKVCache(s.num_layers, s.num_kv_heads, s.head_dim, loaded.device, loaded.dtype, max_rows=8,
                        max_len=33, rows=2, positions=32)
    small.prefetch_limit = (2 + 4) * 32 * small.bytes_per_position - 1
    small.reserve(2, 10, 0)
    assert small._spare is None

    engine = Engine(loaded, EngineConfig(max_batch_size=8))
    hs = [engine.submit(PROMPTS[i % 5], SamplingParams(max_new_tokens=6, ignore_eos=True)) for i in range(2)]
    engine.step()  # 2 rows of 2: the spare of 4 is made
    hs.append(engine.submit(PROMPTS[2], SamplingParams(max_new_tokens=6, ignore_eos=True)))
    engine.step()  # the third row grows the cache into it
    hs += [engine.submit(PROMPTS[i % 5], SamplingParams(max_new_tokens=6, ignore_eos=True)) for i in range(3, 7)]
    drive(engine, hs)
    assert engine.cache.prefetched_growths >= 1
    assert [h.wait(0).token_ids for h in hs] == [run_alone(Engine(loaded), PROMPTS[i % 5], None, 6)
                                                 for i in range(7)]


def test_a_forward_that_fails_once_is_retried_and_the_request_succeeds(loaded, monkeypatch):
    engine = Engine(loaded)
    engine.start()
    try:
        real = engine.runner.forward
        calls = {"n": 0}

        def flaky(*a, **k):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("device lost")
            return real(*a, **k)

        monkeypatch.setattr(engine.runner, "forward", flaky)
        r = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=4, ignore_eos=True)).wait(30)
        assert r.finish_reason == "length" and len(r.token_ids) == 4  # its prefill failed once, then ran alone
        assert engine.stats.isolated_failures == 0 and not engine.dead
    finally:
        engine.stop()
    assert not engine.running


def test_stop_cancels_running_and_queued(loaded):
    engine = Engine(loaded, EngineConfig(max_batch_size=1))
    engine.start()
    hs = [engine.submit(PROMPTS[i], SamplingParams(max_new_tokens=400, ignore_eos=True)) for i in range(3)]
    engine.stop(timeout=30)
    assert not engine.running
    assert all(h.wait(0).finish_reason == "cancelled" for h in hs)
