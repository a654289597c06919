"""LoRA adapters over HTTP on the real server: uploaded like prefixes, served in the same continuously batched decode
as prefix, prompt-tuning and bare rows, each row's greedy ids equal to HF PEFT generate with its adapter alone."""
from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import torch
from peft import PeftModel

from prefix_store.peft_io import read_dir
from tests.api.conftest import Server, error_of, peft_adapter, start_server, stop_server, upload
from tests.tiny import EOS, gpt2_tokenizer, save_lora_adapter, save_tiny_model_dir, tiny_model

ALL = {"gpt2": ["c_attn", "c_proj", "c_fc"],
       "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
PROMPTS = ["The quick brown fox", "Once upon a time, there", "Hello", "name : Zizzi | Type : pub | area : city",
           "A B C D E F G"]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory) -> Iterator[Server]:
    """A server on a tiny random LLaMA (grouped-query attention) with GPT-2's tokenizer."""
    model = save_tiny_model_dir("llama", tmp_path_factory.mktemp("llama") / "tiny-llama")
    s = start_server(model, tmp_path_factory.mktemp("llama-server"), max_batch_size=8, max_prefill_tokens=4)
    yield s
    stop_server(s)


def adapters(kind: str, root: Path) -> dict[str, tuple[dict[str, bytes], str]]:
    """name -> (files to upload, directory PEFT loads): LoRA r4 / r8 rsLoRA / r2 on every linear layer of the
    blocks, prefix tuning, prompt tuning."""
    loras = {"l4": dict(r=4), "l8": dict(r=8, use_rslora=True, lora_alpha=16), "l2": dict(r=2, target_modules=ALL[kind])}
    out = {}
    for i, (name, cfg) in enumerate(loras.items()):
        d = save_lora_adapter(kind, root / name, seed=20 + i, **cfg)
        out[name] = (read_dir(d), str(d))
    for name, prompt_tuning in (("pre", False), ("pt", True)):
        files = peft_adapter(kind, tokens=3 + prompt_tuning, seed=7, prompt_tuning=prompt_tuning)
        (root / name).mkdir()
        for n, data in files.items():
            (root / name / n).write_bytes(data)
        out[name] = (files, str(root / name))
    return out


def reference(kind: str, adapter_dir: str | None, prompt: str, n: int) -> list[int]:
    """HF PEFT generate with the adapter alone: greedy, stopping at EOS as the server does."""
    model = tiny_model(kind)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    ids = torch.tensor([gpt2_tokenizer()(prompt)["input_ids"]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=EOS, pad_token_id=EOS)
    return out[0, ids.shape[1]:].tolist()


async def _stream(c: httpx.AsyncClient, task: str | None, prompt: str, n: int, delay: float) -> dict:
    """One streamed request started after `delay`: its token ids and when its first and last tokens came."""
    await asyncio.sleep(delay)
    ids, times = [], []
    async with c.stream("POST", "/generate_stream", params={"task": task} if task else {},
                        json={"inputs": prompt, "parameters": {"max_new_tokens": n}}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                ids.append(json.loads(line[5:])["token"]["id"])
                times.append(time.monotonic())
    return {"ids": ids, "first": times[0], "last": times[-1]}


def mixed_rows_equal_peft(server: Server, kind: str, root: Path) -> None:
    tasks = adapters(kind, root)
    with server.client() as http:
        for name, (files, _) in tasks.items():
            r = upload(http, name, files)
            assert r.status_code in (200, 201), r.text
            assert r.json()["manifest"]["kind"] == ("lora" if name.startswith("l") else "prefix_kv")
    names = [*tasks, None]
    jobs = [(names[i % len(names)], PROMPTS[i % len(PROMPTS)], 3 + (i * 7) % 14, 0.15 * (i // 3))
            for i in range(12)]

    async def together() -> list[dict]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            return await asyncio.gather(*(_stream(c, t, p, n, d) for t, p, n, d in jobs))

    got = asyncio.run(together())
    for (task, prompt, n, _), g in zip(jobs, got):
        assert g["ids"] == reference(kind, tasks[task][1] if task else None, prompt, n), (task, prompt, n)
    # rows joined while others were generating, and left while others went on
    assert any(a["first"] < b["first"] < a["last"] and b["last"] < a["last"] for a in got for b in got)


def test_gpt2_lora_prefix_prompt_and_bare_rows_mixed_equal_peft(server, tmp_path):
    mixed_rows_equal_peft(server, "gpt2", tmp_path)


def test_llama_lora_prefix_prompt_and_bare_rows_mixed_equal_peft(llama_server, tmp_path):
    mixed_rows_equal_peft(llama_server, "llama", tmp_path)


def test_lora_uploads_versions_download_and_refusals(http, tmp_path):
    files = read_dir(save_lora_adapter("gpt2", tmp_path / "a", r=4, seed=1))
    first = upload(http, "lora-v", files).json()
    m = first["manifest"]
    assert m["kind"] == "lora" and m["format_version"] == 3 and m["lora"]["r"] == 4 and m["source"] == "peft:lora"
    assert m["nbytes"] == sum(t.numel() * 4 for t in (torch.zeros(4, 64), torch.zeros(192, 4))) * 2
    second = upload(http, "lora-v", read_dir(save_lora_adapter("gpt2", tmp_path / "b", r=2, seed=2))).json()
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 6, "details": True}}
    old = http.post("/generate", params={"task": f"lora-v@{first['version'][:12]}"}, json=body)
    new = http.post("/generate", params={"task": "lora-v"}, json=body)
    assert old.status_code == new.status_code == 200
    assert old.headers["X-Prefix-Version"] == first["version"] and new.headers["X-Prefix-Version"] == second["version"]
    # the native download re-uploads as the same version
    z = http.get("/prefixes/lora-v/download", params={"file": "manifest.json"}).content
    t = http.get("/prefixes/lora-v/download", params={"file": "prefix.safetensors"}).content
    again = upload(http, "lora-copy", {"manifest.json": z, "prefix.safetensors": t})
    assert again.status_code == 201 and again.json()["version"] == second["version"]
    # refusals name the field, with a 422
    cfg = json.loads(files["adapter_config.json"])
    for change, field in [({"use_dora": True}, "adapter_config.use_dora"), ({"r": 0}, "adapter_config.r"),
                          ({"target_modules": ["q_proj"]}, "adapter_config.target_modules")]:
        r = upload(http, "lora-bad", {**files, "adapter_config.json": json.dumps({**cfg, **change}).encode()})
        assert r.status_code == 422 and error_of(r)[0].startswith(field), r.text


def test_openai_and_lorax_names_reach_lora_tasks(server, http, tmp_path):
    """The task works under every name the API knows it by: ?task=, adapter_id (LoRAX) and OpenAI's model."""
    d = save_lora_adapter("gpt2", Path(tempfile.mkdtemp(dir=tmp_path)) / "a", r=4, seed=5)
    assert upload(http, "lora-names", read_dir(d)).status_code == 201
    want = reference("gpt2", str(d), "Hello", 5)
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 5, "details": True}}
    via_task = http.post("/generate", params={"task": "lora-names"}, json=body).json()
    via_adapter = http.post("/generate", json={**body, "parameters": {**body["parameters"],
                                                                     "adapter_id": "lora-names"}}).json()
    assert [t["id"] for t in via_task["details"]["tokens"]] == want
    assert via_adapter["generated_text"] == via_task["generated_text"]
    oai = http.post("/v1/completions", json={"model": "lora-names", "prompt": "Hello", "max_tokens": 5,
                                             "temperature": 0}).json()
    assert oai["choices"][0]["text"] == via_task["generated_text"]
