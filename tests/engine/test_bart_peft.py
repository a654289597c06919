"""PEFT seq2seq prefix-tuning adapters on BART: imported as a decoder self-attention prefix ("after_prefix"), served
token for token as PEFT generate does (alone and mixed), exported back where PEFT can represent the prefix."""
from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model

from basemodel.convert import artifact_from_files
from prefix_store.artifact import ArtifactError, build_artifact
from prefix_store.peft_io import ADAPTER_CONFIG, export_peft, parse_peft, read_dir, write_dir
from server.engine.device_prefix import DevicePrefix
from server.engine.engine import Engine, EngineConfig, generate_sync
from server.engine.sampling import SamplingParams
from tests.engine.conftest import make_peft_adapter
from tests.tiny import bart_tokenizer, loaded_tiny, tiny_model

TEXTS = ["The quick brown fox jumps over the lazy dog.", "name : Zizzi | Type : pub", "Hello there"]


def make_seq2seq_adapter(layers: int, method: str, n: int, path, seed: int) -> str:
    """A PEFT SEQ_2_SEQ_LM adapter with random weights (PEFT's num_layers is the encoder's, so both are `layers`)."""
    cfg_cls = PrefixTuningConfig if method == "prefix" else PromptTuningConfig
    pm = get_peft_model(tiny_model("bart", encoder_layers=layers, decoder_layers=layers),
                        cfg_cls(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=n))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.prompt_encoder.parameters():
            p.copy_(3 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(path))
    return str(path)


def peft_generate(layers: int, adapter_dir: str | None, prompt: list[int], n: int) -> list[int]:
    """PEFT generate, greedy, n tokens (HF's forced EOS at the length limit off, as the server does not apply it)."""
    model = tiny_model("bart", encoder_layers=layers, decoder_layers=layers)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, num_beams=1, forced_eos_token_id=None)
    return out[0, 1:].tolist()  # after decoder_start_token_id


@pytest.fixture(scope="module", params=[2, 3], ids=["2-layers", "3-layers"])
def setup(request, tmp_path_factory):
    layers = request.param  # PEFT hands decoder layer i the table's layer 2i mod layers: [0, 0] and [0, 2, 1]
    root = tmp_path_factory.mktemp(f"peft-bart-{layers}")
    adapters = [make_seq2seq_adapter(layers, "prefix", n, root / f"a{n}", seed=n) for n in (4, 9)]
    return layers, loaded_tiny("bart", encoder_layers=layers, decoder_layers=layers), adapters


@pytest.fixture(scope="module")
def inputs():
    tok = bart_tokenizer()
    return [tok(t).input_ids for t in TEXTS]


def test_import_serves_as_peft_generate_alone_and_mixed(setup, inputs):
    layers, loaded, adapters = setup
    s = loaded.spec
    arts = [artifact_from_files(read_dir(a), loaded) for a in adapters]
    for art in arts:
        m = art.manifest
        assert sorted(art.tensors) == ["kv"] and m.positions == "after_prefix" and m.source == "peft:prefix_tuning"
    prefixes = [DevicePrefix.from_artifact(a.manifest.sha256, a, loaded.device, loaded.dtype) for a in arts]
    jobs = [(inputs[i % 3], i % 3) for i in range(6)]  # adapter 0, adapter 1, no adapter
    expected = [peft_generate(layers, adapters[k] if k < 2 else None, p, 8) for p, k in jobs]
    engine = Engine(loaded, EngineConfig(max_batch_size=4))
    engine.start()
    try:
        res = generate_sync(engine, [p for p, _ in jobs], SamplingParams(max_new_tokens=8, ignore_eos=True),
                            [prefixes[k] if k < 2 else None for _, k in jobs])
    finally:
        engine.stop()
    assert [r.token_ids for r in res] == expected
    assert expected[0] != peft_generate(layers, None, inputs[0], 8)  # the adapter matters
    # and so does PEFT's layer order: the table's layers served in their own order decode differently
    table = parse_peft(read_dir(adapters[0])).embeddings
    naive = table.view(table.shape[0], layers, 2, s.num_kv_heads, s.head_dim).permute(1, 2, 3, 0, 4)
    engine = Engine(loaded)
    h = engine.submit(inputs[0], SamplingParams(max_new_tokens=8, ignore_eos=True), DevicePrefix("naive", naive))
    while not h.done:
        engine.step()
    assert h.wait(0).token_ids != expected[0]


def test_export_round_trip_serves_identically(setup, inputs, tmp_path):
    layers, loaded, adapters = setup
    art = artifact_from_files(read_dir(adapters[1]), loaded)
    out = write_dir(export_peft(art), tmp_path / "exported")
    cfg = json.loads((tmp_path / "exported" / ADAPTER_CONFIG).read_text())
    assert cfg["task_type"] == "SEQ_2_SEQ_LM" and cfg["num_transformer_submodules"] == 2
    again = artifact_from_files(read_dir(out), loaded)
    assert again.manifest.sha256 == art.manifest.sha256  # the same served prefix, bit for bit
    assert peft_generate(layers, str(out), inputs[0], 8) == peft_generate(layers, adapters[1], inputs[0], 8)


def test_export_refuses_what_peft_cannot_represent(setup):
    layers, loaded, _ = setup
    s = loaded.spec
    kv = torch.randn(s.num_layers, 2, s.num_kv_heads, 3, s.head_dim)
    with pytest.raises(ArtifactError) as e:
        export_peft(build_artifact(kv, s.fingerprint(), cross_kv=kv, positions="after_prefix"))
    assert e.value.field == "peft_export" and "cross_kv" in str(e.value)
    with pytest.raises(ArtifactError, match="positions from_zero"):
        export_peft(build_artifact(kv, s.fingerprint(), positions="from_zero"))
    if layers % 2 == 0:  # PEFT serves one table layer to decoder layers i and i + layers/2: they must be equal
        with pytest.raises(ArtifactError, match="PEFT's seq2seq prefix tuning serves one table layer to both"):
            export_peft(build_artifact(kv, s.fingerprint()))
    else:
        export_peft(build_artifact(kv, s.fingerprint()))


def test_wrong_adapter_kinds_are_refused(setup, tmp_path):
    _, loaded, adapters = setup
    prompt = make_seq2seq_adapter(2, "prompt", 4, tmp_path / "prompt", seed=0)
    with pytest.raises(ArtifactError) as e:
        artifact_from_files(read_dir(prompt), loaded)
    assert e.value.field == "adapter_config.peft_type" and e.value.found == "PROMPT_TUNING"
    causal = make_peft_adapter("gpt2", "prefix", 3, tmp_path / "causal", seed=0)
    with pytest.raises(ArtifactError) as e:
        artifact_from_files(read_dir(causal), loaded)  # a CAUSAL_LM adapter for a seq2seq model
    assert e.value.field == "adapter_config.task_type" and e.value.expected == "SEQ_2_SEQ_LM"
    with pytest.raises(ArtifactError) as e:
        artifact_from_files(read_dir(adapters[0]), loaded_tiny("gpt2"))  # and the other way round
    assert e.value.field == "adapter_config.task_type" and e.value.expected == "CAUSAL_LM"
