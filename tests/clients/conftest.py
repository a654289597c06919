"""Fixtures for the client tests: one real server on a tiny random GPT-2, adapters on disk, a scripted server."""
from __future__ import annotations

import importlib.util
import os
import signal
import warnings
from pathlib import Path
from typing import Iterator

import pytest

if importlib.util.find_spec("prefixserve_client") is None:
    if os.environ.get("CI"):
        raise ImportError("prefixserve_client is not installed: pip install -e clients/python (make test does)")
    warnings.warn("tests/clients skipped: pip install -e clients/python", stacklevel=1)
    collect_ignore_glob = ["test_*.py"]

from tests.api.conftest import Server, model_dir, peft_adapter, start_server, stop_server  # noqa: F401 (fixture)
from tests.clients.fake_server import FakeServer


@pytest.fixture(scope="session")
def live(model_dir, tmp_path_factory) -> Iterator[Server]:
    """The real server the client tests talk to."""
    s = start_server(model_dir, tmp_path_factory.mktemp("client-server"), max_batch_size=8,
                     max_seq_len=256, max_new_tokens_default=8)
    yield s
    assert stop_server(s) in (0, -signal.SIGTERM), s.log.read_text()[-4000:]


def write_adapter(directory: Path, seed: int = 0, prompt_tuning: bool = False) -> Path:
    """A PEFT adapter directory (adapter_config.json + adapter_model.safetensors) for the tiny model."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in peft_adapter("gpt2", tokens=4, seed=seed, prompt_tuning=prompt_tuning).items():
        (directory / name).write_bytes(data)
    return directory


@pytest.fixture(scope="session")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """Two PEFT prefix-tuning adapters that differ (seed 0 and 1)."""
    root = tmp_path_factory.mktemp("adapters")
    return {"a": write_adapter(root / "a", seed=0), "b": write_adapter(root / "b", seed=1)}


@pytest.fixture()
def fake() -> Iterator[FakeServer]:
    """A scripted HTTP server (stdlib) for retry and header tests."""
    with FakeServer() as server:
        yield server
