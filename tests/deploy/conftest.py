"""Helpers for the deploy tests: external tools (skipped locally, required in CI) and nginx with the project's
config (deploy/nginx/nginx.conf verbatim but for its listen port; upstreams.conf templated with real ports)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import free_port, wait_until_up

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
NGINX_DIR = DEPLOY / "nginx"
SHIPPED_LISTEN = "listen 8080;"


def require_tool(name: str, hint: str) -> str:
    """The path of an external tool; a missing one skips locally and fails in CI (CI=true), naming the fix.

    Tools installed by pip into the test environment are looked up next to the running interpreter too, since
    `make test` runs the venv's python without activating the venv.
    """
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        message = f"{name} not found: {hint}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def nginx_binary() -> str:
    """nginx from Debian's package (.ci/run installs it)."""
    return require_tool("nginx", "apt-get install nginx (done by .ci/run)")


def render_nginx(workdir: Path, upstreams: list[str], port: int) -> Path:
    """Copy the shipped nginx.conf (listen port changed) and write upstreams.conf in the shipped format."""
    workdir.mkdir(parents=True, exist_ok=True)
    conf = (NGINX_DIR / "nginx.conf").read_text()
    assert conf.count(SHIPPED_LISTEN) == 1, "the test rewrites exactly one listen line"
    (workdir / "nginx.conf").write_text(conf.replace(SHIPPED_LISTEN, f"listen 127.0.0.1:{port};"))
    shipped = [ln for ln in (NGINX_DIR / "upstreams.conf").read_text().splitlines() if ln.startswith("server ")]
    options = shipped[0].split(None, 2)[2]  # e.g. "max_fails=1 fail_timeout=5s;"
    (workdir / "upstreams.conf").write_text("".join(f"server {u} {options}\n" for u in upstreams))
    return workdir / "nginx.conf"


def nginx_args(conf: Path, *extra: str) -> list[str]:
    """nginx command line for a rendered config in its own prefix directory."""
    d = conf.parent
    return [nginx_binary(), "-p", f"{d}/", "-c", str(conf), "-g", f"pid {d}/nginx.pid; daemon off;", *extra]


@dataclass
class Nginx:
    """A running nginx."""

    url: str
    proc: subprocess.Popen
    log: Path

    def stop(self) -> None:
        """Fast shutdown (SIGTERM), then wait."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def start_nginx(workdir: Path, upstreams: list[str]) -> Nginx:
    """Start nginx in front of `upstreams` (host:port) and wait until it accepts connections."""
    port = free_port()
    conf = render_nginx(workdir, upstreams, port)
    log = workdir / "nginx.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(nginx_args(conf), stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(proc, f"{url}/health", log, "nginx", timeout=15, ok=lambda r: True)  # any answer: it listens
    return Nginx(url, proc, log)
