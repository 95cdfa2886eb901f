"""service.api.ratelimit.Limits: per process without Redis (and said so), shared through the local
Redis with an exact Retry-After, and failing open, fast and logged once, when Redis is gone or stuck.
tests/e2e/test_shared_rate_limits.py runs the same with two real API processes."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid

import pytest

from service.api.ratelimit import Limits, Rate, redacted
from service.errors import RateLimited

REDIS = "redis://127.0.0.1:6379/15"  # the e2e tests use databases 1-14 and flush them; keys here are unique


def _spend(limits: Limits, caller: str, n: int, name: str = "p") -> list[float]:
    """n takes: 0 for each allowed, retry_after for each refused."""

    async def go() -> list[float]:
        out = []
        for _ in range(n):
            try:
                await limits.take(name, caller)
                out.append(0.0)
            except RateLimited as e:
                out.append(e.retry_after)
        return out

    return asyncio.run(go())


def test_without_redis_limits_are_per_process_and_said_so(settings):
    from service.api.auth import make_limiters

    assert settings.shared_redis_url is None
    limits = make_limiters(settings)
    assert not limits.shared
    assert limits.describe().startswith("rate limits: per process: no Redis configured")
    assert "N replicas allow N times the rate" in limits.describe()


def test_memory_limits_burst_then_retry_after():
    limits = Limits({"p": Rate(60), "off": Rate(0)})  # 60 a minute: a burst of 10, one more a second
    out = _spend(limits, "a", 11)
    assert out[:10] == [0.0] * 10 and 0 < out[10] <= 1.0
    assert _spend(limits, "b", 1) == [0.0]  # callers are independent
    assert _spend(limits, "a", 50, name="off") == [0.0] * 50  # 0 turns a limit off


def test_memory_check_spends_nothing():
    limits = Limits({"p": Rate(60, burst=2)})

    async def go():
        for _ in range(5):
            await limits.check("p", "a")
        await limits.take("p", "a")
        await limits.take("p", "a")
        with pytest.raises(RateLimited):
            await limits.check("p", "a")

    asyncio.run(go())


def test_the_logged_url_has_no_password():
    assert redacted("redis://:s3cret@cache.internal:6380/2") == "redis://cache.internal:6380/2"
    assert redacted("rediss://felis:s3cret@[::1]:6379/0?ssl_cert_reqs=none") == "rediss://[::1]:6379/0"
    limits = Limits({"p": Rate(60)}, "redis://user:s3cret@cache.internal:6380/2")  # never connects here
    assert limits.shared and limits.describe() == "rate limits: shared through redis://cache.internal:6380/2"


@pytest.mark.production
def test_limits_through_redis_are_shared_with_an_exact_retry_after():
    a, b = Limits({"p": Rate(60)}, REDIS), Limits({"p": Rate(60)}, REDIS)  # two replicas
    caller = f"addr:{uuid.uuid4()}"
    assert _spend(a, caller, 6) + _spend(b, caller, 4) == [0.0] * 10
    refused = _spend(b, caller, 1) + _spend(a, caller, 1)
    assert all(8.5 < r <= 10 for r in refused), refused  # the window (10 s from the first hit) ends first

    async def check_spends_nothing():
        other = f"addr:{uuid.uuid4()}"
        for _ in range(20):
            await a.check("p", other)
        with pytest.raises(RateLimited):
            await b.check("p", caller)

    asyncio.run(check_spends_nothing())


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("server", ["refused", "stuck"])
def test_an_unreachable_redis_fails_open_fast_and_warns_once(server, caplog):
    stuck = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    stuck.bind(("127.0.0.1", 0))
    stuck.listen(64)
    port = stuck.getsockname()[1] if server == "stuck" else _closed_port()
    limits = Limits({"p": Rate(600)}, f"redis://127.0.0.1:{port}/0")  # a burst of 100 per process
    try:
        with caplog.at_level(logging.WARNING, logger="felis.api"):
            t = time.monotonic()
            assert _spend(limits, "a", 50) == [0.0] * 50  # failed open
            elapsed = time.monotonic() - t
    finally:
        stuck.close()
    assert elapsed < 0.6  # one 0.25 s timeout at most, then this process's own bucket for 2 s
    warnings = [r.getMessage() for r in caplog.records if "redis unreachable" in r.getMessage()]
    assert len(warnings) == 1 and f"redis://127.0.0.1:{port}/0" in warnings[0], warnings
    out = _spend(limits, "b", 101)  # falling open keeps this process's limits
    assert out[:100] == [0.0] * 100 and out[100] > 0


def test_an_api_that_starts_while_redis_is_down_says_so_at_once(caplog):
    """Before: the start said 'rate limits: shared through redis://...' and nothing more; that
    Redis was down showed only at the first limited request. The start now reaches it once."""
    limits = Limits({"p": Rate(600)}, f"redis://127.0.0.1:{_closed_port()}/0")
    with caplog.at_level(logging.WARNING, logger="felis.api"):
        asyncio.run(limits.probe())
    assert [r.getMessage() for r in caplog.records if "redis unreachable" in r.getMessage()], caplog.records
    assert _spend(limits, "a", 3) == [0.0] * 3  # and it limits on its own meanwhile


@pytest.mark.production
def test_a_reachable_redis_is_probed_quietly(caplog):
    limits = Limits({"p": Rate(60)}, REDIS)
    with caplog.at_level(logging.WARNING, logger="felis.api"):
        asyncio.run(limits.probe())
    assert not [r for r in caplog.records if "redis" in r.getMessage()]

