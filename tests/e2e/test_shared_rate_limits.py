"""Rate limits shared by API replicas through Redis (security finding 8): two real API processes on
one PostgreSQL and a Redis of the test's own, requests alternating between them. Together they allow
one limit, not two; bad keys are counted per client address across both; a Redis that dies or stops
answering costs no 5xx and no stall (the limits fall back to each process's own, logged), and once it
is back they are shared again.

The requests are uploads to a dataset that does not exist: the route's rate limit runs before the
endpoint looks the dataset up, so each one is a 404 (passed the limiter) or a 429, and costs no
model. Each phase sends from a loopback address of its own (127.0.0.x), a client address, and so a
rate key, that no earlier phase spent."""

from __future__ import annotations

import shutil
import signal
import time

import httpx
import pytest

from tests.utils.processes import Proc, create_postgres_database, felis_env, free_port, wait_ready
from tests.utils.servers import RedisServer

pytestmark = [pytest.mark.timeout(300), pytest.mark.production,
              pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server not installed")]

PER_MINUTE = 60  # FELIS_RATE_LIMIT_UPLOAD_PER_MINUTE: a burst of 10 (ten seconds' worth)
BURST = 10
FAILED_KEYS_BURST = 10  # service.api.auth.FAILED_KEYS_BURST
SLACK = 1  # a token that refills while the requests are sent (one a second at this rate)


@pytest.fixture(params=["broker", "redis_url"])
def replicas(request, tmp_path):
    """Two API processes; Redis as the Celery broker, or as FELIS_REDIS_URL beside the default broker."""
    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    db_url, drop = create_postgres_database()
    redis_env = ({"FELIS_BROKER_URL": redis_server.url} if request.param == "broker"
                 else {"FELIS_REDIS_URL": redis_server.url})
    env = felis_env(FELIS_MODE="embedded", FELIS_DATA_DIR=str(tmp_path / "shared"), FELIS_DATABASE_URL=db_url,
                    FELIS_RATE_LIMIT_UPLOAD_PER_MINUTE=str(PER_MINUTE), **redis_env)
    ports = [free_port(), free_port()]
    apis = [Proc(["api", "--port", str(p)], env, tmp_path / f"api{i}.log") for i, p in enumerate(ports)]
    try:
        for p in ports:
            wait_ready(f"http://127.0.0.1:{p}", apis)
        yield [f"http://127.0.0.1:{p}" for p in ports], apis, redis_server
    finally:
        for p in apis:
            p.stop()
        redis_server.stop()
        drop()


def _clients(bases: list[str], address: str) -> list[httpx.Client]:
    """One client per replica, each connecting from `address` (the client address both see)."""
    return [httpx.Client(base_url=b, timeout=30, transport=httpx.HTTPTransport(local_address=address)) for b in bases]


def _alternate(bases: list[str], address: str, n: int, headers: dict | None = None) -> list[tuple[int, float]]:
    """n uploads alternating between the replicas: (status, seconds) of each."""
    clients = _clients(bases, address)
    out = []
    try:
        for i in range(n):
            t = time.monotonic()
            r = clients[i % len(clients)].post("/v1/datasets/nowhere/images", headers=headers or {})
            out.append((r.status_code, time.monotonic() - t))
    finally:
        for c in clients:
            c.close()
    return out


def _passed(answers: list[tuple[int, float]]) -> int:
    assert {s for s, _ in answers} <= {404, 429}, answers
    return sum(s != 429 for s, _ in answers)


def _wait_log(procs: list[Proc], text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(text in p.log_path.read_text(errors="replace") for p in procs):
            return
        time.sleep(0.1)
    pytest.fail(f"{text!r} not logged by every replica:\n" + "\n".join(p.tail(20) for p in procs))


def test_replicas_share_one_limit(replicas):
    bases, apis, redis_server = replicas
    # before: each process kept its own bucket, so two replicas let through twice the burst
    passed = _passed(_alternate(bases, "127.0.0.2", 3 * BURST))
    assert BURST <= passed <= BURST + SLACK, passed
    _wait_log(apis, f"rate limits: shared through redis://127.0.0.1:{redis_server.port}/0")


def test_bad_keys_are_limited_per_address_across_replicas(replicas):
    bases, apis, _ = replicas
    bad = [s for s, _ in _alternate(bases, "127.0.0.3", 3 * FAILED_KEYS_BURST,
                                    headers={"Authorization": "Bearer felis_00000000_guess"})]
    assert set(bad) == {401, 429}, bad
    assert FAILED_KEYS_BURST <= bad.count(401) <= FAILED_KEYS_BURST + SLACK, bad  # before: twice the burst
    # another address is not affected
    assert {s for s, _ in _alternate(bases, "127.0.0.4", 2)} == {404}


@pytest.mark.parametrize("replicas", ["redis_url"], indirect=True)
def test_redis_dead_or_stuck_costs_no_errors_and_no_stall(replicas):
    bases, apis, redis_server = replicas
    assert _passed(_alternate(bases, "127.0.0.5", 2 * BURST)) <= BURST + SLACK  # shared

    redis_server.kill()
    answers = _alternate(bases, "127.0.0.6", 3 * BURST)
    assert _passed(answers) >= BURST  # failed open: each process limits on its own again
    assert max(t for _, t in answers) < 1.0, answers
    _wait_log(apis, "rate limits: redis unreachable")

    redis_server.start()  # the same port: limits are shared again once the replicas have looked
    time.sleep(3)
    _alternate(bases, "127.0.0.7", 4)
    _wait_log(apis, "rate limits: redis reachable again")
    passed = _passed(_alternate(bases, "127.0.0.8", 3 * BURST))
    assert BURST <= passed <= BURST + SLACK, passed

    redis_server.proc.send_signal(signal.SIGSTOP)  # accepts connections, answers nothing
    try:
        answers = _alternate(bases, "127.0.0.9", 2 * BURST)
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    assert {s for s, _ in answers} <= {404, 429}, answers
    assert max(t for _, t in answers) < 1.0, answers  # one short timeout, then each process's own
