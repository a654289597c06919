"""The Grafana dashboard (deploy/grafana) against a real server: every query names metrics that /metrics exports
(scraped after real traffic), and a real Prometheus (Debian's package) scraping that server evaluates every query
without error. Also the compose file's Prometheus and Grafana, provisioned with the dashboard."""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import yaml

from tests.api.conftest import free_port, model_dir, native_files, server, upload, wait_until_up  # noqa: F401
from tests.deploy.conftest import DEPLOY, require_tool

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "prefixserve.json"
METRIC = re.compile(r"\bprefixserve_[a-z0-9_]+\b")
SELECTOR_LABELS = re.compile(r"(prefixserve_[a-z0-9_]+)\{([^}]*)\}")
BY = re.compile(r"\bby \(([^)]*)\)")


def queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every target of every panel."""
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def exported(text: str) -> dict[str, set[str]]:
    """Every series name /metrics exports (histograms' _bucket/_sum/_count too), with the label names it has."""
    names: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            for suffix in ("_bucket", "_sum", "_count") if kind == "histogram" else ("",):
                names.setdefault(name + suffix, set())
        elif line and not line.startswith("#"):
            m = re.match(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s", line)
            names.setdefault(m.group(1), set()).update(re.findall(r'(\w+)="', m.group(2) or ""))
    return names


@pytest.fixture(scope="module")
def scraped(server) -> tuple[str, str]:  # noqa: F811 (fixture)
    """The server after traffic touching every panel (a cold load, cache hits, an error); its /metrics text."""
    from basemodel.model import load_model

    with server.client() as c:
        base = load_model(str(server.proc.args[server.proc.args.index("--model") + 1])).spec.fingerprint()
        assert upload(c, "dash", native_files(base, 7)).status_code in (200, 201)
        for _ in range(3):
            assert c.post("/generate?task=dash", json={"inputs": "hi", "parameters": {"max_new_tokens": 3}}).is_success
        assert c.post("/generate?task=absent", json={"inputs": "hi"}).status_code == 404
        return server.url, c.get("/metrics").text


def test_every_query_names_exported_metrics(scraped):
    _, text = scraped
    series = exported(text)
    found = queries()
    assert len(found) >= 15, found
    for title, expr in found:
        names = METRIC.findall(expr)
        assert names, (title, expr)
        for name in names:
            assert name in series, f"{title}: {name} is not exported by /metrics"
        if not all(series[n] for n in names):
            continue  # a family with no series yet (nothing queued, say) shows no label names to check against
        labels = set().union(*(series[n] for n in names)) | {"le", "instance", "job"}
        for name, selector in SELECTOR_LABELS.findall(expr):
            for label in re.findall(r"(\w+)\s*[!=]~?", selector):
                assert label in series[name], f"{title}: {name} has no label {label}"
        for group in BY.findall(expr):
            for label in (g.strip() for g in group.split(",")):
                assert label in labels, f"{title}: no metric of {expr!r} has the label {label}"


@pytest.fixture(scope="module")
def prometheus(scraped, tmp_path_factory) -> Iterator[str]:
    """Debian's Prometheus scraping the test server every second; its URL."""
    binary = require_tool("prometheus", "apt-get install prometheus (done by .ci/run)")
    url, _ = scraped
    work = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())  # the shipped job, retargeted
    config["global"]["scrape_interval"] = "1s"
    config["scrape_configs"][0]["static_configs"] = [{"targets": [url.removeprefix("http://")]}]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = work / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=out, stderr=subprocess.STDOUT)
    prom = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(proc, f"{prom}/-/ready", log, "prometheus", timeout=60)
        deadline = time.monotonic() + 60  # a few scrapes, so that rate() has two samples
        while time.monotonic() < deadline:
            r = httpx.get(f"{prom}/api/v1/query", params={"query": "count_over_time(up[1m])"}).json()
            if r["data"]["result"] and float(r["data"]["result"][0]["value"][1]) >= 4:
                break
            time.sleep(0.5)
        yield prom
    finally:
        proc.terminate()
        proc.wait(30)


def test_prometheus_evaluates_every_query(prometheus, scraped):
    url, _ = scraped
    with httpx.Client(base_url=url) as c:  # traffic inside the rate() windows Prometheus now has samples of
        for _ in range(3):
            assert c.post("/generate?task=dash", json={"inputs": "hi", "parameters": {"max_new_tokens": 3}}).is_success
    time.sleep(2.5)
    empty = []
    for title, expr in queries():
        r = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=30).json()
        assert r["status"] == "success", (title, expr, r)
        if not r["data"]["result"] and "prefixserve_tenant_queue_depth" not in expr:  # 0 or absent: nothing waits
            empty.append(title)
    # store errors and engine-side failures (timeouts, cancellations) need a failing store or a failed row
    assert set(empty) <= {"Prefix store errors", "Refused or failed requests"}, empty


def test_compose_runs_prometheus_and_grafana_provisioned_with_the_dashboard():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    servers = sorted(n for n in services if n.startswith("server-"))
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"{n}:8000" for n in servers]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    grafana = services["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"] if v.startswith("./"))
    assert mounts == {"./grafana/provisioning": "/etc/grafana/provisioning",
                      "./grafana/dashboards": "/var/lib/grafana/dashboards"}
    source = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"][0]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/prefixserve.yaml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    dash = json.loads(DASHBOARD.read_text())
    uids = {t["datasource"]["uid"] for p in dash["panels"] for t in p["targets"]} | {
        p["datasource"]["uid"] for p in dash["panels"]}
    assert uids == {source["uid"]}
    promtool = require_tool("promtool", "apt-get install prometheus (done by .ci/run)")
    check = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
