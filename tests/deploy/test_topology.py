"""The production topology without containers: 2 real server processes behind nginx (Debian's package) running
the project's nginx config. Both replicas share one store: a disk directory (both read the same files), and
Redis when the Redis backend (issue 4) is installed."""
from __future__ import annotations

import importlib.util
import io
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import httpx
import pytest

from tests.api.conftest import (Server, free_port, model_dir, peft_adapter, start_server,  # noqa: F401 (fixture)
                                stop_server)
from tests.deploy.conftest import Nginx, nginx_binary, start_nginx

UPSTREAM = "X-Prefixserve-Upstream"
PROMPT = "name : Zizzi | Type : pub"
SETTINGS = dict(max_batch_size=8, max_seq_len=256, max_new_tokens_default=4)


def _redis_store(tmp_path_factory) -> Iterator[str]:
    if importlib.util.find_spec("prefix_store.redis") is None:
        pytest.skip("the Redis store (prefix_store/redis.py, issue 4) is not there yet")
    port = free_port()
    d = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(d)], stdout=subprocess.DEVNULL)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@dataclass
class Topology:
    """nginx in front of two replicas sharing one store; `restart(i)` brings replica i back on its old port."""

    nginx: Nginx
    servers: list[Server]
    restart: Callable[[int], None]


@pytest.fixture(scope="module", params=["disk", "redis"])
def topology(request, model_dir, tmp_path_factory) -> Iterator[Topology]:
    nginx_binary()  # skip (or fail in CI) before starting anything
    stores = _redis_store(tmp_path_factory) if request.param == "redis" else None
    store = next(stores) if stores else str(tmp_path_factory.mktemp("shared-store"))

    def start(i: int, port: int | None = None) -> Server:
        return start_server(model_dir, tmp_path_factory.mktemp(f"replica{i}"), port=port, store=store, **SETTINGS)

    servers = [start(i) for i in range(2)]

    def restart(i: int) -> None:
        servers[i] = start(i, int(servers[i].url.rsplit(":", 1)[1]))

    nginx = start_nginx(tmp_path_factory.mktemp("nginx"), [s.url.removeprefix("http://") for s in servers])
    yield Topology(nginx, servers, restart)
    nginx.stop()
    for s in servers:
        if s.proc.poll() is None:
            stop_server(s)
    if stores:
        stores.close()


def upload(url: str, name: str, seed: int = 0) -> httpx.Response:
    parts = [("files", (n, io.BytesIO(b), "application/octet-stream")) for n, b in peft_adapter(seed=seed).items()]
    return httpx.put(f"{url}/prefixes/{name}", files=parts, timeout=60)


def generate(url: str, task: str | None = None, **kw) -> httpx.Response:
    params = {"task": task} if task else {}
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4}}
    return httpx.post(f"{url}/generate", params=params, json=body, timeout=kw.get("timeout", 60))


def served(server: Server, task: str) -> float:
    """Finished generation requests for `task` in a replica's /metrics."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    pattern = rf'^prefixserve_requests_total\{{[^}}]*task="{re.escape(task)}"[^}}]*\}} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, text, re.M))


def test_requests_for_one_task_land_on_one_replica(topology):
    nginx, servers = topology.nginx, topology.servers
    routes: dict[str, set[str]] = {}
    for i in range(12):  # unknown tasks answer 404 from the replica they hash to: cheap and still routed
        for _ in range(3):
            r = generate(nginx.url, f"task-{i}")
            assert r.status_code == 404
            routes.setdefault(f"task-{i}", set()).add(r.headers[UPSTREAM])
    assert all(len(u) == 1 for u in routes.values()), routes
    assert len(set().union(*routes.values())) == 2, "12 tasks over 2 replicas use both"
    pinned = generate(nginx.url, "task-3@0123abcd")  # a pinned version routes with its task
    assert pinned.headers[UPSTREAM] in routes["task-3"]
    no_task = {generate(nginx.url).headers[UPSTREAM] for _ in range(6)}
    assert len(no_task) == 2, "requests without a task spread over the replicas"

    # a real task: the upload and every request for it go to the same replica, seen in that replica's metrics
    put = upload(nginx.url, "hot")
    assert put.status_code in (200, 201), put.text
    answers = [generate(nginx.url, "hot") for _ in range(4)]
    assert {a.status_code for a in answers} == {200}
    assert {a.headers[UPSTREAM] for a in answers} == {put.headers[UPSTREAM]}
    assert sorted(served(s, "hot") for s in servers) == [0, 4]


def test_an_upload_through_the_balancer_serves_from_both_replicas(topology):
    nginx, servers = topology.nginx, topology.servers
    put = upload(nginx.url, "everywhere", seed=3)
    assert put.status_code in (200, 201), put.text
    version = put.json()["version"]
    direct = [generate(s.url, "everywhere") for s in servers]  # around the balancer, on each replica
    assert [r.status_code for r in direct] == [200, 200]
    assert {r.headers["X-Prefix-Version"] for r in direct} == {version}
    assert direct[0].json() == direct[1].json()  # greedy, same model, same prefix
    replaced = upload(nginx.url, "everywhere", seed=4).json()["version"]
    # the other replica learns of the replacement from the store's change feed (Redis pub/sub, or the disk store's
    # 0.25 s poll): issue 4 asks for every replica within 1 s; 0.5 s more is slack for a loaded 2-core machine
    deadline, seen = time.monotonic() + 1.5, set()
    while time.monotonic() < deadline:
        seen = {generate(s.url, "everywhere").headers["X-Prefix-Version"] for s in servers}
        if seen == {replaced}:
            break
        time.sleep(0.05)
    assert seen == {replaced}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_stopping_a_replica_mid_load_loses_no_request(topology, sig):
    """SIGTERM: uvicorn drains in-flight requests and refuses new connections. SIGKILL (a crash, an OOM kill): the
    requests in flight on the victim lose their connection before any response header, and nginx retries them on
    the survivor (generation has no side effects); a stream that had started cannot be retried."""
    nginx, servers = topology.nginx, topology.servers
    for i in range(6):
        assert upload(nginx.url, f"load-{i}", seed=i).status_code in (200, 201)
    results: list[tuple[int, str]] = []
    lock = threading.Lock()
    stop_load = threading.Event()

    def worker(w: int) -> None:
        n = 0
        while not stop_load.is_set():
            try:
                r = generate(nginx.url, f"load-{(w + n) % 6}", timeout=30)
                item = (r.status_code, r.headers.get(UPSTREAM, ""))
            except httpx.HTTPError as e:
                item = (0, repr(e))
            with lock:
                results.append(item)
            n += 1

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    try:
        _wait_for(lambda: len(results) >= 20, 60)
        with lock:
            busiest = max((r[1] for r in results), key=[r[1] for r in results].count)
        victim = next(i for i, s in enumerate(servers) if s.url.removeprefix("http://") == busiest)
        survivor = servers[1 - victim]
        servers[victim].proc.send_signal(sig)
        assert servers[victim].proc.wait(30) in (0, -sig), servers[victim].log.read_text()[-3000:]
        after = len(results)
        _wait_for(lambda: len(results) >= after + 20, 60)
    finally:
        stop_load.set()
        for t in threads:
            t.join(60)
    failures = [r for r in results if r[0] != 200]
    assert not failures, failures[:5]
    survivor_addr = survivor.url.removeprefix("http://")
    assert all(u.split(", ")[-1] == survivor_addr for _, u in results[after + 4:]), "the rest keep serving"
    retried = [u for _, u in results if "," in u]  # nginx lists every upstream it tried
    print(f"{sig.name}: {len(results)} requests, {after} before the stop, {len(retried)} retried: {retried[:3]}")
    topology.restart(victim)  # the next test finds two replicas again
    time.sleep(5.5)  # nginx skips a failed replica for fail_timeout (5 s)


def _wait_for(cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
