"""vLLM-style extension fields on the OpenAI routes, sent as the `openai` package sends them (`extra_body`):
must_include, repetition_penalty and top_k act as the same fields of TGI's `parameters` do (same output for the
same values), and bad values are 422s naming the field, in OpenAI's error shape."""
from __future__ import annotations

import openai
import pytest

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _tgi(http, **params) -> dict:
    r = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 12, "details": True,
                                                                        **params}})
    assert r.status_code == 200, r.text
    return r.json()


def _v1(oai, stream: bool = False, **extra):
    """A greedy completion of PROMPT with `extra` sent in the body as the openai package's extra_body."""
    stop = extra.pop("stop", None)
    return oai.completions.create(model="tiny-gpt2", prompt=PROMPT, max_tokens=12, temperature=0, stop=stop,
                                  stream=stream, extra_body=extra or None)


def test_must_include_holds_the_stop_as_on_the_tgi_route(oai, http):
    texts = [t["text"] for t in _tgi(http)["details"]["tokens"]]
    stop = texts[5]  # a stop string: the 6th token's text (first seen there); a phrase: the 3rd token's word
    if not stop.strip() or stop in "".join(texts[:5]) or not texts[2].strip():
        pytest.skip("the tiny model's output has no usable stop string")
    stopped = _v1(oai, stop=[stop]).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == _tgi(http, stop=[stop])["generated_text"]
    said = _v1(oai, stop=[stop], must_include=[texts[2].strip()]).choices[0]
    assert said.text == stopped.text  # a phrase already said changes nothing
    missing = ["zebra quantum lighthouse"]
    held = _v1(oai, stop=[stop], must_include=missing)
    assert held.choices[0].finish_reason == "length" and held.usage.completion_tokens == 12
    assert stop not in held.choices[0].text
    assert held.choices[0].text == _tgi(http, stop=[stop], must_include=missing)["generated_text"]
    streamed = "".join(c.choices[0].text for c in _v1(oai, stream=True, stop=[stop], must_include=missing))
    assert streamed == held.choices[0].text
    alternatives = _v1(oai, stop=[stop], must_include=[["zebra quantum lighthouse", texts[2].strip()]])
    assert alternatives.choices[0].text == stopped.text  # one alternative is enough


def test_must_include_on_chat_and_for_every_choice(oai):
    msgs = [{"role": "user", "content": "Say hi"}]
    free = oai.chat.completions.create(model="tiny-gpt2", messages=msgs, max_tokens=10, temperature=0)
    word = free.choices[0].message.content.split()[-1] if free.choices[0].message.content.split() else ""
    if not word or free.choices[0].finish_reason != "length":
        pytest.skip("the tiny model's chat answer has no word to require")
    said = oai.chat.completions.create(model="tiny-gpt2", messages=msgs, max_tokens=10, temperature=0,
                                       extra_body={"must_include": [word]})
    assert said.choices[0].message.content == free.choices[0].message.content
    r = oai.completions.create(model="tiny-gpt2", prompt=[PROMPT, "Hello"], max_tokens=12, temperature=0, n=2,
                               stop=["e"], extra_body={"must_include": ["zebra quantum lighthouse"]})
    assert [c.finish_reason for c in r.choices] == ["length"] * 4 and r.usage.completion_tokens == 48


def test_repetition_penalty_and_top_k_act_as_on_the_tgi_route(oai, http):
    greedy = _v1(oai).choices[0].text
    penalised = _v1(oai, repetition_penalty=1.8).choices[0].text
    assert penalised == _tgi(http, repetition_penalty=1.8)["generated_text"]
    assert penalised != greedy  # the tiny model repeats itself: the penalty changes its output
    sampled = oai.completions.create(model="tiny-gpt2", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=11,
                                     extra_body={"top_k": 3})
    ref = _tgi(http, do_sample=True, top_k=3, seed=11)
    assert sampled.choices[0].text == ref["generated_text"]
    off = [oai.completions.create(model="tiny-gpt2", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=11,
                                  extra_body={"top_k": k}).choices[0].text for k in (0, -1)]
    assert off[0] == off[1] == _tgi(http, do_sample=True, seed=11)["generated_text"]


@pytest.mark.parametrize("extra, param, message", [
    ({"must_include": ["x"] * 17}, "must_include", "at most 16 phrases"),
    ({"must_include": ["   "]}, "must_include", "non-blank"),
    ({"must_include": [["a"] * 9]}, "must_include", "1 to 8 alternatives"),
    ({"must_include": "riverside"}, "must_include", "must_include"),
    ({"repetition_penalty": 0}, "repetition_penalty", "repetition_penalty"),
    ({"top_k": -2}, "top_k", "top_k"),
    ({"top_p": 1.5}, "top_p", "top_p: must be in (0, 1]"),  # the engine's own checks name their field too
    ({"seed": -1}, "seed", "seed: must be in [0, 2^63)"),
])
def test_bad_values_are_422s_naming_them(oai, extra, param, message):
    with pytest.raises(openai.UnprocessableEntityError) as e:
        _v1(oai, **extra)
    assert message in e.value.message and (e.value.param or "").startswith(param), (e.value.message, e.value.param)
