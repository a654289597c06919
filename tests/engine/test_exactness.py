"""Greedy token-for-token equality: alone == mixed continuous batch == HF PEFT generate."""
from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from basemodel.convert import artifact_from_files
from prefix_store.peft_io import read_dir
from server.engine.device_prefix import DevicePrefix
from server.engine.engine import Engine, EngineConfig
from server.engine.sampling import SamplingParams
from tests.tiny import tiny_model

PROMPTS = [[464, 2068, 7586, 21831], [40, 716, 257, 1332, 286, 262, 1080, 290, 340, 318, 922], [15496],
           [7454, 2402, 257, 640, 11, 612], [1212, 318, 257, 6152, 351, 1811, 16326]]


def peft_generate(kind: str, adapter_dir: str | None, prompt: list[int], n: int) -> list[int]:
    """HF (PEFT) generate, greedy, EOS ignored: the reference a user would otherwise run."""
    model = tiny_model(kind)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def device_prefix(adapter_dir: str, loaded) -> DevicePrefix:
    art = artifact_from_files(read_dir(adapter_dir), loaded)
    return DevicePrefix(art.manifest.sha256, art.kv)


def run_alone(engine: Engine, prompt, prefix, n) -> list[int]:
    h = engine.submit(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True), prefix)
    while not h.done:
        engine.step()
    return h.wait(0).token_ids


def run_arriving(engine: Engine, jobs) -> tuple[list[list[int]], list[int]]:
    """Submit (prompt, prefix, n) jobs three at a time every other step, while earlier ones are mid-generation;
    step until all are done. Returns each job's token ids and the batch size after every step."""
    handles, sizes, next_job = [], [], 0
    while next_job < len(jobs) or not all(h.done for h in handles):
        if next_job < len(jobs) and engine.stats.steps % 2 == 0:
            for p, px, n in jobs[next_job:next_job + 3]:
                handles.append(engine.submit(p, SamplingParams(max_new_tokens=n, ignore_eos=True), px))
            next_job += 3
        engine.step()
        sizes.append(engine.batch_size)
    return [h.wait(0).token_ids for h in handles], sizes


@pytest.mark.parametrize("chunk", [512, 2], ids=["whole-prompts", "chunked-prefill"])
def test_alone_equals_peft_generate(kind, loaded, adapters, chunk):
    engine = Engine(loaded, EngineConfig(max_batch_size=8, max_prefill_tokens=chunk))
    for i, (name, path) in enumerate(adapters.items()):
        prompt = PROMPTS[i % len(PROMPTS)]
        assert run_alone(engine, prompt, device_prefix(path, loaded), 10) == peft_generate(kind, path, prompt, 10), name
    # the bare base model (no task) too
    assert run_alone(engine, PROMPTS[1], None, 10) == peft_generate(kind, None, PROMPTS[1], 10)


@pytest.mark.parametrize("chunk", [512, 3], ids=["whole-prompts", "chunked-prefill"])
def test_mixed_batch_join_and_leave_equals_alone(kind, loaded, adapters, chunk):
    """Rows of 4 tasks + base model, prefix lengths 3/7/12/5/0, prompt lengths 1..11, joining and leaving.

    With chunk=3, prompts are prefilled 3 tokens per step, so rows at every stage (prefilling, decoding,
    finishing) share steps and move between the two blocks of the cache.
    """
    engine = Engine(loaded, EngineConfig(max_batch_size=6, max_prefill_tokens=chunk))
    prefixes = [device_prefix(p, loaded) for p in adapters.values()] + [None]
    jobs = [(PROMPTS[(i * 3) % len(PROMPTS)], prefixes[i % len(prefixes)], 4 + (i * 5) % 13) for i in range(14)]
    expected = [run_alone(Engine(loaded), p, px, n) for p, px, n in jobs]
    got, sizes = run_arriving(engine, jobs)
    assert got == expected
    assert max(sizes) == 6 and engine.stats.prefill_steps >= 4  # the batch really filled up and was refilled
    if chunk == 3:  # long prompts really were split, while other rows decoded
        assert engine.stats.prefill_steps > len(jobs) // 3 + 3
    assert any(b < a for a, b in zip(sizes, sizes[1:]))  # rows left mid-run


def test_threaded_engine_matches_alone(kind, loaded, adapters):
    """The same through the engine thread, all requests submitted at once from other threads."""
    from server.engine.engine import generate_sync
    engine = Engine(loaded, EngineConfig(max_batch_size=4))
    engine.start()
    try:
        prefixes = [device_prefix(p, loaded) for p in adapters.values()]
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(10)]
        pres = [prefixes[i % len(prefixes)] for i in range(10)]
        res = generate_sync(engine, prompts, SamplingParams(max_new_tokens=6, ignore_eos=True), pres)
        for r, p, px in zip(res, prompts, pres):
            assert r.token_ids == run_alone(Engine(loaded), p, px, 6)
            assert r.finish_reason == "length" and r.prefix_version == px.version
    finally:
        engine.stop()
