"""Inputs that must not hurt the server: oversized and trickled bodies, deep JSON, odd Unicode and names, clients
that stop reading, generations past their deadline. Every refusal is a 4xx in the error shape; never a 500."""
from __future__ import annotations

import json
import signal
import socket
import time
from typing import Iterator

import httpx
import pytest

from server.api.errors import APIError
from server.api.limits import check_text, json_depth
from tests.api.conftest import Server, read_until_closed, start_server, stop_server
from tests.api.test_errors import _err

BODY = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 3}}


def _raw(server: Server, request: bytes, wait: float = 10, rcvbuf: int | None = None) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(wait)
    s.connect((host, int(port)))
    s.sendall(request)
    return s


def _metric(server: Server, name: str) -> float:
    total = 0.0
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---------------------------------------------------------------- pure functions
def test_json_depth_counts_structure_not_strings():
    assert json_depth(b'{"a": 1}') == 1
    assert json_depth(b'{"a": [[{"b": []}]]}') == 5
    assert json_depth(b'{"a": "[[[[{{{{", "b": "\\"[[["}') == 1  # brackets inside strings (and escapes) don't count
    assert json_depth(b"[" * 100_000 + b"]" * 100_000) == 100_000
    assert json_depth(b"") == 0 and json_depth(b"123") == 0


def test_check_text_refuses_unpaired_surrogates_only():
    for ok in ("plain", "nul\x00 and \x01\x7f control", "emoji 😀👍🏽", "\u202e rtl \ufeff bom", "漢字"):
        assert check_text(ok, "inputs") == ok
    with pytest.raises(APIError) as e:
        check_text("ab\ud800c", "inputs")
    assert e.value.status == 422 and "inputs" in e.value.message and "surrogate" in e.value.message


# ---------------------------------------------------------------- the shared server (default limits)
def test_body_over_the_limit_refused_from_content_length_without_reading(server):
    head = (b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1073741824\r\n\r\n{")
    t0 = time.monotonic()
    with _raw(server, head) as s:
        reply = read_until_closed(s)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"too_large" in reply and b"max-body-bytes" in reply and time.monotonic() - t0 < 5


def test_chunked_body_over_the_limit_cut_off(server):
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    with _raw(server, head) as s:
        try:
            for _ in range(40):  # 40 x 64 KiB = 2.5 MiB > 1 MiB
                s.sendall(b"10000\r\n" + b" " * 0x10000 + b"\r\n")
        except OSError:
            pass  # the server answered and closed before we were done
        reply = read_until_closed(s)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


def test_bad_content_length_400(server):
    with _raw(server, b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n\r\n") as s:
        assert read_until_closed(s)[:12] in (b"HTTP/1.1 400",)


def test_deep_json_422_before_parsing(http):
    deep = b'{"inputs": "x", "parameters": {"grammar": ' + b"[" * 5000 + b"]" * 5000 + b"}}"
    _err(http.post("/generate", content=deep, headers={"content-type": "application/json"}), 422, "nested deeper")
    fine = {"inputs": "[" * 100 + "{" * 100, "parameters": {"max_new_tokens": 2}}  # brackets in a string
    assert http.post("/generate", json=fine).status_code == 200
    _err(http.post("/v1/chat/completions", json={"model": "tiny-gpt2", "messages": [{"role": "user", "content": [[[[[[[]]]]]]]}],
                                                 "x": json.loads("[" * 40 + "]" * 40)}), 422, "nested deeper")


@pytest.mark.parametrize("text", ["nul \x00 byte", "bell \x07 del \x7f esc \x1b[31m", "emoji 😀👍🏽🇫🇷",
                                  "rtl \u202e override \u200b zero-width \ufeff bom", "漢字とかな", "e\u0301\u0301"])
def test_odd_unicode_prompts_are_tokenised(http, text):
    r = http.post("/generate", json={**BODY, "inputs": text})
    assert r.status_code == 200, r.text
    assert http.post("/v1/completions", json={"model": "tiny-gpt2", "prompt": [text, "x"], "max_tokens": 2}).status_code == 200
    assert http.post("/v1/chat/completions", json={"model": "tiny-gpt2", "messages": [{"role": "user", "content": text}],
                                                   "max_tokens": 2}).status_code == 200


def test_unpaired_surrogates_422_naming_the_field(http):
    def post(path: str, raw: str) -> httpx.Response:
        return http.post(path, content=raw.encode(), headers={"content-type": "application/json"})

    _err(post("/generate", '{"inputs": "a\\ud800b"}'), 422, "inputs", "surrogate")
    _err(post("/generate_stream", '{"inputs": "\\udfff"}'), 422, "inputs", "surrogate")
    _err(post("/v1/completions", '{"model": "tiny-gpt2", "prompt": ["ok", "x\\udc00"], "max_tokens": 2}'), 422, "prompt", "surrogate")
    _err(post("/v1/chat/completions", '{"model": "tiny-gpt2", "messages": [{"role": "user", "content": "\\ud83d"}]}'), 422, "surrogate")
    assert post("/generate", '{"inputs": "pair \\ud83d\\ude00 ok", "parameters": {"max_new_tokens": 2}}'
                ).status_code == 200  # a proper pair is an emoji


@pytest.mark.parametrize("name", ["%C3%A9t%C3%A9", "a%00b", "..%2Fx", "%2e%2e", "%F0%9F%98%80", "a%0Ab",
                                  "x" * 300, "%ED%A0%80"])
def test_odd_task_names_are_4xx(http, name):
    r = http.post(f"/generate?task={name}", json=BODY)
    assert r.status_code in (404, 422), (r.status_code, r.text)
    r = http.post("/v1/completions", json={"model": httpx.QueryParams(f"m={name}")["m"], "prompt": "x"})
    assert r.status_code in (404, 422), (r.status_code, r.text)
    r = http.get(f"/prefixes/{name}")
    assert 400 <= r.status_code < 500, (r.status_code, r.text)


def test_odd_header_bytes_are_not_500(server):
    body = b'{"inputs": "hi", "parameters": {"max_new_tokens": 2}}'
    req = (b"POST /generate HTTP/1.1\r\nHost: x\r\nX-API-Key: \xff\xfe\x80\r\nAuthorization: Bearer \xc3\x28\r\n"
           b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    with _raw(server, req) as s:
        reply = read_until_closed(s)
    assert reply[:10] == b"HTTP/1.1 2" or reply[:10] == b"HTTP/1.1 4", reply[:200]


# ---------------------------------------------------------------- a server with short client timeouts
@pytest.fixture(scope="module")
def strict(model_dir, tmp_path_factory) -> Iterator[Server]:
    """Clients get 0.5 s per body and per blocked write; small socket send buffers so a stalled reader shows."""
    s = start_server(model_dir, tmp_path_factory.mktemp("strict"), max_seq_len=512, max_batch_size=16,
                     client_timeout_s=0.5, send_buffer_bytes=16384, max_body_bytes=65536,
                     max_upload_bytes=256 * 1024)
    yield s
    assert stop_server(s) in (0, -signal.SIGTERM), s.log.read_text()[-4000:]


def test_trickled_body_408(strict):
    t0 = time.monotonic()
    req = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"in"
    with _raw(strict, req) as s:
        reply = read_until_closed(s)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b'"timeout"' in reply and time.monotonic() - t0 < 5
    up = (b"PUT /prefixes/slow HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\n"
          b"Content-Length: 5000\r\n\r\n--B\r\n")
    with _raw(strict, up) as s:
        reply = read_until_closed(s)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert httpx.get(f"{strict.url}/prefixes/slow").status_code == 404


def test_small_body_limit_setting(strict):
    _err(httpx.post(f"{strict.url}/generate", json={"inputs": "x" * 70_000}), 413, "max-body-bytes")
    assert httpx.post(f"{strict.url}/generate", json={"inputs": "x" * 1000, "parameters": {"max_new_tokens": 1}}
                      ).status_code == 200


def test_client_that_stops_reading_is_cut_off_and_its_rows_freed(strict):
    """8 streams of 480 tokens (~0.8 MB of events) to a client that never reads: once the socket buffers are full,
    a write blocks, and after client_timeout_s the response is abandoned and the 8 rows are cancelled."""
    body = json.dumps({"model": "tiny-gpt2", "prompt": "hello", "n": 8, "max_tokens": 480, "stream": True, "temperature": 0}).encode()
    cancelled0, tokens0 = _metric(strict, "prefixserve_engine_finished_total{reason=\"cancelled\""), \
        _metric(strict, "prefixserve_engine_generated_tokens_total")
    req = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
           % len(body)) + body
    with _raw(strict, req, rcvbuf=4096) as s:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(0.25)
            if _metric(strict, "prefixserve_engine_finished_total{reason=\"cancelled\"") >= cancelled0 + 8:
                break
        generated = _metric(strict, "prefixserve_engine_generated_tokens_total") - tokens0
        assert _metric(strict, "prefixserve_engine_finished_total{reason=\"cancelled\"") == cancelled0 + 8
        assert generated < 8 * 480  # cut off, not run to the end
        assert _metric(strict, "prefixserve_batch_size") == 0
        s.settimeout(5)
        received = read_until_closed(s)  # what the buffers held, then the server's close: no [DONE]
    assert received.startswith(b"HTTP/1.1 200") and b"data: [DONE]" not in received
    assert "client read nothing" in strict.log.read_text()


# ---------------------------------------------------------------- a server with a short generation deadline
@pytest.fixture(scope="module")
def hasty(model_dir, tmp_path_factory) -> Iterator[Server]:
    """Every generation must finish within 0.5 s of its submission."""
    s = start_server(model_dir, tmp_path_factory.mktemp("hasty"), max_seq_len=512, request_timeout_s=0.5)
    yield s
    assert stop_server(s) in (0, -signal.SIGTERM), s.log.read_text()[-4000:]


def test_generation_past_its_deadline_504_and_row_freed(hasty):
    long = {"inputs": "x", "parameters": {"max_new_tokens": 480, "ignore_eos_token": True}}
    with hasty.client() as c:
        before = _metric(hasty, "prefixserve_engine_finished_total{reason=\"timeout\"")
        _err(c.post("/generate", json=long), 504, "request timeout")
        _err(c.post("/v1/completions", json={"model": "tiny-gpt2", "prompt": "x", "max_tokens": 480, "n": 2}), 504)
        events = [line for line in c.post("/generate_stream", json=long).text.splitlines() if line]
        last = json.loads(events[-1].removeprefix("data:"))
        assert last["error_type"] == "timeout" and len(events) > 1  # tokens, then the error event
        assert _metric(hasty, "prefixserve_engine_finished_total{reason=\"timeout\"") == before + 4
        assert _metric(hasty, "prefixserve_batch_size") == 0
        assert c.post("/generate", json=BODY).status_code == 200  # short ones still fit


def test_openai_stream_past_its_deadline_ends_with_openai_error(hasty):
    """A /v1 stream that fails after it started ends with OpenAI's error event: the openai client raises the
    server's message."""
    import openai

    client = openai.OpenAI(base_url=f"{hasty.url}/v1", api_key="unused", max_retries=0, timeout=60)
    stream = client.completions.create(model="tiny-gpt2", prompt="x", max_tokens=480, temperature=0, stream=True)
    texts = []
    with pytest.raises(openai.APIError) as e:
        for chunk in stream:
            texts.append(chunk.choices[0].text)
    assert texts and "request timeout" in e.value.message, e.value.message
    assert e.value.code == "timeout" and e.value.type == "server_error"
