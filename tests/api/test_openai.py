"""OpenAI routes through the real `openai` package."""
from __future__ import annotations

import openai
import pytest

from tests.api.conftest import peft_adapter, upload


@pytest.fixture(scope="module")
def oai(server):
    with server.client() as c:
        upload(c, "oa", peft_adapter(seed=5))
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_completion_matches_generate(oai, http):
    r = oai.completions.create(model="oa", prompt="Hello world", max_tokens=5, temperature=0)
    ref = http.post("/generate?task=oa", json={"inputs": "Hello world", "parameters": {"max_new_tokens": 5}})
    assert r.choices[0].text == ref.json()["generated_text"]
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5 and r.usage.prompt_tokens == 2


def test_list_prompts_n_and_seeded_sampling(oai):
    r = oai.completions.create(model="oa", prompt=["a", "b c"], max_tokens=3, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text and r.choices[2].text == r.choices[3].text
    s1 = oai.completions.create(model="oa", prompt="a", max_tokens=6, temperature=0.9, seed=3, n=2)
    s2 = oai.completions.create(model="oa", prompt="a", max_tokens=6, temperature=0.9, seed=3, n=2)
    assert [c.text for c in s1.choices] == [c.text for c in s2.choices]


def test_stream_equals_non_stream_and_stop(oai):
    full = oai.completions.create(model="oa", prompt="Once upon", max_tokens=8, temperature=0).choices[0].text
    chunks = list(oai.completions.create(model="oa", prompt="Once upon", max_tokens=8, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].usage.completion_tokens == 8
    stop = full[3:6]
    cut = oai.completions.create(model="oa", prompt="Once upon", max_tokens=8, temperature=0, stop=stop)
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = list(oai.completions.create(model="oa", prompt="Once upon", max_tokens=8, temperature=0, stop=[stop],
                                           stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_chat_completion_and_stream(oai):
    msgs = [{"role": "user", "content": "Say hi"}]
    r = oai.chat.completions.create(model="oa", messages=msgs, max_tokens=5, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens == 5
    chunks = list(oai.chat.completions.create(model="oa", messages=msgs, max_tokens=5, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content


def test_models_and_errors(oai, server):
    ids = [m.id for m in oai.models.list()]
    assert ids[0] == "tiny-gpt2" and "oa" in ids
    base = oai.completions.create(model="tiny-gpt2", prompt="Hello", max_tokens=2, temperature=0)
    assert base.usage.completion_tokens == 2
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="missing", prompt="x", max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError):
        oai.completions.create(model="oa", prompt="x", max_tokens=2, presence_penalty=1.0)


def test_errors_carry_the_servers_message(oai, http):
    """OpenAI's error object on /v1/*: the client shows the server's message, type, param and code."""
    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="missing", prompt="x", max_tokens=2)
    assert str(e.value) == "Error code: 404 - no prefix named 'missing'"
    assert e.value.body == {"message": "no prefix named 'missing'", "type": "invalid_request_error",
                            "param": "model", "code": "not_found"}
    with pytest.raises(openai.NotFoundError) as e:  # refused before the stream starts: the same
        oai.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}], stream=True)
    assert "no prefix named 'missing'" in str(e.value)
    with pytest.raises(openai.UnprocessableEntityError) as e:
        oai.completions.create(model="oa", prompt="x", max_tokens=2, presence_penalty=1.0)
    assert e.value.message == "Error code: 422 - presence_penalty: not supported by this server"
    assert e.value.param == "presence_penalty" and e.value.code == "validation"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        oai.completions.create(model="", prompt="x")
    assert e.value.param == "model" and "must not be empty" in e.value.message
    r = http.post("/v1/completions", json={"prompt": "x"})  # no model at all: a 422 naming it
    assert r.status_code == 422 and r.json()["error"]["param"] == "model", r.text
    for model in ("no such/model", "é", "oa@xyz"):  # not a task name: a model it does not have, as OpenAI says
        r = http.post("/v1/completions", json={"model": model, "prompt": "x"})
        assert r.status_code == 404 and r.json()["error"]["param"] == "model", r.text
        assert r.json()["error"]["message"].startswith(f"model: no model or task named {model!r}"), r.text
    for prompt in (["a", 1], [1.5], [True], ["1", 2], [[1], ["a"]], [[1, None]]):  # as the schema says
        r = http.post("/v1/completions", json={"model": "tiny-gpt2", "prompt": prompt, "max_tokens": 1})
        assert r.status_code == 422 and r.json()["error"]["message"].startswith("prompt"), (prompt, r.text)
    r = http.post("/v1/completions", json={"model": "tiny-gpt2", "prompt": [15496.0, 11], "max_tokens": 1})
    assert r.status_code == 200, r.text  # 15496.0 is an integer to JSON Schema: accepted as 15496
    r = http.post("/v1/completions", json={"model": "tiny-gpt2", "prompt": "x", "max_tokens": 1, "logprobs": 2.0})
    assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["top_logprobs"][0]) >= 2, r.text
    r = http.post("/v1/completions", json={"model": "tiny-gpt2", "prompt": "x", "max_tokens": 1, "logprobs": 2.5})
    assert r.status_code == 422 and r.json()["error"]["param"] == "logprobs", r.text
    r = http.post("/v1/nothing-here", json={})  # unknown routes under /v1 answer in OpenAI's shape too
    assert r.status_code == 404 and r.json()["error"]["message"] == "Not Found"
    r = http.post("/generate?task=missing", json={"inputs": "x"})  # TGI's shape stays on TGI's routes
    assert r.json() == {"error": "no prefix named 'missing'", "error_type": "not_found"}
