"""Log-probabilities over HTTP: TGI's top_n_tokens (text-generation client) and OpenAI's logprobs (openai package),
all equal to the model's own log-softmax computed here with PEFT."""
from __future__ import annotations

import tempfile
from pathlib import Path

import openai
import pytest
import torch
from peft import PeftModel

from tests.api.conftest import peft_adapter, upload
from tests.tiny import gpt2_tokenizer, tiny_model

PROMPT, N, K = "Hello world", 5, 3


@pytest.fixture(scope="module")
def reference(server):
    """Greedy steps of the PEFT model: [(token id, logprob, [(id, logprob)] * K)] for PROMPT."""
    files = peft_adapter(seed=9)
    with server.client() as c:
        assert upload(c, "lp", files).status_code in (200, 201)
    with tempfile.TemporaryDirectory() as d:
        for name, data in files.items():
            (Path(d) / name).write_bytes(data)
        model = PeftModel.from_pretrained(tiny_model("gpt2"), d).eval()
        ids, steps = gpt2_tokenizer()(PROMPT)["input_ids"], []
        with torch.no_grad():
            for _ in range(N):
                x = torch.tensor([ids])
                lsm = torch.log_softmax(model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1], -1)
                vals, top = lsm.topk(K)
                steps.append((int(top[0]), float(vals[0]), list(zip(top.tolist(), vals.tolist()))))
                ids.append(int(top[0]))
    return steps


def _close(a: list[float], b: list[float]) -> bool:
    return a == pytest.approx(b, abs=1e-4)


def test_tgi_top_n_tokens_json_and_stream(server, reference):
    from text_generation import Client

    client = Client(f"{server.url}/?task=lp", timeout=60)
    r = client.generate(PROMPT, max_new_tokens=N, top_n_tokens=K)
    assert [t.id for t in r.details.tokens] == [t for t, _, _ in reference]
    assert _close([t.logprob for t in r.details.tokens], [lp for _, lp, _ in reference])
    for alts, (_, _, want) in zip(r.details.top_tokens, reference):
        assert [a.id for a in alts] == [i for i, _ in want] and _close([a.logprob for a in alts], [v for _, v in want])
    with server.client() as http:
        j = http.post("/generate?task=lp", json={"inputs": PROMPT, "parameters": {
            "max_new_tokens": N, "top_n_tokens": K, "details": True}}).json()["details"]
        plain = http.post("/generate?task=lp", json={"inputs": PROMPT, "parameters": {
            "max_new_tokens": N, "details": True}}).json()["details"]
    assert [[a["id"] for a in alts] for alts in j["top_tokens"]] == [[i for i, _ in w] for _, _, w in reference]
    assert "top_tokens" not in plain, "absent unless asked for, as in TGI"
    events = list(client.generate_stream(PROMPT, max_new_tokens=N, top_n_tokens=K))
    base = [[a.id for a in alts] for alts in r.details.top_tokens]
    assert [[a.id for a in e.top_tokens] for e in events] == base


def test_openai_completions_logprobs(server, reference):
    oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    r = oai.completions.create(model="lp", prompt=PROMPT, max_tokens=N, temperature=0, logprobs=K)
    lp = r.choices[0].logprobs
    assert _close(lp.token_logprobs, [v for _, v, _ in reference])
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(N)]
    tok = gpt2_tokenizer()
    for alts, (_, _, want) in zip(lp.top_logprobs, reference):
        assert _close(sorted(alts.values(), reverse=True), [v for _, v in want])
        assert set(alts) == {tok.decode([i]) for i, _ in want}
    streamed = list(oai.completions.create(model="lp", prompt=PROMPT, max_tokens=N, temperature=0, logprobs=K,
                                           stream=True))
    assert [c.choices[0].logprobs.token_logprobs[0] for c in streamed] == lp.token_logprobs
    assert [c.choices[0].logprobs.text_offset[0] for c in streamed] == lp.text_offset
    assert oai.completions.create(model="lp", prompt=PROMPT, max_tokens=2, temperature=0).choices[0].logprobs is None


def test_openai_chat_logprobs(server, reference):
    oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    msgs = [{"role": "user", "content": "Say hi"}]
    r = oai.chat.completions.create(model="lp", messages=msgs, max_tokens=N, temperature=0, logprobs=True,
                                    top_logprobs=K)
    content = r.choices[0].logprobs.content
    assert len(content) == N and "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:
        assert [a.logprob for a in c.top_logprobs] == sorted((a.logprob for a in c.top_logprobs), reverse=True)
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob) and bytes(c.bytes).decode() == c.token
    chunks = list(oai.chat.completions.create(model="lp", messages=msgs, max_tokens=N, temperature=0, logprobs=True,
                                              stream=True))
    streamed = [e.logprob for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert _close(streamed, [c.logprob for c in content])


@pytest.mark.parametrize("route,body,problem", [
    ("/v1/completions", {"model": "lp", "prompt": "a", "logprobs": 6}, "logprobs"),
    ("/v1/completions", {"model": "lp", "prompt": "a", "logprobs": "yes"}, "logprobs"),
    ("/v1/chat/completions", {"model": "lp", "messages": [{"role": "user", "content": "a"}], "top_logprobs": 2},
     "top_logprobs: needs logprobs"),
    ("/v1/chat/completions", {"model": "lp", "messages": [{"role": "user", "content": "a"}], "logprobs": True,
                              "top_logprobs": 21}, "top_logprobs"),
    ("/generate", {"inputs": "a", "parameters": {"top_n_tokens": 21}}, "parameters.top_n_tokens"),
])
def test_bad_logprob_requests_are_refused_naming_the_field(http, reference, route, body, problem):
    r = http.post(route, json=body)
    assert r.status_code in (400, 422), r.text
    assert problem in r.text
