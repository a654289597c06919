"""What the deploy files promise, read from the files: image, compose topology, probes, drain, autoscaling."""
from __future__ import annotations

import re

import yaml

from tests.deploy.conftest import DEPLOY, NGINX_DIR, ROOT

K8S_BASE = DEPLOY / "k8s" / "base"


def test_dockerfile_shape():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER 10001", text, re.M), "runs as a non-root user"
    assert "ARG TORCH_VARIANT=cpu" in text and "/whl/${TORCH_VARIANT}" in text, "CPU default, CUDA by build arg"
    assert "HEALTHCHECK" in text and "/health" in text
    assert 'VOLUME ["/var/cache/prefixserve", "/var/lib/prefixserve/store"]' in text
    assert "ARG BAKE_MODEL=embedded" in text
    assert text.index("COPY pyproject.toml") < text.index("COPY server"), "dependencies before code"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "tests", "**/.git"} <= set(ignored)


def test_compose_topology():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    servers = [n for n in services if n.startswith("server-")]
    assert len(servers) >= 2
    for name in servers:
        assert services[name]["environment"]["PREFIXSERVE_STORE"] == "redis://redis:6379/0"
        assert f"server {name}:8000" in (NGINX_DIR / "upstreams.conf").read_text()
    assert "--appendonly" in services["redis"]["command"] and "redis-data:/data" in services["redis"]["volumes"]
    assert "./nginx/nginx.conf:/etc/nginx/nginx.conf:ro" in services["nginx"]["volumes"]


def test_nginx_routes_by_task_and_retries():
    conf = (NGINX_DIR / "nginx.conf").read_text()
    assert "hash $prefixserve_route_key consistent;" in conf and "$arg_task" in conf
    assert "proxy_next_upstream error timeout http_503 non_idempotent;" in conf
    assert "proxy_buffering off;" in conf


def _deployment() -> dict:
    return yaml.safe_load((K8S_BASE / "deployment.yaml").read_text())


def test_k8s_probes_and_graceful_termination():
    spec = _deployment()["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    config = yaml.safe_load((K8S_BASE / "configmap.yaml").read_text())["data"]
    drain = float(config["PREFIXSERVE_SHUTDOWN_TIMEOUT"])
    assert pre_stop + drain < spec["terminationGracePeriodSeconds"], "the drain ends before the kill"
    assert spec["securityContext"]["runAsNonRoot"] is True


def test_hpa_scales_on_a_metric_the_server_exports():
    hpa = yaml.safe_load((K8S_BASE / "hpa.yaml").read_text())
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric == "prefixserve_queue_depth"
    assert f'"{metric}"' in (ROOT / "server" / "api" / "metrics.py").read_text()
    assert hpa["spec"]["minReplicas"] >= 2
    pdb = yaml.safe_load((K8S_BASE / "pdb.yaml").read_text())
    assert pdb["spec"]["maxUnavailable"] == 1
