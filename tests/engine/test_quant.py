"""The quantised serving mode (server/engine/quant*.py, lean*.py, kernels/q4.cpp): kernels against a float64
reference of the same arithmetic, the GGUF layout, the forward against HF's model on the same weights, batch
invariance (bit-equal logits whatever the batch), and engine rows with prefixes and prompt tuning equal alone."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from peft import PeftModel

from basemodel.convert import artifact_from_files
from prefix_store.peft_io import read_dir
from server.engine import kernels
from server.engine.device_prefix import DevicePrefix
from server.engine.engine import Engine, EngineConfig
from server.engine.lean_build import quant_llama_from_hf, unpermute_order
from server.engine.lora import DeviceLora
from server.engine.quant import GROUP, Q4Weight, Q8Weight
from server.engine.quant_runner import resolve_quantization
from server.engine.sampling import SamplingParams
from tests.engine.conftest import make_peft_adapter
from tests.engine.test_exactness import PROMPTS, run_alone, run_arriving
from tests.engine.test_lora import device_lora
from tests.tiny import loaded_tiny_q4, save_lora_adapter, tiny_model

pytestmark = pytest.mark.skipif(bool(kernels.missing_cpu_flags()), reason="the CPU lacks AVX2/FMA/F16C")


def quantized_activations(x: torch.Tensor):
    """What the kernels do to activations, in float64: int8 codes per group of 32, scale amax/127 (fp32)."""
    g = x.reshape(x.shape[0], -1, GROUP)
    d = (g.abs().amax(-1) / 127).float()
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = (g * inv[..., None]).round()  # round half to even, as the kernels' vroundps
    return q.double(), d.double()


def test_q4_matmul_equals_float64_of_the_same_codes():
    torch.manual_seed(0)
    lib = kernels.load()
    for n, k, m in [(64, 96, 1), (24, 64, 7), (128, 256, 70)]:
        w = Q4Weight.from_float(torch.randn(n, k))
        p = w.packed()
        x = torch.randn(m, k) * 3
        out = torch.empty(m, n)
        assert lib.q4_matmul_f32(p.codes.data_ptr(), p.d.data_ptr(), p.m.data_ptr(), n, k, x.data_ptr(), m,
                                 out.data_ptr(), 2) == 0
        q, d = quantized_activations(x)
        wq = w.values().double().reshape(n, k // GROUP, GROUP)
        ref = torch.einsum("ngk,mgk,ng,mg->mn", wq, q, w.d.double(), d) + \
            torch.einsum("ng,mg->mn", w.m.double(), q.sum(-1) * d)
        assert torch.allclose(out.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max()), (n, k, m)


def test_q8_matmul_equals_float64_of_the_same_codes():
    torch.manual_seed(1)
    lib = kernels.load()
    n, k, m = 40, 128, 5
    w = Q8Weight.from_float(torch.randn(n, k))
    p = w.packed()
    x = torch.randn(m, k)
    out = torch.empty(m, n)
    assert lib.q8_matmul_f32(p.codes.data_ptr(), p.d.data_ptr(), n, k, x.data_ptr(), m, out.data_ptr(), 2) == 0
    q, d = quantized_activations(x)
    ref = torch.einsum("ngk,mgk,ng,mg->mn", w.codes.double().reshape(n, -1, GROUP), q, w.d.double(), d)
    assert torch.allclose(out.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max())


def test_layouts_round_trip_and_quantise_closely():
    torch.manual_seed(2)
    w = torch.randn(48, 96)
    q4 = Q4Weight.from_float(w)
    assert torch.equal(q4.packed().dequantized(), q4.dequantized())
    step = (w.reshape(48, -1, GROUP).amax(-1) - w.reshape(48, -1, GROUP).amin(-1)) / 15
    assert ((q4.dequantized() - w).abs().reshape(48, -1, GROUP) <= step[..., None] / 2 + 1e-6).all()
    q8 = Q8Weight.from_float(w[:45])  # 45 rows: the packed layout pads the last block of 8
    assert (q8.dequantized() - w[:45]).abs().max() <= w.abs().max() / 127 / 2 + 1e-6
    assert torch.equal(q8.lookup(torch.tensor([[3, 5]]))[0, 1], q8.dequantized()[5])
    packed = q8.packed()
    assert packed.padded_rows == 48 and torch.equal(packed.dequantized(), q8.dequantized())
    assert torch.equal(packed.lookup(torch.tensor([[44, 7]])), q8.lookup(torch.tensor([[44, 7]])))


def test_gguf_blocks_parse_as_gguf_dequantises_them():
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    n, k = 16, 64
    w = rng.standard_normal((n, k)).astype(np.float32)
    for kind, parse in [("Q4_1", Q4Weight.from_q4_1), ("Q4_0", Q4Weight.from_q4_0), ("Q8_0", Q8Weight.from_q8_0)]:
        qtype = gguf.GGMLQuantizationType[kind]
        raw = gguf.quants.quantize(w, qtype)
        expected = gguf.quants.dequantize(raw, qtype)
        got = parse(raw, n, k).dequantized().numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6, err_msg=kind)


def test_unpermute_undoes_llama_cpp_permutation():
    heads, hd = 3, 8
    w = torch.arange(heads * hd)
    # llama.cpp's converter: per head [2, hd/2] -> [hd/2, 2]
    permuted = w.reshape(heads, 2, hd // 2).transpose(1, 2).reshape(-1)
    assert torch.equal(permuted[unpermute_order(heads * hd, heads)], w)


def cache(model, rows=4, positions=64):
    c = model.lean
    k = torch.zeros(c.layers, rows, c.kv_heads, positions, c.head_dim, dtype=torch.float16)
    return k, torch.zeros_like(k)


def test_forward_follows_hf_on_the_dequantised_weights():
    model = quant_llama_from_hf(tiny_model("llama", initializer_range=0.02))
    ref = model.reference()
    ids = torch.tensor([PROMPTS[1][:8], PROMPTS[4][:7] + [11]])
    k, v = cache(model)
    pos = torch.arange(8)[None].repeat(2, 1)
    got = model.forward(ids, pos, pos, k, v, 1, 8)
    with torch.no_grad():
        want = ref(ids).logits[:, -1]
    # int8 activations and an fp16 cache: close to HF on the same weights, not equal
    assert (got - want).abs().max() < 0.02 * want.abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_a_rows_logits_do_not_depend_on_its_batch():
    model = quant_llama_from_hf(tiny_model("llama"))
    torch.manual_seed(3)
    ids = torch.randint(0, 50000, (13, 5))
    pos = torch.arange(5)[None].repeat(13, 1)
    k, v = cache(model, rows=16)
    alone = [model.forward(ids[i:i + 1], pos[:1], pos[:1], k, v, i, 5)[0] for i in range(13)]
    for size in (2, 5, 13):
        k, v = cache(model, rows=16)
        got = torch.cat([model.forward(ids[s:s + size], pos[s:s + size], pos[s:s + size], k, v, s, 5)
                         for s in range(0, 13, size)])
        for i in range(13):
            assert torch.equal(got[i], alone[i]), (size, i)


def test_left_padding_and_decode_steps_match_a_whole_prompt():
    """A prompt prefilled in one go equals the same prompt left-padded (pads at the trash slot) and decoded on."""
    model = quant_llama_from_hf(tiny_model("llama"))
    k, v = cache(model, rows=2, positions=32)
    trash = 31
    a = torch.tensor([[5, 6, 7, 8]])
    whole = model.forward(a, torch.arange(4)[None], torch.arange(4)[None], k, v, 0, 4)
    padded = torch.tensor([[0, 0, 5, 6, 7, 8]])
    wp = torch.tensor([[trash, trash, 0, 1, 2, 3]])
    got = model.forward(padded, torch.where(wp < trash, wp, 0), wp, k, v, 1, 4)
    assert torch.equal(got, whole)
    step = model.forward(torch.tensor([[9], [9]]), torch.tensor([[4], [4]]), torch.tensor([[4], [4]]), k, v, 0, 5)
    assert torch.equal(step[0], step[1])


def test_bad_arguments_are_refused_not_crashing():
    model = quant_llama_from_hf(tiny_model("llama"))
    k, v = cache(model, rows=2, positions=16)
    with pytest.raises(ValueError, match="refused"):
        model.forward(torch.tensor([[1]]), torch.tensor([[0]]), torch.tensor([[0]]), k, v, 2, 1)  # row past the cache
    with pytest.raises(ValueError, match="fp16"):
        model.forward(torch.tensor([[1]]), torch.tensor([[0]]), torch.tensor([[0]]), k.float(), v.float(), 0, 1)


def test_resolve_quantization():
    assert resolve_quantization("none", "embedded", "cpu") == "none"
    assert resolve_quantization("auto", "/some/model", "cpu") == "none"
    assert resolve_quantization("auto", "embedded", "cpu") == "q4"
    assert resolve_quantization("auto", "embedded", "cuda") == "none"
    with pytest.raises(ValueError, match="CPU"):
        resolve_quantization("q4", "embedded", "cuda")
    with pytest.raises(ValueError, match="quantization"):
        resolve_quantization("int3", "embedded", "cpu")


@pytest.fixture(scope="module")
def q4():
    return loaded_tiny_q4()


ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def q4_loras(tmp_path_factory):
    """PEFT LoRA adapters for the tiny LLaMA: rank 4 on q/v (PEFT's default targets), rank 8 rsLoRA on every
    projection."""
    root = tmp_path_factory.mktemp("q4-loras")
    return [str(save_lora_adapter("llama", root / "qv", r=4, seed=5)),
            str(save_lora_adapter("llama", root / "all", r=8, seed=6, use_rslora=True, target_modules=ALL_PROJECTIONS))]


@pytest.fixture(scope="module")
def q4_prefixes(q4, q4_loras, tmp_path_factory):
    """Prefix, prompt-tuning and LoRA tasks for the quantised tiny LLaMA, and no task."""
    root = tmp_path_factory.mktemp("q4-adapters")
    out = []
    for i, (method, n) in enumerate([("prefix", 3), ("prefix", 9), ("prompt", 5)]):
        art = artifact_from_files(read_dir(make_peft_adapter("llama", method, n, root / f"a{i}", seed=i)), q4)
        out.append(DevicePrefix(art.manifest.sha256, art.kv))
    return out + [device_lora(path, q4) for path in q4_loras] + [None]


def test_lora_rows_follow_peft_on_the_dequantised_weights(q4, q4_loras):
    """A LoRA row's logits: within a few percent of PEFT's on the same (dequantised) weights, as bare rows are, and
    far from the bare model's."""
    ids = torch.tensor([PROMPTS[1][:6]])
    pos = torch.arange(6)[None]
    k, v = cache(q4.model, rows=1, positions=16)
    bare_ref = q4.model.reference()
    with torch.no_grad():
        bare = bare_ref(ids).logits[0, -1]
    for path in q4_loras:
        peft = PeftModel.from_pretrained(q4.model.reference(), path).eval()
        with torch.no_grad():
            want = peft(ids).logits[0, -1]
        got = q4.model.forward(ids, pos, pos, k, v, 0, 6, loras=[device_lora(path, q4)])[0]
        assert (got - want).abs().max() < 0.03 * want.abs().max() < (want - bare).abs().max(), path


def test_lora_the_kernels_cannot_add_is_refused_at_submit(q4):
    """(PEFT uploads of an lm_head LoRA are refused earlier, by the upload's validation; this is the engine's own
    check, for adapters that reach it another way.)"""
    h, v = q4.spec.hidden_size, q4.spec.vocab_size
    head = DeviceLora("x", {"lm_head": torch.zeros(2, h)}, {"lm_head": torch.zeros(v, 2)}, 2, 1.0)
    with pytest.raises(ValueError, match="q/k/v/o/gate/up/down"):
        Engine(q4).submit(PROMPTS[0], SamplingParams(max_new_tokens=2), head)
    wide = DeviceLora("y", {"model.layers.0.self_attn.q_proj": torch.zeros(300, h)},
                      {"model.layers.0.self_attn.q_proj": torch.zeros(h, 300)}, 300, 1.0)
    with pytest.raises(ValueError, match="ranks up to 256"):
        Engine(q4).submit(PROMPTS[0], SamplingParams(max_new_tokens=2), wide)


def test_prompt_tuning_kv_is_the_forward_of_its_embeddings(q4):
    emb = torch.randn(4, q4.spec.hidden_size)
    kv = q4.model.prefix_kv(emb)
    c = q4.model.lean
    assert kv.shape == (c.layers, 2, c.kv_heads, 4, c.head_dim) and kv.dtype == torch.float32
    assert torch.equal(q4.model.prefix_kv(emb), kv)


@pytest.mark.parametrize("chunk", [512, 3], ids=["whole-prompts", "chunked-prefill"])
def test_engine_rows_with_prefixes_equal_alone(q4, q4_prefixes, chunk):
    """Prefix, prompt-tuning, LoRA and bare rows in one quantised batch, joining and leaving: each equals itself
    alone."""
    jobs = [(PROMPTS[(i * 3) % len(PROMPTS)], q4_prefixes[i % len(q4_prefixes)], 3 + (i * 5) % 11)
            for i in range(12)]
    expected = [run_alone(Engine(q4), p, px, n) for p, px, n in jobs]
    assert len({tuple(e) for e in expected}) > 5  # the prefixes change what the rows say
    got, sizes = run_arriving(Engine(q4, EngineConfig(max_batch_size=5, max_prefill_tokens=chunk)), jobs)
    assert got == expected and max(sizes) == 5


def test_an_engine_built_under_inference_mode_decodes(q4, q4_prefixes):
    """Built under the caller's torch.inference_mode() (as evaluation code builds it), the engine's buffers stay
    normal tensors: its steps, run outside that mode, write them and decode what an engine built outside would."""
    want = run_alone(Engine(q4), PROMPTS[0], q4_prefixes[0], 5)
    with torch.inference_mode():
        engine = Engine(q4)
    assert run_alone(engine, PROMPTS[0], q4_prefixes[0], 5) == want


def test_engine_logits_follow_the_reference_model_step_by_step(q4):
    """Along HF's greedy path on the dequantised weights, the quantised engine's logits stay within a few percent of
    HF's, and its choice equals HF's wherever HF's top two differ by more than that."""
    ref = q4.model.reference()
    prompt = PROMPTS[1]
    ids = torch.tensor([prompt])
    path = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                        do_sample=False, pad_token_id=0)[0]
    k, v = cache(q4.model, rows=1, positions=64)
    n = len(prompt)
    pos = torch.arange(n)[None]
    got = [q4.model.forward(ids, pos, pos, k, v, 0, n)[0]]
    for t in range(n, len(path) - 1):
        p = torch.tensor([[t]])
        got.append(q4.model.forward(path[t:t + 1][None], p, p, k, v, 0, t + 1)[0])
    with torch.no_grad():
        want = ref(path[None, :-1]).logits[0, n - 1:]
    for g, w in zip(got, want):
        err = (g - w).abs().max()
        assert err < 0.05 * w.abs().max()
        top2 = w.topk(2).values
        if top2[0] - top2[1] > 2 * err:
            assert g.argmax() == w.argmax()


@pytest.fixture(scope="module")
def smol_pair():
    from basemodel.model import load_model
    from server.engine.quant_runner import load_quantized
    return load_quantized("embedded"), load_model("embedded")


@pytest.mark.embedded
@pytest.mark.slow
def test_embedded_gguf_weights_are_the_fp32_models_and_greedy_text_agrees(smol_pair):
    """The embedded model's Q4 weights, read from its GGUF, are exactly what transformers dequantises from the same
    file (so the q/k un-permutation is right), and greedy decoding of the q4 engine equals the fp32 model's on
    ordinary prompts for the first tokens."""
    q4, fp = smol_pair
    assert q4.spec == fp.spec  # same fingerprint: the shipped prefixes validate against both
    c = q4.model.lean
    qw, kvw = c.heads * c.head_dim, c.kv_heads * c.head_dim
    for i in (0, c.layers - 1):
        hf = fp.model.model.layers[i]
        qkv = q4.model.layers[i].qkv.dequantized()
        for mine, theirs in [(qkv[:qw], hf.self_attn.q_proj.weight), (qkv[qw:qw + kvw], hf.self_attn.k_proj.weight),
                             (q4.model.layers[i].down.dequantized(), hf.mlp.down_proj.weight)]:
            assert torch.allclose(mine, theirs, rtol=1e-6, atol=1e-7)
    # along the fp32 model's greedy path: logits within 5% of the largest logit (int8 activations move them by up to
    # ~1 in ~25 here; llama.cpp quantises activations the same way), and the same next token at >= 85% of positions
    same = []
    for text in ["What is the capital of France?", "Name three colours.", "Write a haiku about the sea."]:
        prompt = fp.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  return_dict=True)["input_ids"]
        ids = torch.tensor([list(prompt)])
        path = fp.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                 min_new_tokens=16, do_sample=False)[0]
        with torch.no_grad():
            want = fp.model(path[None, :-1]).logits[0, ids.shape[1] - 1:]
        k, v = cache(q4.model, rows=1, positions=128)
        steps = path.shape[0] - 1
        pos = torch.arange(steps)[None]
        got = torch.stack([q4.model.forward(path[None, :t + 1], pos[:, :t + 1], pos[:, :t + 1], k, v, 0, t + 1)[0]
                           for t in range(ids.shape[1] - 1, steps)])
        assert (got - want).abs().max() < 0.05 * want.abs().max(), text
        same += (got.argmax(-1) == want.argmax(-1)).tolist()
    assert sum(same) >= 0.85 * len(same), same
