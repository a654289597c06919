"""Fixtures that start the real server (`prefixserve serve` in a subprocess) on a tiny random model."""
from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest

from tests.tiny import gpt2_tokenizer, save_tiny_model_dir

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@dataclass
class Server:
    """A running server process."""

    url: str
    proc: subprocess.Popen
    store: Path
    log: Path

    def client(self, **kw) -> httpx.Client:
        """An httpx client on the server."""
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 60), **kw)


def error_of(r: httpx.Response) -> tuple[str, str]:
    """(message, error_type) of an error response in either shape: TGI's `{"error", "error_type"}` or, on /v1/*,
    OpenAI's `{"error": {"message", "type", "param", "code"}}` (whose `code` is our error_type)."""
    body = r.json()
    if isinstance(body.get("error"), dict):
        assert r.request.url.path.startswith("/v1/"), body  # OpenAI's shape on the OpenAI routes only
        return body["error"]["message"], body["error"]["code"]
    assert not r.request.url.path.startswith("/v1/"), body
    return body["error"], body["error_type"]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_until_closed(s: socket.socket, timeout: float | None = None) -> bytes:
    """Everything a raw socket receives until the server closes it (or stops sending for the socket's timeout,
    replaced by `timeout` when given)."""
    if timeout is not None:
        s.settimeout(timeout)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except OSError:
        pass
    return out


def start_server(model_dir: Path, workdir: Path, port: int | None = None, module: str = "prefixserve.cli",
                 **settings) -> Server:
    """Run `prefixserve serve` (on `port`, default a free one) and wait for /ready (raises with the log on failure).
    `module`: what `python -m` runs (a test's own entry point that wraps server.cli's main)."""
    port = port or free_port()
    store = workdir / "store"
    log = workdir / "server.log"
    args = [sys.executable, "-m", module, "serve", "--model", str(model_dir), "--store", str(store),
            "--host", "127.0.0.1", "--port", str(port), "--shutdown-timeout", "5"]
    for k, v in settings.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=Path(__file__).resolve().parents[2])
    url = f"http://127.0.0.1:{port}"
    wait_until_up(proc, f"{url}/ready", log, "server", timeout=180)
    return Server(url, proc, store, log)


def wait_until_up(proc: subprocess.Popen, url: str, log: Path, what: str, timeout: float,
                  ok: Callable[[httpx.Response], bool] = lambda r: r.status_code == 200) -> None:
    """Poll `url` until `ok(response)`; raise with the process's log if it exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            if ok(httpx.get(url, timeout=2)):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{what} not ready in time:\n{log.read_text()[-4000:]}")


def stop_server(server: Server, timeout: float = 30) -> int:
    """SIGTERM, then wait; the exit code (kills and fails loudly if shutdown hangs)."""
    server.proc.send_signal(signal.SIGTERM)
    try:
        return server.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        raise AssertionError(f"server did not stop within {timeout} s:\n{server.log.read_text()[-4000:]}")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random GPT-2 with GPT-2's real tokenizer and a toy chat template."""
    path = save_tiny_model_dir("gpt2", tmp_path_factory.mktemp("model") / "tiny-gpt2", seed=0)
    tok = gpt2_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def server(model_dir, tmp_path_factory) -> Iterator[Server]:
    """The shared server: batch 16, small upload limit so size tests stay cheap."""
    s = start_server(model_dir, tmp_path_factory.mktemp("server"), max_batch_size=16, max_seq_len=512,
                     max_upload_bytes=512 * 1024, max_new_tokens_default=8)
    yield s
    assert stop_server(s) in (0, -signal.SIGTERM), s.log.read_text()[-4000:]
    assert "Application shutdown complete" in s.log.read_text()


@pytest.fixture()
def http(server) -> Iterator[httpx.Client]:
    """An httpx client on the shared server."""
    with server.client() as c:
        yield c


def peft_adapter(kind: str = "gpt2", tokens: int = 4, seed: int = 0, prompt_tuning: bool = False,
                 **model_over) -> dict[str, bytes]:
    """A PEFT prefix-tuning (or prompt-tuning) adapter for the tiny model, as {file name: bytes}."""
    import torch
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    from tests.tiny import tiny_model

    cfg = (PromptTuningConfig if prompt_tuning else PrefixTuningConfig)(task_type="CAUSAL_LM",
                                                                      num_virtual_tokens=tokens)
    model = get_peft_model(tiny_model(kind, **model_over), cfg)
    torch.manual_seed(seed)  # after tiny_model(), which seeds its own weights
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.normal_(0, 1)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return {n: (Path(d) / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}


def upload(client: httpx.Client, name: str, files: dict[str, bytes]) -> httpx.Response:
    """PUT /prefixes/NAME with the files as multipart parts named `files`."""
    parts = [("files", (n, io.BytesIO(data), "application/octet-stream")) for n, data in files.items()]
    return client.put(f"/prefixes/{name}", files=parts)


def native_files(base_model: dict, seed: int, tokens: int = 4) -> dict[str, bytes]:
    """A native artifact (manifest.json + prefix.safetensors) of random KV for the model `base_model` describes;
    far cheaper than a PEFT adapter when a test needs many distinct versions."""
    import torch

    from prefix_store.artifact import build_artifact

    shape = (base_model["num_layers"], 2, base_model["num_kv_heads"], tokens, base_model["head_dim"])
    kv = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))  # [layers, 2, kv_heads, P, head_dim]
    manifest, tensors = build_artifact(kv, base_model).to_bytes()
    return {"manifest.json": manifest, "prefix.safetensors": tensors}
