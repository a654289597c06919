"""parameters.must_include over HTTP (the real server, GPT-2's tokenizer): a phrase already said changes nothing,
a missing one keeps a stop string (in one token or spread over several) from ending the output, and bad values are
422s naming the field."""
from __future__ import annotations

import pytest

PROMPT = "The quick brown fox"


def _gen(http, **params):
    r = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 12, "details": True,
                                                                        **params}})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_phrase_already_said_changes_nothing_and_a_missing_one_holds_the_stop(http):
    free = _gen(http)
    texts = [t["text"] for t in free["details"]["tokens"]]
    # a stop string: the text of the 6th token (first seen there), a phrase: the 3rd token's word
    stop = texts[5]
    if not stop.strip() or stop in "".join(texts[:5]) or not texts[2].strip():
        pytest.skip("the tiny model's output has no usable stop string")
    stopped = _gen(http, stop=[stop])
    assert stopped["details"]["finish_reason"] == "stop_sequence"
    said = _gen(http, stop=[stop], must_include=[texts[2].strip()])
    assert said["generated_text"] == stopped["generated_text"]
    held = _gen(http, stop=[stop], must_include=["zebra quantum lighthouse"])
    assert held["details"]["finish_reason"] == "length" and held["details"]["generated_tokens"] == 12
    assert stop not in held["generated_text"]
    # alternatives: one of them is enough
    said = _gen(http, stop=[stop], must_include=[["zebra quantum lighthouse", texts[2].strip()]])
    assert said["generated_text"] == stopped["generated_text"]


def test_a_missing_phrase_holds_a_stop_string_spread_over_two_tokens(http):
    texts = [t["text"] for t in _gen(http)["details"]["tokens"]]
    stop = texts[5] + texts[6]  # no single token's text holds it
    if not texts[5] or not texts[6] or stop in "".join(texts[:6]):
        pytest.skip("the tiny model's output has no usable stop string")
    assert _gen(http, stop=[stop])["details"]["finish_reason"] == "stop_sequence"
    held = _gen(http, stop=[stop], must_include=["zebra quantum lighthouse"])
    assert held["details"]["finish_reason"] == "length" and stop not in held["generated_text"]
    assert [t["text"] for t in held["details"]["tokens"]][:6] == texts[:6]  # the same until the stop would begin


@pytest.mark.parametrize("value, message", [
    (["x"] * 17, "at most 16 phrases"),
    ([""], "must_include"),
    (["   "], "non-blank"),
    ([["a"] * 9], "1 to 8 alternatives"),
    ([[]], "1 to 8 alternatives"),
    (["x" * 201], "at most 200 characters"),
    ([1], "must_include"),
    ("riverside", "must_include"),
])
def test_bad_must_include_is_a_422_naming_it(http, value, message):
    r = http.post("/generate", json={"inputs": PROMPT, "parameters": {"must_include": value}})
    assert r.status_code == 422 and message in r.text, r.text
