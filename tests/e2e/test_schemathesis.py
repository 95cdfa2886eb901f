"""Hostile input at scale: schemathesis generates requests for every operation in the OpenAPI spec
(multipart bodies included) against a real felis with API keys required and a trained model: no
5xx, every response has a documented status, content type and schema, and no operation answers
2xx to a key that lacks the scope the contract gives it (nor 403 insufficient_scope to one that
has it). Run through its CLI: one pass with random names, then one per scope aimed at the real
dataset and version."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from service.domain.keys import SCOPES, granted
from tests.conftest import ASSETS, zip_folder
from tests.service.api.test_routes_declare_scopes import CONTRACT
from tests.utils.processes import start_felis, wait_training

pytestmark = pytest.mark.timeout(900)

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
          "scope_enforced")
EXAMPLES = "8"  # per operation and run: five runs stay within a couple of minutes on two cores

# The custom check, loaded by schemathesis from SCHEMATHESIS_HOOKS; the contract and the key's
# scopes come in the environment.
HOOKS = '''
import json
import os

import schemathesis

REQUIRED = json.loads(os.environ["SCOPE_CHECK_CONTRACT"])  # "METHOD /path/{template}" -> scope
GRANTED = set(json.loads(os.environ["SCOPE_CHECK_GRANTED"]))


@schemathesis.check
def scope_enforced(ctx, response, case):
    """No 2xx without the operation's scope; no insufficient_scope with it."""
    operation = f"{case.operation.method.upper()} {case.operation.path}"
    needed = REQUIRED.get(operation)
    if needed is None:
        return None
    if 200 <= response.status_code < 300 and needed not in GRANTED:
        raise AssertionError(f"{operation} answered {response.status_code} to a key without the {needed!r} scope")
    if response.status_code == 403 and needed in GRANTED and b"insufficient_scope" in response.content:
        raise AssertionError(f"{operation} refused a key with the {needed!r} scope")
    return None
'''


@pytest.fixture(scope="module")
def felis_with_keys(tmp_path_factory) -> dict:
    """felis up with keys required, a trained model of dataset pets, and one key per scope."""
    tmp = tmp_path_factory.mktemp("schemathesis")
    admin = secrets.token_urlsafe(32)
    proc, base = start_felis("up", tmp, FELIS_API_KEYS_REQUIRED="true", FELIS_BOOTSTRAP_ADMIN_KEY=admin)
    try:
        with httpx.Client(base_url=base, timeout=60, headers={"Authorization": f"Bearer {admin}"}) as c:
            c.post("/v1/datasets", json={"name": "pets"}).raise_for_status()
            c.post("/v1/datasets/pets/images",
                   files={"archive": ("s.zip", zip_folder(ASSETS / "cifar-cat" / "train"), "application/zip")})
            tid = c.post("/v1/datasets/pets/trainings", json={"architecture": "simple_cnn", "epochs": 2}).json()["id"]
            assert wait_training(c, tid)["status"] == "succeeded"
            keys = {scope: c.post("/v1/keys", json={"scopes": [scope], "name": f"schemathesis {scope}"}).json()["key"]
                    for scope in SCOPES}
        hooks = tmp / "hooks"
        hooks.mkdir()
        (hooks / "felis_scope_check.py").write_text(textwrap.dedent(HOOKS))
        yield {"base": base, "keys": keys, "hooks": hooks, "tmp": tmp}
    finally:
        proc.stop()


def _schemathesis(felis: dict, scope: str, *args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("schemathesis")
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "felis_scope_check",
           "PYTHONPATH": os.pathsep.join([str(felis["hooks"]), os.environ.get("PYTHONPATH", "")]),
           "SCOPE_CHECK_CONTRACT": json.dumps({f"{m} {p}": s.value for (m, p), s in CONTRACT.items()}),
           "SCOPE_CHECK_GRANTED": json.dumps(sorted(s.value for s in granted([scope])))}
    return subprocess.run([str(exe), *args[:2], "run", f"{felis['base']}/openapi.json", "--checks", CHECKS,
                           "--seed", "7", "--max-examples", EXAMPLES,
                           "--header", f"Authorization: Bearer {felis['keys'][scope]}", *args[2:]],
                          capture_output=True, text=True, timeout=600, env=env)


def test_random_requests_get_documented_answers(felis_with_keys):
    out = _schemathesis(felis_with_keys, "admin", "--config-file", "/dev/null")
    assert out.returncode == 0, out.stdout[-6000:]


# Each scope against the real dataset and version. DELETE too for the keys that may not delete,
# which must be refused: a key that may would remove what the next runs aim at.
@pytest.mark.parametrize("scope", SCOPES)
def test_requests_aimed_at_the_real_dataset_per_scope(felis_with_keys, scope):
    config = felis_with_keys["tmp"] / "schemathesis.toml"
    config.write_text('[parameters]\n"path.name" = "pets"\n"path.version" = 1\n')
    no_delete = ["--exclude-method", "DELETE"] if scope in ("write", "admin") else []
    out = _schemathesis(felis_with_keys, scope, "--config-file", str(config), *no_delete)
    assert out.returncode == 0, out.stdout[-6000:]
    with httpx.Client(base_url=felis_with_keys["base"],  # and the service still works afterwards
                      headers={"Authorization": f"Bearer {felis_with_keys['keys']['predict']}"}) as c:
        img = sorted((ASSETS / "cifar-cat" / "test" / "cat").iterdir())[0]
        r = c.post("/v1/datasets/pets/predict", files={"files": (img.name, img.read_bytes())})
        assert r.status_code == 200, r.text
