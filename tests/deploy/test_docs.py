"""docs/deploying.md: the commands and files it names exist, and its example override
files (multi-GPU Compose, a production overlay) really work."""

from __future__ import annotations

import re
import shutil
import textwrap
from pathlib import Path

import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs/deploying.md"


def yaml_blocks() -> dict[str, str]:
    """Fenced ```yaml blocks, keyed by the file name in their first-line comment."""
    blocks = {}
    for match in re.finditer(r"^( *)```yaml\n(.*?)^\1```", DOC.read_text(), re.MULTILINE | re.DOTALL):
        body = textwrap.dedent(match[2])
        first = body.splitlines()[0]
        if first.startswith("# "):
            blocks[first[2:].split(":")[0].strip()] = body
    return blocks


def test_the_walkthrough_commands_are_there():
    text = DOC.read_text()
    for command in [
        "docker compose up -d",
        "docker compose -f docker-compose.yml -f docker-compose.cpu.yml up -d",
        "kubectl apply -k k8s/overlays/gpu",
        "kubectl apply -k k8s/overlays/cpu",
    ]:
        assert command in text, command


def test_named_files_exist():
    text = DOC.read_text()
    paths = set(re.findall(r"\b(docker-compose(?:\.cpu)?\.yml|docker/\w+\.Dockerfile|k8s/[\w./-]*\w)", text))
    paths -= {p for p in paths if "overlays/production" in p}  # the example to create
    assert paths
    for path in sorted(paths):
        assert (ROOT / path).exists(), f"docs/deploying.md names {path}, which does not exist"


def test_multi_gpu_compose_example(compose_config, tmp_path):
    override = tmp_path / "docker-compose.gpus.yml"
    override.write_text(yaml_blocks()["docker-compose.gpus.yml"])
    shutil.copy(ROOT / "docker-compose.yml", tmp_path)  # `extends: {file: ...}` is relative to the override
    proc = compose_config([ROOT / "docker-compose.yml", override], tmp_path)
    assert proc.returncode == 0, proc.stderr
    services = yaml.safe_load(proc.stdout)["services"]
    gpus = {}
    for name in ("worker", "worker-1"):
        svc = services[name]
        assert svc["command"][:2] == ["felis", "worker"]
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert "count" not in device
        gpus[name] = device["device_ids"]
    assert gpus == {"worker": ["0"], "worker-1": ["1"]}


def test_production_overlay_example(kustomize, tmp_path):
    k8s = tmp_path / "k8s"
    shutil.copytree(ROOT / "k8s", k8s)
    overlay = k8s / "overlays/production"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml_blocks()["k8s/overlays/production/kustomization.yaml"])
    proc = kustomize(overlay)
    assert proc.returncode == 0, proc.stderr
    objects = [o for o in yaml.safe_load_all(proc.stdout) if o]
    assert not [o for o in objects if o["kind"] == "Secret"]
    worker = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "felis-worker")
    assert worker["spec"]["replicas"] == 4
    pvc = next(o for o in objects if o["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["storageClassName"] == "efs-sc"
    for obj in objects:
        kubernetes_validate.validate(obj, "1.31.0", strict=True)
