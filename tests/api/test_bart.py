"""A BART base model behind the real server: prefix upload (native version 2 with all three prefixes, and a PEFT
seq2seq adapter), /generate, /generate_stream, POST / and /v1/completions with `inputs` going to the encoder; token
ids equal the reference implementation (and PEFT generate), also for concurrent requests of different tasks."""
from __future__ import annotations

import json
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest
import torch
from peft import PeftModel

from basemodel.model import load_model
from prefix_store.artifact import build_artifact
from prefix_store.peft_io import read_dir
from tests.api.conftest import Server, start_server, stop_server, upload
from tests.engine.test_bart_peft import make_seq2seq_adapter
from tests.tiny import save_tiny_model_dir
from trainer.bart_prefix import greedy_generate

TEXTS = ["name : The Eagle | Type : coffee shop | area : riverside", "Hello", "Summarise: prefixes are small."]


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory) -> Path:
    return save_tiny_model_dir("bart", tmp_path_factory.mktemp("bart") / "tiny-bart")


@pytest.fixture(scope="module")
def loaded(bart_dir):
    return load_model(str(bart_dir))


@pytest.fixture(scope="module")
def bart_server(bart_dir, tmp_path_factory) -> Iterator[Server]:
    s = start_server(bart_dir, tmp_path_factory.mktemp("bart-server"), max_batch_size=8, max_seq_len=256,
                     max_new_tokens_default=8)
    yield s
    assert stop_server(s) in (0, -signal.SIGTERM), s.log.read_text()[-4000:]


@pytest.fixture(scope="module")
def tasks(bart_server, loaded, tmp_path_factory) -> dict[str, tuple[dict | None, str]]:
    """Uploads: `li` (all three prefixes, from_zero), `dec` (decoder self-attention only, after_prefix), `peft`."""
    s, g = loaded.spec, torch.Generator().manual_seed(7)

    def rand(layers, heads, n, dim):  # [layers, 2, kv_heads, P, head_dim]
        return 3 * torch.randn(layers, 2, heads, n, dim, generator=g)

    li = {"kv": rand(s.num_layers, s.num_kv_heads, 4, s.head_dim),
          "encoder_kv": rand(s.num_encoder_layers, s.num_encoder_kv_heads, 6, s.encoder_head_dim),
          "cross_kv": rand(s.num_layers, s.num_kv_heads, 3, s.head_dim)}
    dec = {"kv": rand(s.num_layers, s.num_kv_heads, 5, s.head_dim)}
    peft_dir = make_seq2seq_adapter(s.num_layers, "prefix", 5, tmp_path_factory.mktemp("peft") / "a", seed=3)
    with bart_server.client() as c:
        for name, tensors, positions in (("li", li, "from_zero"), ("dec", dec, "after_prefix")):
            m, t = build_artifact(tensors.get("kv"), s.fingerprint(), encoder_kv=tensors.get("encoder_kv"),
                                  cross_kv=tensors.get("cross_kv"), positions=positions).to_bytes()
            r = upload(c, name, {"manifest.json": m, "prefix.safetensors": t})
            assert r.status_code in (200, 201), r.text
        r = upload(c, "peft", read_dir(peft_dir))
        assert r.status_code in (200, 201), r.text
        manifest = c.get("/prefixes/li").json()["manifest"]
        assert manifest["encoder_prefix_length"] == 6 and manifest["positions"] == "from_zero", manifest
    return {"li": (li, "from_zero"), "dec": (dec, "after_prefix"), "peft": (None, peft_dir)}


def expected_ids(loaded, task: str | None, tasks, text: str, n: int = 8) -> list[int]:
    """The reference's greedy ids for `text` (tokenised as the server does), EOS included if reached."""
    ids = loaded.tokenizer(text)["input_ids"]
    if task == "peft":
        model = PeftModel.from_pretrained(load_model(loaded.name).model, tasks["peft"][1]).eval()
        t = torch.tensor([ids])
        out = model.generate(input_ids=t, attention_mask=torch.ones_like(t), max_new_tokens=n, do_sample=False,
                             num_beams=1, forced_eos_token_id=None)[0, 1:].tolist()
        return out
    tensors, positions = tasks[task] if task else (None, "from_zero")
    return greedy_generate(loaded.model, ids, tensors, positions, max_new_tokens=n)


def _generate(client, task: str | None, text: str) -> dict:
    r = client.post("/generate", params={"task": task} if task else {},
                    json={"inputs": text, "parameters": {"max_new_tokens": 8, "details": True}})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("task", ["li", "dec", "peft", None])
def test_generate_equals_reference(bart_server, loaded, tasks, task):
    with bart_server.client() as c:
        for text in TEXTS[:2]:
            body = _generate(c, task, text)
            want = expected_ids(loaded, task, tasks, text)
            assert [t["id"] for t in body["details"]["tokens"]] == want
            assert body["generated_text"] == loaded.tokenizer.decode(want, skip_special_tokens=True)
            assert body["details"]["prompt_tokens"] == len(loaded.tokenizer(text)["input_ids"])


def test_concurrent_tasks_equal_reference(bart_server, loaded, tasks):
    jobs = [(task, text) for task in ("li", "dec", "peft", None) for text in TEXTS]
    with bart_server.client() as c, ThreadPoolExecutor(len(jobs)) as pool:
        bodies = list(pool.map(lambda j: _generate(c, *j), jobs))
    for (task, text), body in zip(jobs, bodies):
        assert [t["id"] for t in body["details"]["tokens"]] == expected_ids(loaded, task, tasks, text), (task, text)


def test_stream_compat_route_and_openai(bart_server, loaded, tasks):
    text = TEXTS[2]
    want = expected_ids(loaded, "li", tasks, text)
    with bart_server.client() as c:
        with c.stream("POST", "/generate_stream", params={"task": "li"},
                      json={"inputs": text, "parameters": {"max_new_tokens": 8}}) as r:
            assert r.status_code == 200
            events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
        assert [e["token"]["id"] for e in events] == want
        assert events[-1]["generated_text"] == loaded.tokenizer.decode(want, skip_special_tokens=True)
        r = c.post("/", json={"inputs": text, "parameters": {"max_new_tokens": 8, "adapter_id": "li"}})
        assert r.status_code == 200 and r.json()[0]["generated_text"] == events[-1]["generated_text"]
        r = c.post("/v1/completions", json={"model": "li", "prompt": text, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == events[-1]["generated_text"]


def test_bad_uploads_and_inputs_are_4xx(bart_server, loaded, tasks):
    s = loaded.spec
    kv = torch.randn(s.num_layers, 2, s.num_kv_heads, 3, s.head_dim)
    with bart_server.client() as c:
        wrong = torch.randn(s.num_layers + 1, 2, s.num_kv_heads, 3, s.head_dim)
        m, t = build_artifact(kv, s.fingerprint(), cross_kv=wrong).to_bytes()
        r = upload(c, "bad", {"manifest.json": m, "prefix.safetensors": t})
        assert r.status_code == 422 or r.status_code == 400, r.text
        assert "tensors.cross_kv.shape" in r.text
        r = c.post("/generate", params={"task": "li"}, json={"inputs": "", "parameters": {"max_new_tokens": 4}})
        assert 400 <= r.status_code < 500 and r.status_code != 404, r.text
        r = c.post("/generate", json={"inputs": "x " * 400, "parameters": {"max_new_tokens": 4}})
        assert 400 <= r.status_code < 500 and "maximum encoder length" in r.text, r.text
