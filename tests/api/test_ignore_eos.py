"""`ignore_eos` on /v1/completions (vLLM's and llama-server's extension): generation goes on past an EOS token."""
from __future__ import annotations

import json
import shutil
import signal

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tests.api.conftest import start_server, stop_server
from tests.tiny import EOS

PROMPT = "Hello world"


@pytest.fixture(scope="module")
def eos_server(model_dir, tmp_path_factory):
    """The tiny model with its greedy first token after PROMPT declared an EOS token (generation_config.json), so
    a greedy request on PROMPT ends at once unless it ignores EOS. (The tiny model never picks its own EOS.)"""
    path = tmp_path_factory.mktemp("eos") / "model"
    shutil.copytree(model_dir, path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = AutoTokenizer.from_pretrained(path)(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        first = int(model(ids).logits[0, -1].argmax())
    assert first != EOS
    GenerationConfig(bos_token_id=EOS, eos_token_id=[EOS, first]).save_pretrained(path)
    s = start_server(path, tmp_path_factory.mktemp("eos-server"))
    yield s
    assert stop_server(s) in (0, -signal.SIGTERM), s.log.read_text()[-4000:]


def test_ignore_eos_generates_max_tokens(eos_server):
    with eos_server.client() as c:
        body = {"model": c.get("/v1/models").json()["data"][0]["id"], "prompt": PROMPT, "max_tokens": 6,
                "temperature": 0}
        stopped = c.post("/v1/completions", json=body).json()
        assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["usage"]["completion_tokens"] <= 1
        assert c.post("/v1/completions", json={**body, "ignore_eos": False}).json()["usage"] == \
            stopped["usage"]
        full = c.post("/v1/completions", json={**body, "ignore_eos": True}).json()
        assert full["choices"][0]["finish_reason"] == "length" and full["usage"]["completion_tokens"] == 6
        stream = {**body, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        with c.stream("POST", "/v1/completions", json=stream) as r:
            chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
        assert "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"]) == full["choices"][0]["text"]
        assert chunks[-1]["usage"]["completion_tokens"] == 6
        r = c.post("/v1/completions", json={**body, "ignore_eos": "maybe"})
        assert r.status_code == 422 and "ignore_eos" in r.text
