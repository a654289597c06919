"""Fixtures for the store tests: both backends, unique Redis namespaces, and Redis servers the tests own."""
from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from typing import Iterator

import pytest
import redis
import torch

from prefix_store.artifact import PrefixArtifact, build_artifact
from prefix_store.backend import open_backend

SHARED_REDIS = os.environ.get("PREFIXSERVE_TEST_REDIS", "redis://127.0.0.1:6379/0")
FP = {"num_layers": 1, "num_kv_heads": 1, "head_dim": 2}


def art(seed: int, prefix_len: int = 3, description: str = "") -> PrefixArtifact:
    """A tiny random artifact [1, 2, 1, P, 2], different per seed."""
    kv = torch.randn(1, 2, 1, prefix_len, 2, generator=torch.Generator().manual_seed(seed))
    return build_artifact(kv, FP, description=description)


def tensors(a: PrefixArtifact) -> bytes:
    """The safetensors bytes of an artifact."""
    return a.to_bytes()[1]


def drop_namespace(url: str, prefix: str) -> None:
    """Delete every key of a test namespace (SCAN, never KEYS)."""
    r = redis.Redis.from_url(url, socket_timeout=5)
    try:
        keys = list(r.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            r.delete(*keys[i:i + 500])
    finally:
        r.close()


@pytest.fixture
def namespace() -> Iterator[str]:
    """A Redis key prefix unique to this test, removed afterwards."""
    ns = f"pstest-{uuid.uuid4().hex[:10]}"
    yield ns
    drop_namespace(SHARED_REDIS, ns)


@pytest.fixture(params=["disk", "redis"])
def backend(request, tmp_path, namespace) -> str:
    """A store URL for each backend, with `keep_versions=3`."""
    if request.param == "disk":
        return f"file://{tmp_path / 'store'}?keep_versions=3&poll=0.05"
    return f"{SHARED_REDIS}?prefix={namespace}&keep_versions=3"


@pytest.fixture
async def stores(backend):
    """Each backend, open: its prefix, key and counter stores."""
    b = open_backend(backend)
    yield b
    await b.close()


@pytest.fixture
def store(stores):
    """The prefix store of each backend."""
    return stores.prefixes


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server this test owns (no persistence), startable and killable."""

    def __init__(self, *args: str):
        self.port, self.args, self.proc = free_port(), args, None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no", "--daemonize", "no", *self.args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None


@pytest.fixture
def redis_server() -> Iterator[callable]:
    """Factory: `redis_server(*extra_args)` starts a private Redis; every one is killed at teardown."""
    servers: list[RedisServer] = []

    def make(*args: str) -> RedisServer:
        servers.append(RedisServer(*args).start())
        return servers[-1]

    yield make
    for s in servers:
        s.kill()
