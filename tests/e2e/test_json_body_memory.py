"""JSON bodies against a real `felis api` process that requires keys, sent by a stranger (no key).

FastAPI reads and parses a route's JSON body before the route's dependencies run, the key check
included: before, any JSON route took a body up to FELIS_MAX_REQUEST_BYTES (512 MiB) from anyone,
and one 100 MB array of numbers took the API from about 120 MB to 700 MB before it answered 401.
Now a route takes at most the body it declares (service.api.middleware.BodyLimit; 64 KiB where it
declares none), refused by its Content-Length, or counted while a chunked body arrives."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.utils.processes import start_felis

pytestmark = pytest.mark.timeout(300)

MB = 1024 * 1024
GROWTH_CAP_MB = 64  # what the refused bodies may add to the API's peak RSS (before: about 600 per request)


def _vm_hwm_mb(pid: int) -> float:
    return int(Path(f"/proc/{pid}/status").read_text().split("VmHWM:")[1].split()[0]) / 1024


def _numbers(megabytes: int) -> bytes:
    return b"[" + b"1," * (megabytes * MB // 2 - 1) + b"1]"


def _chunks(body: bytes, size: int = MB) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start:start + size]


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    proc, base = start_felis("api", tmp_path_factory.mktemp("json-bodies"), FELIS_API_KEYS_REQUIRED="true",
                             FELIS_BOOTSTRAP_ADMIN_KEY="felis-json-body-admin-key-0123456789")
    try:
        yield proc, base
    finally:
        proc.stop()


@pytest.mark.parametrize("method, path", [("POST", "/v1/datasets"), ("POST", "/v1/datasets/pets/trainings"),
                                          ("POST", "/v1/keys"), ("PUT", "/v1/datasets/pets/models/1/ood-threshold")])
def test_a_strangers_huge_json_body_is_refused_before_it_is_read(api, method, path):
    proc, base = api
    body = _numbers(100)
    baseline = _vm_hwm_mb(proc.popen.pid)
    with httpx.Client(base_url=base, timeout=120) as c:
        for content in (body, _chunks(body)):  # by its Content-Length; counted while it arrives
            r = c.request(method, path, content=content, headers={"content-type": "application/json"})
            assert r.status_code == 413, (r.status_code, r.text[:300])
            assert r.json()["error"]["code"] == "request_too_large"
    growth = _vm_hwm_mb(proc.popen.pid) - baseline
    assert growth < GROWTH_CAP_MB, f"the API's peak grew by {growth:.0f} MB"
    assert proc.popen.poll() is None
