"""TGI/LoRAX routes through the real `text-generation` and `lorax-client` packages and plain HTTP."""
from __future__ import annotations

import json

import pytest

from tests.api.conftest import peft_adapter, upload


@pytest.fixture(scope="module")
def task(server) -> str:
    """A stored prefix-tuning task named 'tgi'."""
    with server.client() as c:
        assert upload(c, "tgi", peft_adapter(tokens=4, seed=1)).status_code in (200, 201)
    return "tgi"


def test_generate_details_shape(http, task):
    r = http.post(f"/generate?task={task}", json={"inputs": "Hello world",
                                                  "parameters": {"max_new_tokens": 5, "details": True}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"generated_text", "details"}
    d = body["details"]
    assert d["finish_reason"] == "length" and d["generated_tokens"] == 5 and d["seed"] is None
    assert [set(t) for t in d["tokens"]] == [{"id", "text", "logprob", "special"}] * 5
    assert "".join(t["text"] for t in d["tokens"]) == body["generated_text"]
    assert len(r.headers["X-Prefix-Version"]) == 64
    plain = http.post(f"/generate?task={task}", json={"inputs": "Hello world", "parameters": {"max_new_tokens": 5}})
    assert plain.json() == {"generated_text": body["generated_text"]}


def test_base_model_has_no_version_and_differs_from_task(http, task):
    body = {"inputs": "Hello world", "parameters": {"max_new_tokens": 6}}
    base = http.post("/generate", json=body)
    assert base.status_code == 200 and "X-Prefix-Version" not in base.headers
    assert base.json() != http.post(f"/generate?task={task}", json=body).json()


def test_adapter_id_selects_the_task_and_null_fields_mean_defaults(http, task):
    nulls = {k: None for k in ("temperature", "top_k", "top_p", "seed", "truncate", "typical_p", "best_of",
                               "repetition_penalty", "max_new_tokens", "top_n_tokens", "grammar")}
    r = http.post("/generate", json={"inputs": "Hello world", "parameters": {**nulls, "adapter_id": task,
                                                                            "unknown_field": 1, "stop": []}})
    assert r.status_code == 200, r.text
    assert r.headers["X-Prefix-Version"] == http.get(f"/prefixes/{task}").json()["version"]
    assert len(http.post(f"/generate?task={task}", json={"inputs": "Hello world", "parameters": {
        "max_new_tokens": 8, "details": True}}).json()["details"]["tokens"]) == 8  # server default is 8


def test_stop_string_trims_text(http, task):
    full = http.post(f"/generate?task={task}", json={"inputs": "a b c", "parameters": {"max_new_tokens": 8}})
    text = full.json()["generated_text"]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    r = http.post(f"/generate?task={task}", json={"inputs": "a b c", "parameters": {
        "max_new_tokens": 8, "stop": [stop], "details": True}}).json()
    assert r["generated_text"] == text[:text.index(stop)]
    assert r["details"]["finish_reason"] == "stop_sequence"


def test_stream_events_match_generate(http, task):
    body = {"inputs": "Once upon", "parameters": {"max_new_tokens": 6, "details": True, "return_full_text": True}}
    ref = http.post(f"/generate?task={task}", json=body).json()
    with http.stream("POST", f"/generate_stream?task={task}", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert len(r.headers["X-Prefix-Version"]) == 64
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert [e["token"] for e in events] == ref["details"]["tokens"]
    assert all(e["generated_text"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == ref["generated_text"] and ref["generated_text"].startswith("Once upon")
    assert events[-1]["details"]["finish_reason"] == "length"


def test_compat_route_json_list_and_sse(http, task):
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 3, "adapter_id": task}, "stream": False}
    r = http.post("/", json=body)
    assert r.status_code == 200 and isinstance(r.json(), list)
    with http.stream("POST", "/", json={**body, "stream": True}) as s:
        events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]
    assert events[-1]["generated_text"] == r.json()[0]["generated_text"]


def test_text_generation_client(server, task):
    from text_generation import Client

    c = Client(f"{server.url}/?task={task}", timeout=60)
    res = c.generate("Hello world", max_new_tokens=5, stop_sequences=[], decoder_input_details=True)
    assert res.details.generated_tokens == 5 and res.details.finish_reason.value == "length"
    assert len(res.details.prefill) == 2
    tokens = [s.token for s in c.generate_stream("Hello world", max_new_tokens=5)]
    assert [t.id for t in tokens] == [t.id for t in res.details.tokens]
    sampled = c.generate("Hello", max_new_tokens=4, do_sample=True, temperature=0.7, top_p=0.9, seed=7)
    assert sampled.details.seed == 7
    assert sampled.generated_text == c.generate("Hello", max_new_tokens=4, do_sample=True, temperature=0.7,
                                                top_p=0.9, seed=7).generated_text


def test_lorax_client(server, task):
    from lorax import Client

    c = Client(server.url, timeout=60)
    res = c.generate("Hello world", adapter_id=task, max_new_tokens=5, details=True)
    assert res.details.generated_tokens == 5 and res.details.prompt_tokens == 2
    stream = list(c.generate_stream("Hello world", adapter_id=task, max_new_tokens=5))
    assert stream[-1].generated_text == res.generated_text
    from text_generation import Client as TGI
    assert TGI(f"{server.url}/?task={task}").generate("Hello world", max_new_tokens=5).generated_text == \
        res.generated_text


def test_lorax_client_errors_parse(server):
    from lorax import Client
    from lorax.errors import NotFoundError

    with pytest.raises(NotFoundError):
        Client(server.url).generate("Hello", adapter_id="no-such-task", max_new_tokens=2)
