"""Open by default (issue 14): embedded mode without API keys listens on loopback only. Real
`felis api` / `felis up` processes: a public bind address exits non-zero and says how to fix it,
and starts once keys are required. The worker's metrics server is loopback in embedded mode too."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.utils.processes import ROOT, Proc, felis_env, free_port, wait_ready


def _exits(proc: Proc, port: int, timeout: float = 90) -> int:
    """The exit status of a process expected to refuse to start; fails if it serves instead."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                return proc.popen.returncode
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
            except httpx.HTTPError:
                time.sleep(0.2)
                continue
            pytest.fail(f"{proc.args} is serving on every interface without API keys:\n{proc.tail()}")
        pytest.fail(f"{proc.args} neither served nor exited:\n{proc.tail()}")
    finally:
        proc.stop()


def _says_how(log: str) -> None:
    assert "0.0.0.0" in log and "FELIS_API_KEYS_REQUIRED=true" in log and "FELIS_HOST=127.0.0.1" in log, log


@pytest.mark.parametrize("host_arg", ["--host", "FELIS_HOST"])
def test_api_refuses_a_public_address_without_keys(tmp_path: Path, host_arg: str):
    port = free_port()
    args, env = ["api", "--port", str(port)], felis_env(FELIS_DATA_DIR=str(tmp_path / "var"))
    if host_arg == "--host":
        args += ["--host", "0.0.0.0"]
    else:
        env["FELIS_HOST"] = "0.0.0.0"
    proc = Proc(args, env, tmp_path / "api.log")
    assert _exits(proc, port) != 0
    _says_how(proc.tail())


def test_api_starts_on_a_public_address_when_keys_are_required(tmp_path: Path):
    port = free_port()
    proc = Proc(["api", "--host", "0.0.0.0", "--port", str(port)],
                felis_env(FELIS_DATA_DIR=str(tmp_path / "var"), FELIS_API_KEYS_REQUIRED="true"), tmp_path / "api.log")
    try:
        wait_ready(f"http://127.0.0.1:{port}", [proc])
        r = httpx.get(f"http://127.0.0.1:{port}/v1/datasets", timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "api_key_required"
    finally:
        proc.stop()


def test_up_refuses_a_public_address_without_keys(tmp_path: Path):
    port = free_port()
    proc = Proc(["up", "--port", str(port)],
                felis_env(FELIS_DATA_DIR=str(tmp_path / "var"), FELIS_HOST="0.0.0.0", FELIS_WORKER_METRICS_PORT="0"),
                tmp_path / "up.log")
    assert _exits(proc, port) != 0
    _says_how(proc.tail())


@pytest.mark.parametrize(("host", "env", "refused"), [
    ("0.0.0.0", {}, True), ("::", {}, True), ("", {}, True), ("192.168.1.20", {}, True), ("felis.lan", {}, True),
    ("127.0.0.1", {}, False), ("127.0.0.2", {}, False), ("localhost", {}, False), ("::1", {}, False),
    ("[::1]", {}, False),
    ("0.0.0.0", {"api_keys_required": True}, False),
    ("0.0.0.0", {"mode": "production"}, False),  # keys are required there (unless turned off on purpose)
])
def test_bind_refusal(host, env, refused):
    from service.config import Settings, bind_refusal

    assert (bind_refusal(Settings(_env_file=None, **env), host) is not None) == refused


_SPY = """
import worker.metrics as m
real = m.start_http_server
def spy(port, addr="0.0.0.0", registry=None):
    server, thread = real(port, addr=addr, registry=registry)
    print("BOUND", server.server_address[0], flush=True)
    return server, thread
m.start_http_server = spy
assert m.start_worker_metrics_server() is not None
m.stop_worker_metrics()
"""


@pytest.mark.parametrize(("env", "bound"), [
    ({}, "127.0.0.1"),
    ({"FELIS_MODE": "production"}, "0.0.0.0"),  # Prometheus scrapes the pod
    ({"FELIS_MODE": "production", "FELIS_WORKER_METRICS_HOST": "127.0.0.1"}, "127.0.0.1"),
])
def test_worker_metrics_listen_on_loopback_in_embedded_mode(tmp_path: Path, env, bound):
    out = subprocess.run(
        [sys.executable, "-c", _SPY], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        env=felis_env(FELIS_DATA_DIR=str(tmp_path / "var"), FELIS_WORKER_METRICS_PORT=str(free_port()), **env))
    assert out.returncode == 0, out.stderr
    assert f"BOUND {bound}" in out.stdout.splitlines(), out.stdout + out.stderr
