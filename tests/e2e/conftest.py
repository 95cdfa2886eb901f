"""Two deployments of the same code: embedded (`felis up`) and production (FELIS_MODE=production:
Redis + PostgreSQL, `felis migrate` as its own step, API and worker as separate processes, API
keys required: the client sends the bootstrap admin key). Every test in tests/e2e runs against both."""

from __future__ import annotations

from collections.abc import Iterator

import secrets

import httpx
import pytest

from tests.utils.processes import (Proc, create_postgres_database, felis_env, free_port, migrate, redis_database,
                                   wait_ready)


@pytest.fixture(scope="module", params=["embedded", "production"])
def felis(request, tmp_path_factory) -> Iterator[httpx.Client]:
    mode = request.param
    tmp = tmp_path_factory.mktemp(f"felis-{mode}")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cleanup, headers = [], {}
    if mode == "embedded":
        env = felis_env(FELIS_DATA_DIR=str(tmp / "var"), FELIS_PORT=str(port))
        procs = [Proc(["up"], env, tmp / "up.log")]
    else:
        db_url, drop = create_postgres_database()
        cleanup.append(drop)
        admin = secrets.token_urlsafe(32)
        headers["Authorization"] = f"Bearer {admin}"
        # a Redis database of its own, so queued messages of other tests never reach this worker
        env = felis_env(FELIS_MODE="production", FELIS_DATA_DIR=str(tmp / "var"), FELIS_DATABASE_URL=db_url,
                        FELIS_BROKER_URL=redis_database(), FELIS_PORT=str(port), FELIS_BOOTSTRAP_ADMIN_KEY=admin,
                        FELIS_WORKER_METRICS_PORT=str(free_port()))
        migrate(env)
        procs = [Proc(["worker", "--queues", "gpu", "--concurrency", "1", "--hostname", f"w1-{port}@%h"], env,
                      tmp / "worker.log"),
                 Proc(["api", "--port", str(port)], env, tmp / "api.log")]
    try:
        wait_ready(base, procs)
        with httpx.Client(base_url=base, timeout=120, headers=headers) as client:
            client.mode = mode  # type: ignore[attr-defined]
            client.auth_headers = headers  # type: ignore[attr-defined]
            client.procs = procs  # type: ignore[attr-defined]
            yield client
    finally:
        for p in reversed(procs):
            p.stop()
        for fn in cleanup:
            fn()
