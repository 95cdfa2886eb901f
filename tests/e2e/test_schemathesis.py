"""Hostile input at scale: schemathesis generates requests for every operation in the OpenAPI spec
(multipart bodies included) against a real felis with a trained model: no 5xx, and every response
has a documented status, content type and schema. Run through its CLI, one pass with random
names and one aimed at the real dataset and version."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import ASSETS, zip_folder
from tests.utils.processes import start_felis, wait_training

pytestmark = pytest.mark.timeout(900)

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("schemathesis")
    proc, base = start_felis("up", tmp)
    try:
        with httpx.Client(base_url=base, timeout=60) as c:
            c.post("/v1/datasets", json={"name": "pets"})
            c.post("/v1/datasets/pets/images",
                   files={"archive": ("s.zip", zip_folder(ASSETS / "cifar-cat" / "train"), "application/zip")})
            tid = c.post("/v1/datasets/pets/trainings", json={"architecture": "simple_cnn", "epochs": 2}).json()["id"]
            assert wait_training(c, tid)["status"] == "succeeded"
        yield base
    finally:
        proc.stop()


def _schemathesis(base_url: str, *args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("schemathesis")
    return subprocess.run([str(exe), *args[:2], "run", f"{base_url}/openapi.json", "--checks", CHECKS,
                           "--seed", "7", *args[2:]], capture_output=True, text=True, timeout=600)


def test_random_requests_get_documented_answers(base_url):
    out = _schemathesis(base_url, "--config-file", "/dev/null", "--max-examples", "30")
    assert out.returncode == 0, out.stdout[-6000:]


def test_requests_aimed_at_the_real_dataset_and_version(base_url, tmp_path):
    config = tmp_path / "schemathesis.toml"
    config.write_text('[parameters]\n"path.name" = "pets"\n"path.version" = 1\n')
    out = _schemathesis(base_url, "--config-file", str(config), "--max-examples", "30", "--exclude-method", "DELETE")
    assert out.returncode == 0, out.stdout[-6000:]
    with httpx.Client(base_url=base_url) as c:  # and the service still works afterwards
        img = sorted((ASSETS / "cifar-cat" / "test" / "cat").iterdir())[0]
        r = c.post("/v1/datasets/pets/predict", files={"files": (img.name, img.read_bytes())})
        assert r.status_code == 200, r.text
