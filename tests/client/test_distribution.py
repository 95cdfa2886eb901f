"""felis_client as its own distribution: the wheel of ./felis_client, installed into a fresh venv
(no system site packages, nothing of the server), gives a working ``felis-client`` command and
the Python client, and pulls in httpx and tqdm but not torch, FastAPI or Celery.

Needs a package index for httpx and tqdm (and setuptools for the isolated build). Where pip
cannot reach one, the test is skipped with that reason; any other failure fails it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ASSETS, ROOT

CLIENT_DIR = ROOT / "felis_client"
HEAVY = ("torch", "torchvision", "fastapi", "celery", "uvicorn", "sqlalchemy", "onnxruntime", "numpy")
SERVER_PACKAGES = ("service", "worker", "models")

pytestmark = pytest.mark.timeout(600)


def _run(args: list, *, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs)


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without this venv's traces or any felis settings: nothing may leak in."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("FELIS_")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith(str(Path(sys.prefix))))
    env.update(extra)
    return env


@dataclass(frozen=True)
class ClientVenv:
    path: Path
    wheel: Path

    def bin(self, name: str) -> Path:
        return self.path / "bin" / name


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> ClientVenv:
    """A fresh venv with the felis-client wheel installed (from PyPI: only its dependencies)."""
    tmp = tmp_path_factory.mktemp("felis-client-dist")
    env = _clean_env()
    venv = tmp / "venv"
    # python -m venv from this venv's interpreter makes a venv of the base Python, without site packages
    r = _run([sys.executable, "-m", "venv", venv], env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    pip = [venv / "bin" / "python", "-m", "pip", "--disable-pip-version-check", "--no-input"]

    # Can pip reach an index at all? httpx is the client's main dependency.
    r = _run([*pip, "install", "--timeout", "30", "--retries", "1", "httpx>=0.27"], env=env, cwd=tmp)
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-3:])
        pytest.skip(f"pip cannot install httpx from a package index here (offline?), so the felis-client wheel "
                    f"cannot be installed in a fresh venv:\n{tail}")

    # Build from a copy, so that the build leaves nothing (build/, *.egg-info) in the source tree.
    src = tmp / "src" / "felis_client"
    shutil.copytree(CLIENT_DIR, src, ignore=shutil.ignore_patterns("__pycache__", "build", "dist", "*.egg-info"))
    r = _run([*pip, "wheel", "--no-deps", src, "-w", tmp / "wheels"], env=env, cwd=tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = (tmp / "wheels").glob("felis_client-*.whl")
    r = _run([*pip, "install", wheel], env=env, cwd=tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    return ClientVenv(venv, wheel)


def test_the_wheel_holds_the_package_modules_and_nothing_else(client_venv):
    with zipfile.ZipFile(client_venv.wheel) as whl:
        names = whl.namelist()
        meta = whl.read("felis_client-0.1.0.dist-info/METADATA").decode()
        entry_points = whl.read("felis_client-0.1.0.dist-info/entry_points.txt").decode()
    files = sorted(n for n in names if not n.startswith("felis_client-0.1.0.dist-info/"))
    assert files == sorted(f"felis_client/{p.name}" for p in CLIENT_DIR.glob("*.py")), files
    assert "Name: felis-client" in meta and "Version: 0.1.0" in meta
    requires = sorted(re.split(r"[\s<>=!~;\[]", line.split(":", 1)[1].strip())[0].lower()
                      for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line)
    assert requires == ["httpx", "tqdm"], meta
    extras = [line for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" in line]
    assert len(extras) == 1 and "azure-cognitiveservices-vision-customvision" in extras[0] and "customvision" in extras[0], meta
    assert re.search(r"^felis-client\s*=\s*felis_client\.cli:main$", entry_points, re.M), entry_points


def test_no_torch_fastapi_or_celery_in_the_client_venv(client_venv, tmp_path):
    python = client_venv.bin("python")
    r = _run([python, "-m", "pip", "list", "--format", "json"], env=_clean_env(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    installed = {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(r.stdout)}
    assert installed.get("felis-client") == "0.1.0" and "httpx" in installed and "tqdm" in installed
    assert not [name for name in HEAVY if name in installed], sorted(installed)
    assert "felis" not in installed, "the server distribution stays out"

    probe = ("import importlib.util, json, felis_client, felis_client.cli; "
             f"print(json.dumps({{'file': felis_client.__file__, 'found': [m for m in {HEAVY + SERVER_PACKAGES!r} "
             "if importlib.util.find_spec(m)]}))")
    r = _run([python, "-c", probe], env=_clean_env(), cwd=tmp_path)  # cwd: not the repository
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    assert found["found"] == [], f"importable in the client venv: {found['found']}"
    assert Path(found["file"]).is_relative_to(client_venv.path), f"felis_client came from {found['file']}"


def test_felis_client_command_against_a_live_felis(client_venv, felis_url, tmp_path):
    exe = client_venv.bin("felis-client")
    env = _clean_env(FELIS_CONFIG=str(tmp_path / "absent.toml"), HOME=str(tmp_path))

    def cli(*argv: str) -> tuple[int, str, str]:
        r = _run([exe, *argv], env=env, cwd=tmp_path, timeout=120)
        return r.returncode, r.stdout, r.stderr

    code, out, _ = cli("--help")
    assert code == 0 and out.startswith("usage: felis-client")
    for command in ("datasets", "create", "upload", "train", "models", "promote", "predict"):
        assert command in out

    assert cli("create", "distpets", "--url", felis_url)[:2] == (0, "created dataset distpets\n")
    code, _, err = cli("create", "distpets", "--url", felis_url)
    assert code == 1 and err.startswith("felis-client create:") and "dataset_exists" in err

    cats = sorted((ASSETS / "cifar-cat" / "train" / "cat").glob("*.jpg"))[:3]
    noncats = sorted((ASSETS / "cifar-cat" / "train" / "noncat").glob("*.jpg"))[:2]
    env["FELIS_URL"] = felis_url  # the environment gives the server as well as --url
    code, out, err = cli("upload", "distpets", *map(str, cats), "--label", "cat")
    assert code == 0, err
    assert "3 created, 0 duplicates, 0 rejected" in out and "uploading: 100%" in err
    code, out, err = cli("upload", "distpets", *map(str, noncats), "--label", "noncat")
    assert code == 0 and "2 created" in out, err

    code, out, err = cli("datasets")
    assert code == 0, err
    line = next(l for l in out.splitlines() if l.startswith("distpets"))
    assert "5" in line.split() and "cat 3" in line and "noncat 2" in line

    code, out, err = cli("models", "distpets")
    assert (code, out) == (0, "no model versions yet: felis-client train distpets --wait\n"), err
