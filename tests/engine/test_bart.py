"""BART served by the engine: greedy tokens alone == in a mixed continuous batch == the reference implementation
(trainer/bart_prefix.py, unbatched) for encoder, decoder and cross-attention prefixes in both position conventions;
the bare model == HF generate."""
from __future__ import annotations

import pytest
import torch

from basemodel.model import load_model
from prefix_store.artifact import build_artifact, validate
from server.engine.device_prefix import DevicePrefix
from server.engine.engine import Engine, EngineConfig, generate_sync
from server.engine.sampling import SamplingParams
from tests.tiny import bart_tokenizer, loaded_tiny, save_tiny_model_dir
from trainer.bart_prefix import greedy_generate

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello", "name : The Eagle | Type : coffee shop | area : "
         "riverside", "A summary, please", "Prefix tuning keeps the language model frozen and learns a few vectors."]

# task -> (P of kv, P of encoder_kv, P of cross_kv, positions)
TASKS = {"all-zero": (3, 5, 4, "from_zero"), "all-after": (6, 2, 7, "after_prefix"), "enc": (0, 4, 0, "from_zero"),
         "dec": (5, 0, 0, "from_zero"), "dec-after": (2, 0, 0, "after_prefix"), "cross": (0, 0, 3, "after_prefix")}


@pytest.fixture(scope="module")
def bart():
    return loaded_tiny("bart")


@pytest.fixture(scope="module")
def inputs():
    tok = bart_tokenizer()
    return [tok(t).input_ids for t in TEXTS]


def make_prefix(loaded, name: str, seed: int) -> tuple[DevicePrefix, dict, str]:
    """A validated artifact with random prefixes at the scale of the model's own keys, as the engine holds it."""
    p, p_enc, p_cross, positions = TASKS[name]
    s, g = loaded.spec, torch.Generator().manual_seed(seed)

    def rand(layers, heads, n, dim):  # [layers, 2, kv_heads, P, head_dim]
        return 3 * torch.randn(layers, 2, heads, n, dim, generator=g) if n else None

    art = build_artifact(rand(s.num_layers, s.num_kv_heads, p, s.head_dim), s.fingerprint(),
                         encoder_kv=rand(s.num_encoder_layers, s.num_encoder_kv_heads, p_enc, s.encoder_head_dim),
                         cross_kv=rand(s.num_layers, s.num_kv_heads, p_cross, s.head_dim), positions=positions)
    validate(art, s.fingerprint())
    return DevicePrefix.from_artifact(name, art, loaded.device, loaded.dtype), art.tensors, positions


@pytest.fixture(scope="module")
def prefixes(bart):
    return {name: make_prefix(bart, name, seed) for seed, name in enumerate(TASKS)}


def reference(loaded, prompt: list[int], task: tuple | None, n: int) -> list[int]:
    """trainer/bart_prefix.py's unbatched greedy decoding with the same prefixes."""
    tensors, positions = (task[1], task[2]) if task else (None, "from_zero")
    return greedy_generate(loaded.model, prompt, tensors, positions, max_new_tokens=n, ignore_eos=True)


def run_alone(loaded, prompt, prefix, n, **sampling) -> list[int]:
    return run_alone_on(Engine(loaded, EngineConfig(max_batch_size=4)), prompt, prefix, n, **sampling)


def run_alone_on(engine, prompt, prefix, n, **sampling) -> list[int]:
    """One request on an idle engine, stepped until it ends."""
    h = engine.submit(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True, **sampling), prefix)
    while not h.done:
        engine.step()
    return h.wait(0).token_ids


@pytest.mark.parametrize("name", list(TASKS) + [None])
def test_alone_equals_reference(bart, inputs, prefixes, name):
    """Each prefix kind alone (encoder-only, decoder-only in both conventions, cross-only, all three in both)."""
    task = prefixes[name] if name else None
    got = [run_alone(bart, prompt, task[0] if task else None, 10) for prompt in (inputs[0], inputs[2])]
    assert got == [reference(bart, prompt, task, 10) for prompt in (inputs[0], inputs[2])]
    if task:  # the prefix matters: without it, the inputs decode differently
        assert got != [reference(bart, prompt, None, 10) for prompt in (inputs[0], inputs[2])]


def test_mixed_batch_join_and_leave_equals_alone_and_reference(bart, inputs, prefixes):
    """7 kinds of rows (6 tasks of different prefix lengths and conventions + the bare model), input lengths 3-16,
    joining every other step and leaving as they finish (each input is encoded on its own at admission)."""
    engine = Engine(bart, EngineConfig(max_batch_size=5))
    tasks = [prefixes[n] for n in TASKS] + [None]
    jobs = [(inputs[(i * 2) % len(inputs)], tasks[i % len(tasks)], 3 + (i * 5) % 9) for i in range(12)]
    expected = [reference(bart, p, t, n) for p, t, n in jobs]
    handles, sizes, next_job = [], [], 0
    while next_job < len(jobs) or not all(h.done for h in handles):
        if next_job < len(jobs) and engine.stats.steps % 2 == 0:
            for p, t, n in jobs[next_job:next_job + 3]:
                params = SamplingParams(max_new_tokens=n, ignore_eos=True)
                handles.append(engine.submit(p, params, t[0] if t else None))
            next_job += 3
        engine.step()
        sizes.append(engine.batch_size)
    assert [h.wait(0).token_ids for h in handles] == expected
    assert max(sizes) == 5 and any(b < a for a, b in zip(sizes, sizes[1:]))  # full batch, rows left mid-run
    for (p, t, n), want in list(zip(jobs, expected))[:4]:
        assert run_alone(bart, p, t[0] if t else None, n) == want


@pytest.mark.parametrize("packed", ["on", "off"])
def test_inputs_encode_together_only_with_prepacked_weights(bart, inputs, prefixes, packed):
    """With prepacked weights (rows computed the same beside any number of others) the inputs of one length whose
    tasks have encoder prefixes of one length are encoded in one forward, unpadded; with the model's own layers
    every input is encoded alone. Either way each row's tokens are those of the request alone and of the
    reference."""
    from server.engine.packed import packing_available

    if packed == "on" and not packing_available(bart.device, bart.dtype):
        pytest.skip("this torch build has no oneDNN")
    engine = Engine(bart, EngineConfig(max_batch_size=8, packed_weights=packed))
    blocks: list[int] = []
    encode = engine.runner._encode
    engine.runner._encode = lambda rows: (blocks.append(len(rows)), encode(rows))[1]
    same = [inputs[0][:9], inputs[2][:9], inputs[4][:9]]  # one length
    jobs = [(same[0], "all-zero"), (same[1], "all-zero"), (same[2], "dec"), (same[0], None), (same[1], "enc"),
            (inputs[1], "all-zero")]  # encoder prefixes 5, 5, 0, 0, 4 and 5 on another length
    handles = [engine.submit(p, SamplingParams(max_new_tokens=8, ignore_eos=True), prefixes[t][0] if t else None)
               for p, t in jobs]
    while not all(h.done for h in handles):
        engine.step()
    assert sorted(blocks) == ([1, 1, 2, 2] if packed == "on" else [1] * 6)
    for h, (p, t) in zip(handles, jobs):
        want = reference(bart, p, prefixes[t] if t else None, 8)
        assert h.wait(0).token_ids == want
        single = Engine(bart, EngineConfig(max_batch_size=2, packed_weights=packed))
        assert run_alone_on(single, p, prefixes[t][0] if t else None, 8) == want


def test_seeded_sampling_alone_equals_mixed(bart, inputs, prefixes):
    engine = Engine(bart, EngineConfig(max_batch_size=8))
    engine.start()
    try:
        tasks = [prefixes["all-zero"][0], prefixes["cross"][0], None, prefixes["all-after"][0]]
        params = [SamplingParams(max_new_tokens=8, do_sample=True, temperature=0.8, top_k=50, seed=i,
                                 ignore_eos=True) for i in range(4)]
        res = generate_sync(engine, inputs[:4], params, tasks)
    finally:
        engine.stop()
    for r, prompt, t, sp in zip(res, inputs, tasks, params):
        assert r.token_ids == run_alone(bart, prompt, t, 8, do_sample=True, temperature=0.8, top_k=50, seed=sp.seed)


def test_bare_model_equals_hf_generate_with_forced_bos(inputs):
    """No prefix: the decoder starts at decoder_start_token_id and the generation config's forced BOS comes first,
    as in HF generate (whose forced EOS at the length limit the server does not apply: it is switched off here)."""
    loaded = loaded_tiny("bart")
    loaded.model.generation_config.forced_bos_token_id = 0  # as in e.g. facebook/bart-large-cnn
    engine = Engine(loaded)
    for prompt in inputs:
        ids = torch.tensor([prompt])
        hf = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                   min_new_tokens=10, do_sample=False, num_beams=1, forced_eos_token_id=None)
        h = engine.submit(prompt, SamplingParams(max_new_tokens=10, ignore_eos=True))
        while not h.done:
            engine.step()
        got = h.wait(0)
        assert got.token_ids == hf[0, 1:].tolist() and got.token_ids[0] == 0 and got.logprobs[0] == 0.0
        assert got.prompt_tokens == len(prompt)  # usage counts the encoder input


def test_load_model_directory_and_request_checks(tmp_path, inputs):
    loaded = load_model(str(save_tiny_model_dir("bart", tmp_path / "bart")))
    assert loaded.spec.is_encoder_decoder and loaded.tokenizer.eos_token_id == 2
    engine = Engine(loaded, EngineConfig(max_seq_len=64, kv_cache_bytes=10**6))
    with pytest.raises(ValueError, match="inputs must contain at least one token"):
        engine.submit([], SamplingParams())
    with pytest.raises(ValueError, match="exceed the maximum encoder length 64"):
        engine.submit([5] * 65, SamplingParams())
    with pytest.raises(ValueError, match=r"decoder start \(1 tokens\) \+ prefix \(0\) \+ max_new_tokens \(70\)"):
        engine.submit([5] * 10, SamplingParams(max_new_tokens=70))
    huge = DevicePrefix("huge", None, cross_kv=torch.zeros(2, 2, 4, 100, 16))
    with pytest.raises(ValueError, match=r"cross-attention prefix \(100\) \+ inputs \(40 tokens\) exceed 128"):
        engine.submit([5] * 40, SamplingParams(), huge)
    with pytest.raises(ValueError, match="bytes of KV cache"):
        Engine(loaded, EngineConfig(max_seq_len=64, kv_cache_bytes=10**4)).submit([5] * 60, SamplingParams())
    h = engine.submit(inputs[0], SamplingParams(max_new_tokens=5, ignore_eos=True))
    while not h.done:
        engine.step()
    assert h.wait(0).token_ids == reference(loaded, inputs[0], None, 5)
    assert not loaded.model.get_decoder().embed_positions._forward_hooks  # the model is left as it was



def test_kv_budget_counts_the_cross_slots_admitted_rows_need(bart, inputs):
    """The budget fits two short requests (decoder slots of 256 positions, cross slots of 64) but not a short one
    beside a long one (150 input tokens: cross slots of 256): the long one is admitted only after the short one
    finishes, and the cache never holds more than the budget, even though each request alone fits."""
    probe = Engine(bart).cache
    row = 256 * probe.bytes_per_position  # the decoder slots of one row at their initial 256 positions
    budget = 2 * (row + 64 * probe.cross_bytes_per_position())
    assert 2 * (row + 256 * probe.cross_bytes_per_position()) > budget  # a short and a long row would not fit
    engine = Engine(bart, EngineConfig(max_batch_size=4, kv_cache_bytes=budget))
    short, long = inputs[1], (inputs[4] * 10)[:150]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    both = [engine.submit(inputs[0], params), engine.submit(short, params)]
    engine.step()
    assert engine.batch_size == 2  # two short requests share the budget
    while not all(h.done for h in both):
        engine.step()
    first, second = engine.submit(short, params), engine.submit(long, params)
    overlap = False
    while not second.done:
        engine.step()
        running = {id(r.handle) for r in engine.batch.all_rows()}
        overlap |= id(second) in running and not first.done
        assert engine.cache.nbytes() <= budget
    assert not overlap and first.done  # the long request waited for the short one instead of growing the slots
    assert engine.cache.cross_capacity >= len(long)
    assert [h.wait(0).token_ids for h in both + [first, second]] == [
        run_alone(bart, p, None, 6) for p in (inputs[0], short, short, long)]

@pytest.fixture(scope="module")
def bart_base_shape():
    """bart-base's shape (6+6 layers, 12 heads of 64, vocabulary 50265) with random weights, init_std 0.1 so that
    greedy choices are not all EOS; such a model turns last-bit differences into other tokens."""
    from transformers import BartForConditionalGeneration

    from basemodel.model import LoadedModel, spec_from_config
    from bench.common import bart_base_config

    torch.manual_seed(0)
    model = BartForConditionalGeneration(bart_base_config(init_std=0.1)).eval().requires_grad_(False)
    loaded = LoadedModel(model, None, spec_from_config(model.config), "bart-base-shape", torch.device("cpu"),
                         torch.float32)
    assert (loaded.spec.num_encoder_layers, loaded.spec.num_layers, loaded.spec.num_kv_heads,
            loaded.spec.head_dim) == (6, 6, 12, 64)
    return loaded


@pytest.mark.slow
@pytest.mark.parametrize("packed", ["off", "on"])
def test_bart_base_shape_mixed_batch_equals_reference(bart_base_shape, inputs, packed):
    """Three tasks and the bare model in one batch, three rows with inputs of one length. With the model's own
    layers ("off") every row == the reference (HF's layers, unbatched). Prepacked weights ("on") round differently
    from HF's layers and this model turns that into other tokens, so there each row == the same request alone on
    packed weights, with the inputs of one length encoded together."""
    from server.engine.packed import packing_available

    loaded = bart_base_shape
    if packed == "on" and not packing_available(loaded.device, loaded.dtype):
        pytest.skip("this torch build has no oneDNN")
    tasks = {name: make_prefix(loaded, name, seed) for seed, name in enumerate(["all-zero", "all-after", "dec"])}
    jobs = [(inputs[0], "all-zero"), (inputs[2], "all-after"), (inputs[0], "dec"), (inputs[0], None),
            (inputs[4], "dec")]
    engine = Engine(loaded, EngineConfig(max_batch_size=8, packed_weights=packed))
    blocks: list[int] = []
    encode = engine.runner._encode
    engine.runner._encode = lambda rows: (blocks.append(len(rows)), encode(rows))[1]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    handles = [engine.submit(p, params, tasks[t][0] if t else None) for p, t in jobs]
    while not all(h.done for h in handles):
        engine.step()
    got = [h.wait(0).token_ids for h in handles]
    if packed == "off":
        assert blocks == [1] * 5
        assert got == [reference(loaded, p, tasks[t] if t else None, 6) for p, t in jobs]
    else:
        assert sorted(blocks) == [1, 1, 1, 2]  # inputs[0] with no encoder prefix ("dec" and the bare model)
        alone = Engine(loaded, EngineConfig(max_batch_size=2, packed_weights="on"))
        assert got == [run_alone_on(alone, p, tasks[t][0] if t else None, 6) for p, t in jobs]
    assert any(g != reference(loaded, p, None, 6) for g, (p, _) in zip(got[:3], jobs))


def test_encoder_decoder_families_without_a_runner_are_refused():
    from transformers import MBartConfig, MBartForConditionalGeneration

    from basemodel.model import LoadedModel, spec_from_config

    cfg = MBartConfig(vocab_size=100, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                      decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32)
    model = MBartForConditionalGeneration(cfg).eval()
    loaded = LoadedModel(model, None, spec_from_config(cfg), "mbart", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="encoder-decoder model type 'mbart' is not supported"):
        Engine(loaded)
