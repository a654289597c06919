"""The same exactness checks on the real embedded model (SmolLM2-135M-Instruct, LLaMA, GQA 9/3 heads)."""
from __future__ import annotations

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, get_peft_model

from basemodel.convert import artifact_from_files
from basemodel.model import load_model
from prefix_store.peft_io import read_dir
from server.engine.device_prefix import DevicePrefix
from server.engine.engine import Engine, EngineConfig
from server.engine.sampling import SamplingParams

pytestmark = [pytest.mark.embedded, pytest.mark.slow]


@pytest.fixture(scope="module")
def smol():
    return load_model("embedded")


@pytest.fixture(scope="module")
def smol_adapters(smol, tmp_path_factory):
    root = tmp_path_factory.mktemp("smol")
    out = {}
    for i, n in enumerate([4, 9]):
        pm = get_peft_model(smol.model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in pm.prompt_encoder.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        pm.save_pretrained(str(root / f"prefix{n}"))
        out[f"prefix{n}"] = root / f"prefix{n}"
    # prompt tuning initialised from a task description, as PEFT's PromptTuningInit.TEXT does
    text = "Answer in French:"
    n = len(smol.tokenizer(text).input_ids)
    pm = get_peft_model(smol.model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n,
                                                       prompt_tuning_init=PromptTuningInit.TEXT,
                                                       prompt_tuning_init_text=text,
                                                       tokenizer_name_or_path=str(smol_dir(smol))))
    pm.save_pretrained(str(root / "prompt"))
    out["prompt"] = root / "prompt"
    return out


def smol_dir(smol):
    from basemodel.model import resolve_model_path
    return resolve_model_path("embedded")


def chat(smol, text: str) -> list[int]:
    ids = smol.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             return_dict=True)["input_ids"]
    return list(ids)


def test_embedded_engine_equals_peft_alone_and_mixed(smol, smol_adapters):
    prompts = [chat(smol, t) for t in ["What is the capital of France?", "Name three colours.",
                                        "Write a haiku about the sea."]]
    refs, prefixes = [], []
    for (name, d), prompt in zip(smol_adapters.items(), prompts):
        pm = PeftModel.from_pretrained(smol.model, str(d)).eval()
        ids = torch.tensor([prompt])
        out = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                          pad_token_id=smol.tokenizer.eos_token_id)
        refs.append(out[0, len(prompt):].tolist())
        art = artifact_from_files(read_dir(d), smol)
        prefixes.append(DevicePrefix(art.manifest.sha256, art.kv))
    sp = SamplingParams(max_new_tokens=12)  # stops at EOS (<|im_end|>) like generate
    engine = Engine(smol, EngineConfig(max_batch_size=8))
    alone = []
    for prompt, px in zip(prompts, prefixes):
        h = engine.submit(prompt, sp, px)
        while not h.done:
            engine.step()
        alone.append(h.wait(0).token_ids)
    assert alone == refs
    # mixed: the three tasks plus the bare model, twice over, with staggered lengths
    hs = [engine.submit(p, SamplingParams(max_new_tokens=12 - i), px)
          for i, (p, px) in enumerate(list(zip(prompts, prefixes)) * 2)]
    hs.append(engine.submit(prompts[0], sp, None))
    while not all(h.done for h in hs):
        engine.step()
    got = [h.wait(0).token_ids for h in hs[:6]]
    assert got == [a[: 12 - i] for i, a in enumerate(alone * 2)]
    # the bare-model row in the same batch equals plain HF generate
    base = smol.model.generate(input_ids=torch.tensor([prompts[0]]), max_new_tokens=12, do_sample=False,
                               pad_token_id=smol.tokenizer.eos_token_id)[0, len(prompts[0]):]
    assert hs[-1].wait(0).token_ids == base.tolist()


SHIPPED = {  # the prefixes the README's quick start uploads, and an input in the format each was trained on
    "e2e": "name : The Eagle | Type : coffee shop | food : French | price : moderate | area : riverside\n",
    "webnlg": "Alan Bean : occupation : Test pilot | Alan Bean : birthPlace : Wheeler, Texas\n",
}


@pytest.mark.parametrize("task", sorted(SHIPPED))
def test_shipped_prefix_validates_and_serves_as_its_peft_export(smol, task, tmp_path):
    """prefixes/TASK loads against the embedded model as uploaded (manifest + tensors), says what to send, and the
    engine's greedy text for an input of its format equals PEFT generate with the exported PEFT adapter."""
    from pathlib import Path

    from prefix_store.peft_io import export_peft

    root = Path(__file__).resolve().parents[2] / "prefixes" / task
    art = artifact_from_files(read_dir(root), smol)
    assert art.manifest.input_format and art.manifest.description
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    for name, data in export_peft(art).items():
        (peft_dir / name).write_bytes(data)
    prompt = smol.tokenizer(SHIPPED[task])["input_ids"]
    pm = PeftModel.from_pretrained(smol.model, str(peft_dir)).eval()
    ids = torch.tensor([prompt])
    ref = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                      pad_token_id=smol.tokenizer.eos_token_id)[0, len(prompt):].tolist()
    engine = Engine(smol, EngineConfig(max_batch_size=2))
    h = engine.submit(prompt, SamplingParams(max_new_tokens=24), DevicePrefix(art.manifest.sha256, art.kv))
    while not h.done:
        engine.step()
    got = h.wait(0).token_ids
    assert got == ref[: len(got)] and len(got) >= 8  # stops at EOS like generate, after real text
    assert smol.tokenizer.decode(got).strip()  # writes something
