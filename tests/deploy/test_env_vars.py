"""Every FELIS_* variable the deployment files name is a real setting, and every value they
give parses: a typo (FELIS_DEVCE) or a bad value would otherwise be silently ignored or
crash the pod at start."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.deploy.conftest import settings_from

ROOT = Path(__file__).resolve().parents[2]
NAME = re.compile(r"\bFELIS_[A-Z0-9_]+\b")
NOT_SETTINGS = {"FELIS_DATASETS"}  # the test suite's own variable, never in these files anyway


def deployment_files() -> list[Path]:
    files = [ROOT / ".dockerignore", *ROOT.glob("docker-compose*.yml"), *ROOT.glob("docker/*"),
             *ROOT.glob("k8s/**/*"), ROOT / "docs/deploying.md"]
    return sorted(f for f in files if f.is_file())


@pytest.mark.parametrize("path", deployment_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_named_variable_is_a_setting(path, settings_env_names):
    named = set(NAME.findall(path.read_text())) - NOT_SETTINGS
    unknown = named - settings_env_names
    assert not unknown, f"{path.relative_to(ROOT)} names variables service/config.py does not read: {unknown}"


def _exposed_safely(settings, service: str) -> None:
    """The API listens on every interface with keys; the worker's metrics can be scraped."""
    from service.config import bind_refusal

    assert settings.api_keys_required is True
    if service == "api":
        assert bind_refusal(settings, settings.host) is None
    else:
        assert settings.worker_metrics_host == "0.0.0.0", "Prometheus scrapes the worker from outside"


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
@pytest.mark.parametrize("service", ["api", "worker"])
def test_compose_values_parse(compose, variant, service, monkeypatch):
    env = compose[variant]["services"][service]["environment"]
    settings = settings_from(env, monkeypatch)
    assert settings.mode == "production"
    assert settings.api_keys_required is True
    assert settings.storage_path == Path("/data/blobs")
    _exposed_safely(settings, service)


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
@pytest.mark.parametrize(("workload", "name"), [("felis-api", "api"), ("felis-worker", "worker")])
def test_kubernetes_values_parse(rendered, overlay, workload, name, monkeypatch):
    objects = rendered[overlay]
    deployment = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == workload)
    c = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        kind, ref = ("ConfigMap", source["configMapRef"]) if "configMapRef" in source else ("Secret", source["secretRef"])
        obj = next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == ref["name"])
        env |= obj.get("data", {}) | obj.get("stringData", {})
    for var in c.get("env", []):
        # resourceFieldRef limits.cpu arrives as a whole number of cores
        env[var["name"]] = var["value"] if "value" in var else "2"
    settings = settings_from(env, monkeypatch)
    assert settings.mode == "production"
    assert settings.database_url.startswith("postgresql+psycopg://")
    assert settings.broker_url.startswith("redis://")
    _exposed_safely(settings, name)
