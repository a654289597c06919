"""LoRA rows in mixed batches: greedy ids equal HF PEFT generate with the adapter alone, token for token, whatever
the batch-mates (LoRA of other ranks, prefixes, prompt tuning, bare rows), joining and leaving mid-generation."""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from peft import PeftModel

from basemodel.convert import artifact_from_files
from prefix_store.peft_io import read_dir
from server.engine.engine import Engine, EngineConfig
from server.engine.lora import DeviceLora, LoraBatch
from server.engine.sampling import SamplingParams
from tests.engine.test_exactness import PROMPTS, device_prefix, run_alone
from tests.tiny import loaded_tiny, save_lora_adapter, tiny_model

ALL = {"gpt2": ["c_attn", "c_proj", "c_fc"],
       "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
# name -> (rank, LoraConfig fields besides r); "all": every linear layer of the blocks
LORAS = {"r4": (4, {}), "r8rs": (8, {"use_rslora": True, "lora_alpha": 16}), "r2all": (2, {"target_modules": "all"})}


@pytest.fixture(scope="session")
def loras(kind, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp(f"loras-{kind}")
    out = {}
    for i, (name, (r, cfg)) in enumerate(LORAS.items()):
        cfg = dict(cfg, target_modules=ALL[kind]) if cfg.get("target_modules") == "all" else cfg
        out[name] = str(save_lora_adapter(kind, root / name, r=r, seed=10 + i, **cfg))
    return out


@lru_cache(maxsize=16)
def _peft_model(kind: str, adapter_dir: str | None):
    model = tiny_model(kind)
    return PeftModel.from_pretrained(model, adapter_dir).eval() if adapter_dir else model


def peft_generate(kind: str, adapter_dir: str | None, prompt: list[int], n: int) -> list[int]:
    """HF (PEFT) generate with the adapter alone, greedy, EOS ignored (each adapter's model loaded once)."""
    ids = torch.tensor([prompt])
    out = _peft_model(kind, adapter_dir).generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                  max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def device_lora(path: str, loaded) -> DeviceLora:
    art = artifact_from_files(read_dir(path), loaded)
    return DeviceLora.from_artifact(art.manifest.sha256, art, loaded.device, loaded.dtype)


def test_lora_alone_equals_peft_generate(kind, loaded, loras):
    engine = Engine(loaded, EngineConfig(max_batch_size=4))
    for i, (name, path) in enumerate(loras.items()):
        prompt = PROMPTS[(i + 1) % len(PROMPTS)]
        got = run_alone(engine, prompt, device_lora(path, loaded), 10)
        assert got == peft_generate(kind, path, prompt, 10), name
        assert got != run_alone(engine, prompt, None, 10), name  # the adapter really changes the output


def test_mixed_rows_join_and_leave_equal_peft_generate(kind, loaded, loras, adapters):
    """LoRA of ranks 4/8/2 (rsLoRA, all modules), prefix tuning, prompt tuning and bare rows in one batch of 6,
    prompts prefilled 3 tokens per step (chunked), requests arriving every other step and finishing at different
    steps."""
    engine = Engine(loaded, EngineConfig(max_batch_size=6, max_prefill_tokens=3))
    tasks = [(p, device_lora(p, loaded)) for p in loras.values()]
    tasks += [(adapters["a3"], device_prefix(adapters["a3"], loaded)),
              (adapters["p5"], device_prefix(adapters["p5"], loaded)), (None, None)]
    jobs = [(PROMPTS[(i * 3) % len(PROMPTS)], tasks[i % len(tasks)], 3 + (i * 5) % 9) for i in range(12)]
    handles, kinds_per_step, next_job = [], [], 0
    while next_job < len(jobs) or not all(h.done for h in handles):
        if next_job < len(jobs) and engine.stats.steps % 2 == 0:
            for p, (_, payload), n in jobs[next_job:next_job + 3]:
                handles.append(engine.submit(p, SamplingParams(max_new_tokens=n, ignore_eos=True), payload))
            next_job += 3
        kinds_per_step.append({type(r.request.task.payload).__name__ if r.request.task else "bare"
                               for r in engine.batch.decoding})
        engine.step()
    for h, (p, (path, _), n) in zip(handles, jobs):
        assert h.wait(0).token_ids == peft_generate(kind, path, p, n), (path, p, n)
    assert any({"DeviceLora", "DevicePrefix", "bare"} <= k for k in kinds_per_step)  # one decode step held all


def test_row_does_not_depend_on_batch_mates(kind, loaded, loras, adapters):
    """One LoRA row decoded beside nothing, beside other adapters of other ranks, and beside prefix rows."""
    lora = device_lora(loras["r4"], loaded)
    others = [device_lora(loras["r8rs"], loaded), device_lora(loras["r2all"], loaded),
              device_prefix(adapters["b7"], loaded), None]
    engine = Engine(loaded, EngineConfig(max_batch_size=8))
    alone = run_alone(engine, PROMPTS[0], lora, 12)
    for mates in ([others[0]], others, [lora, lora, others[2]]):
        params = SamplingParams(max_new_tokens=12, ignore_eos=True)
        h = engine.submit(PROMPTS[0], params, lora)
        rest = [engine.submit(PROMPTS[(j + 1) % len(PROMPTS)], params, m) for j, m in enumerate(mates)]
        while not all(x.done for x in [h, *rest]):
            engine.step()
        assert h.wait(0).token_ids == alone


def test_only_lora_rows_are_gathered_and_ranks_padded(loaded, loras):
    a, b = device_lora(loras["r4"], loaded), device_lora(loras["r8rs"], loaded)
    module = sorted(a.modules & b.modules)[0]
    batch = LoraBatch([None, a, None, b, a])
    rows = batch.rows_for(module)
    assert rows.index.tolist() == [1, 3, 4]
    assert rows.a_t.shape[0] == 3 and rows.a_t.shape[2] == 8 and rows.b_t.shape[1] == 8  # padded to rank 8
    assert torch.equal(rows.a_t[0, :, :4], a.a[module].t()) and not rows.a_t[0, :, 4:].any()
    assert rows.scale.flatten().tolist() == pytest.approx([a.scaling, b.scaling, a.scaling])
    assert LoraBatch([None, None]).rows_for(module) is None
    engine = Engine(loaded, EngineConfig(max_batch_size=4))
    run_alone(engine, PROMPTS[0], None, 3)  # bare rows: no LoRA batch is ever made
    assert not engine.runner.lora_layers._recent and engine.runner.lora_layers.batch is None


def test_lora_refused_where_the_runner_has_no_lora_layers():
    lora = DeviceLora("v", {"model.decoder.layers.0.fc1": torch.zeros(2, 64)},
                      {"model.decoder.layers.0.fc1": torch.zeros(128, 2)}, 2, 1.0)
    bart = Engine(loaded_tiny("bart"))
    assert "does not serve LoRA" in bart.lora_refusal
    with pytest.raises(ValueError, match="task: .*does not serve LoRA adapters"):
        bart.submit([5, 6], SamplingParams(max_new_tokens=2), lora)


def test_adapter_naming_a_module_the_model_lacks_is_refused_alone(loaded, loras):
    """Refused at submission (the client's 422), before it is queued; the good row beside it is untouched."""
    good = device_lora(loras["r4"], loaded)
    bad = DeviceLora("bad", {"no.such.module": torch.zeros(4, 8)}, {"no.such.module": torch.zeros(8, 4)}, 4, 1.0)
    engine = Engine(loaded, EngineConfig(max_batch_size=4))
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    h = engine.submit(PROMPTS[0], params, good)
    with pytest.raises(ValueError, match="no.such.module"):
        engine.submit(PROMPTS[0], params, bad)
    while not h.done:
        engine.step()
    ok = h.wait(0)
    assert ok.finish_reason == "length" and len(ok.token_ids) == 4
