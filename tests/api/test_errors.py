"""Every client error class: status, TGI's error shape (OpenAI's on /v1/*), the field named; never a 500."""
from __future__ import annotations

import io
import json
import socket
import time

import httpx
import pytest
import torch
from safetensors.torch import load, save

from tests.api.conftest import error_of, peft_adapter, read_until_closed, start_server, stop_server, upload


def _err(r: httpx.Response, status: int, *words: str) -> dict:
    """Check the status, the shape of the body and the words of its message; the body as TGI's shape."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    if r.request.url.path.startswith("/v1/"):
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    else:
        assert set(body) == {"error", "error_type"}, body
    message, error_type = error_of(r)
    for w in words:
        assert w in message, (w, body)
    return {"error": message, "error_type": error_type}


@pytest.fixture(scope="module")
def task(server) -> str:
    with server.client() as c:
        upload(c, "errs", peft_adapter(seed=3))
    return "errs"


def test_empty_task_is_422_not_the_base_model(http):
    """An empty ?task= (or adapter_id) is a mistake to name, not a silent request for the bare model."""
    for path in ("/generate?task=", "/generate_stream?task=", "/?task=%20"):
        _err(http.post(path, json={"inputs": "hi"}), 422, "task: must not be empty")
    _err(http.post("/generate", json={"inputs": "hi", "parameters": {"adapter_id": ""}}), 422,
         "parameters.adapter_id: must not be empty")
    _err(http.post("/v1/completions", json={"model": "", "prompt": "hi"}), 422, "model: must not be empty")
    _err(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}), 422, "model")
    assert http.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 1}}).status_code == 200


def test_unknown_task_404(http):
    _err(http.post("/generate?task=nope", json={"inputs": "hi"}), 404, "nope")
    _err(http.post("/v1/completions", json={"model": "nope", "prompt": "hi"}), 404)


@pytest.mark.parametrize("params,field", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": -1, "do_sample": True}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"max_new_tokens": "many"}, "max_new_tokens"),
    ({"best_of": 2}, "best_of"),
    ({"stop": [""]}, "stop"),
    ({"truncate": 0}, "truncate"),
    ({"max_new_tokens": 10_000}, "max_new_tokens"),
    ({"adapter_id": "other"}, "adapter_id"),
])
def test_invalid_parameters_422_name_the_field(http, task, params, field):
    body = _err(http.post(f"/generate?task={task}", json={"inputs": "hi", "parameters": params}), 422, field)
    assert body["error_type"] == "validation"


def test_malformed_json_bodies_422(http):
    _err(http.post("/generate", content=b"{not json", headers={"content-type": "application/json"}), 422)
    _err(http.post("/generate", json={"parameters": {}}), 422, "inputs")
    _err(http.post("/generate", json={"inputs": ""}), 422, "inputs")
    nan = b'{"inputs": "hi", "parameters": {"temperature": NaN}}'
    _err(http.post("/generate", content=nan, headers={"content-type": "application/json"}), 422, "temperature")
    _err(http.post("/v1/completions", json={"model": "tiny-gpt2", "prompt": "hi", "n": 0}), 422, "n")
    _err(http.post("/v1/completions", json={"model": "tiny-gpt2", "prompt": [[10**9]]}), 422, "token ids")


def test_prompt_longer_than_context_422(http):
    body = _err(http.post("/generate", json={"inputs": "word " * 600, "parameters": {"max_new_tokens": 4}}), 422)
    assert "maximum sequence length" in body["error"]


def test_invalid_task_names_422(http):
    for name in (".hidden", "a" * 129, "sp ace", "semi;colon"):
        _err(http.post(f"/generate?task={name}", json={"inputs": "hi"}), 422, "task")
        _err(upload(http, name, peft_adapter()), 422, "task")
    assert http.put("/prefixes/..%2Fescape", files=[("files", ("a", b"x"))]).status_code in (404, 422)


def test_artifact_for_another_model_names_the_field(http):
    body = _err(upload(http, "llama-shaped", peft_adapter(kind="llama")), 422)
    assert "adapter_config.token_dim" in body["error"] and "expected" in body["error"]  # the field, both values
    assert http.get("/prefixes/llama-shaped").status_code == 404


def _with_tensor(files: dict[str, bytes], fn) -> dict[str, bytes]:
    tensors = load(files["adapter_model.safetensors"])
    return {**files, "adapter_model.safetensors": save({k: fn(v).contiguous() for k, v in tensors.items()})}


def test_wrong_shapes_non_finite_and_pickle(http):
    files = peft_adapter()
    _err(upload(http, "bad", _with_tensor(files, lambda t: t[:, :7])), 422)
    nan = _with_tensor(files, lambda t: torch.where(torch.rand_like(t) < 0.1, torch.nan, t))
    _err(upload(http, "bad", nan), 422, "finite")
    cfg = json.loads(files["adapter_config.json"])
    _err(upload(http, "bad", {**files, "adapter_config.json": json.dumps({**cfg, "num_virtual_tokens": 9}).encode()}),
         422, "num_virtual_tokens")
    pickled = {"adapter_config.json": files["adapter_config.json"], "adapter_model.bin": b"\x80\x04K\x01."}
    _err(upload(http, "bad", pickled), 422, "pickle")
    _err(upload(http, "bad", {"adapter_config.json": b"{not json", "adapter_model.safetensors": b"x" * 20}), 422)
    _err(upload(http, "bad", {"notes.txt": b"hello"}), 422, "files")
    assert http.get("/prefixes/bad").status_code == 404


def test_malformed_multipart(http):
    h = {"content-type": "multipart/form-data; boundary=XYZ"}
    assert http.put("/prefixes/mp", content=b"--XYZ\r\ngarbage", headers=h).status_code in (400, 422)
    _err(http.put("/prefixes/mp", content=b"no boundary", headers={"content-type": "multipart/form-data"}), 400)
    _err(http.put("/prefixes/mp", json={"files": []}), 415)
    _err(http.put("/prefixes/mp", data={"other": "x"}, files=[("files", ("a.json", b"{}"))]), 422, "other")


def _raw_put(server, head: bytes, chunks, wait: float = 10) -> bytes:
    """Send a raw PUT and read the response as soon as the server answers (it may not read the whole body)."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        s.sendall(head)
        for chunk in chunks:
            try:
                s.sendall(chunk)
            except OSError:
                break
            s.setblocking(False)
            try:
                data = s.recv(65536)
                if data:
                    s.setblocking(True)
                    return data + read_until_closed(s, timeout=2)
            except BlockingIOError:
                pass
            finally:
                s.setblocking(True)
        s.settimeout(wait)
        return s.recv(65536) + read_until_closed(s, timeout=2)


def test_one_gigabyte_upload_refused_before_reading(server):
    head = (b"PUT /prefixes/huge HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\n"
            b"Content-Length: 1073741824\r\n\r\n")
    t0 = time.monotonic()
    reply = _raw_put(server, head, [b"--B\r\n"])
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert time.monotonic() - t0 < 5


def test_chunked_upload_over_the_limit_is_cut_off(server):
    head = (b"PUT /prefixes/huge HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    part = b"--B\r\nContent-Disposition: form-data; name=\"files\"; filename=\"adapter_model.safetensors\"\r\n\r\n"
    body = [b"%x\r\n%s\r\n" % (len(part), part)] + [b"10000\r\n" + b"\0" * 0x10000 + b"\r\n"] * 64  # 4 MiB
    reply = _raw_put(server, head, body)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"too_large" in reply


def test_overload_503_with_retry_after(model_dir, tmp_path):
    s = start_server(model_dir, tmp_path, max_batch_size=1, max_queue=1, max_seq_len=512)
    try:
        import concurrent.futures as cf

        body = {"inputs": "x", "parameters": {"max_new_tokens": 400}}
        with cf.ThreadPoolExecutor(8) as pool:
            rs = list(pool.map(lambda _: httpx.post(f"{s.url}/generate", json=body, timeout=120), range(8)))
        codes = sorted(r.status_code for r in rs)
        assert codes.count(200) >= 1 and 503 in codes, codes
        over = next(r for r in rs if r.status_code == 503)
        assert over.headers["Retry-After"] == "1" and over.json()["error_type"] == "overloaded"
        metrics = httpx.get(f"{s.url}/metrics").text
        assert 'prefixserve_request_errors_total{route="/generate",status="503",tenant=":anonymous"}' in metrics
    finally:
        stop_server(s)


def test_no_500_in_metrics(http):
    assert 'status="500"' not in http.get("/metrics").text
