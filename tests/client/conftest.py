"""A real felis (``felis up``: API + worker, embedded mode) shared by the client and CLI tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.utils.processes import Proc, felis_env, free_port, wait_ready


@pytest.fixture(scope="package")
def felis_url(tmp_path_factory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("felis-client")
    port = free_port()
    env = felis_env(FELIS_DATA_DIR=str(tmp / "var"), FELIS_PORT=str(port), FELIS_WORKER_METRICS_PORT="0")
    procs = [Proc(["up"], env, tmp / "up.log")]
    try:
        wait_ready(f"http://127.0.0.1:{port}", procs)
        yield f"http://127.0.0.1:{port}"
    finally:
        for p in procs:
            p.stop()


@pytest.fixture
def no_felis_config(monkeypatch, tmp_path) -> None:
    """No FELIS_URL / FELIS_API_KEY from the environment and no config file from the home folder."""
    monkeypatch.delenv("FELIS_URL", raising=False)
    monkeypatch.delenv("FELIS_API_KEY", raising=False)
    monkeypatch.setenv("FELIS_CONFIG", str(tmp_path / "absent.toml"))
