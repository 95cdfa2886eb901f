"""Per-caller rate limits: a 429 with Retry-After when exceeded. Shared by every API replica through
Redis when one is configured (settings.shared_redis_url), else kept in each process.

Each limit is a rate per minute with a burst (ten seconds' worth unless given). In each process it is
a token bucket (RateLimiter). Through Redis it is the ``limits`` library's sliding window counter of
``burst`` hits per ``burst / rate`` seconds: the same sustained rate and burst, and, like the bucket,
room that comes back gradually (the last window's count weighs less as it ages) rather than all at
once. It costs two integers per caller in Redis and one Lua call per hit, and its windows run on
Redis's clock, not the replicas' (a moving window would count exactly, but keeps one timestamp per
hit, up to ``burst`` per caller, from each replica's clock). Retry-After is limits' estimate of when
the next hit fits. The Redis calls are async (redis-py's asyncio client): the event loop never
waits on Redis, and at most 0.25 s per call.

Redis unreachable, slow or erroring: the limits fail open to each process's own buckets (no request
fails because of Redis), logged at most once a minute; Redis is tried again every 2 seconds.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from service.errors import RateLimited

if TYPE_CHECKING:  # imported by _Shared only: a process without Redis never loads them
    import redis.asyncio
    from limits import RateLimitItem
    from limits.aio.strategies import SlidingWindowCounterRateLimiter

log = logging.getLogger("felis.api")

REDIS_TIMEOUT_S = 0.25  # connect and answer; past it the process limits on its own
REDIS_RETRY_S = 2.0  # after a failure, how long each process limits on its own before trying Redis again
WARN_EVERY_S = 60.0  # "redis unreachable" at most once a minute per process
KEY_PREFIX = "felis:ratelimit"  # the Redis keys: felis:ratelimit:{LIMITER/<limit>/<caller>/<burst>/<seconds>/second}[/-1]


class RateLimiter:
    def __init__(self, per_minute: float, burst: float | None = None):
        self.rate = per_minute / 60.0  # tokens per second
        self.burst = burst if burst is not None else max(1.0, per_minute / 6)  # ten seconds' worth
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, caller: str, cost: float = 1.0) -> None:
        """Spend `cost` of the caller's tokens, or raise RateLimited (spending nothing)."""
        self._spend(caller, cost, spend=True)

    def check(self, caller: str, cost: float = 1.0) -> None:
        """Raise RateLimited when the caller could not spend `cost` now; spends nothing."""
        self._spend(caller, cost, spend=False)

    def _spend(self, caller: str, cost: float, *, spend: bool) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(caller, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens < cost:
                self._buckets[caller] = (tokens, now)
                raise RateLimited("too many requests; slow down", retry_after=(cost - tokens) / self.rate)
            self._buckets[caller] = (tokens - cost if spend else tokens, now)
            if len(self._buckets) > 100_000:  # forget idle callers
                self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 600}


# --- named limits, shared through Redis or per process ----------------------------------------


@dataclass(frozen=True)
class Rate:
    per_minute: float  # 0 turns the limit off
    burst: float | None = None  # default: ten seconds' worth


def redacted(url: str) -> str:
    """A Redis URL without its user, password or query: what logs may show."""
    u = urlsplit(url)
    host = u.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{u.scheme}://{host}{f':{u.port}' if u.port else ''}{u.path}"


class Limits:
    """The API's named rate limits (``app.state.limiters``): ``await take(name, caller)`` spends one
    hit or raises RateLimited (spending nothing); ``await check(name, caller)`` only raises."""

    def __init__(self, rates: Mapping[str, Rate], redis_url: str | None = None):
        self._local = {name: RateLimiter(r.per_minute, r.burst) for name, r in rates.items()}
        self._redis = _Shared(redis_url, self._local) if redis_url else None

    @property
    def shared(self) -> bool:
        return self._redis is not None

    def describe(self) -> str:
        if self._redis:
            return f"rate limits: shared through {redacted(self._redis.url)}"
        return ("rate limits: per process: no Redis configured (FELIS_REDIS_URL, or a redis:// broker); "
                "N replicas allow N times the rate")

    async def take(self, name: str, caller: str) -> None:
        await self._spend(name, caller, spend=True)

    async def check(self, name: str, caller: str) -> None:
        await self._spend(name, caller, spend=False)

    async def probe(self) -> None:
        """At the API's start: reach Redis once, so that one unreachable then is said at once
        (logged as any failure is) rather than at the first limited request."""
        if self._redis:
            await self._redis.ping()

    async def close(self) -> None:
        if self._redis:
            await self._redis.close()

    async def _spend(self, name: str, caller: str, *, spend: bool) -> None:
        local = self._local[name]
        if local.rate <= 0:
            return
        if self._redis and self._redis.usable():
            retry_after = await self._redis.spend(name, caller, spend=spend)
            if retry_after is not None:  # None: Redis failed, fall open to this process's bucket
                if retry_after > 0:
                    raise RateLimited("too many requests; slow down", retry_after=retry_after)
                return
        (local.take if spend else local.check)(caller)


class _Shared:
    """The sliding windows in Redis, and what to do when Redis fails."""

    def __init__(self, url: str, buckets: Mapping[str, RateLimiter]):
        import redis
        from limits import RateLimitItemPerSecond

        self.url = url
        self._errors = (redis.RedisError, OSError)  # OSError: sockets; asyncio's TimeoutError is one
        self._windows: dict[str, RateLimitItem] = {}
        for name, bucket in buckets.items():
            if bucket.rate > 0:
                burst = max(1, round(bucket.burst))
                self._windows[name] = RateLimitItemPerSecond(burst, max(1, round(burst / bucket.rate)))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: redis.asyncio.ConnectionPool | None = None
        self._limiter: SlidingWindowCounterRateLimiter | None = None
        self._retry_at = 0.0  # monotonic: Redis failed; until then each process limits on its own
        self._warned_at = -WARN_EVERY_S
        self._failing = False

    def usable(self) -> bool:
        return time.monotonic() >= self._retry_at

    def _connect(self) -> SlidingWindowCounterRateLimiter:
        """The limiter over this event loop's connections (redis.asyncio's belong to one loop)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            import redis.asyncio
            from limits.aio.storage import RedisStorage
            from limits.aio.strategies import SlidingWindowCounterRateLimiter
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            self._pool = redis.asyncio.ConnectionPool.from_url(
                self.url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S,
                retry=Retry(NoBackoff(), 0))  # no retries: a failure falls open at once
            storage = RedisStorage(f"async+{self.url}", implementation="redispy", key_prefix=KEY_PREFIX,
                                   connection_pool=self._pool)
            self._loop, self._limiter = loop, SlidingWindowCounterRateLimiter(storage)
        return self._limiter

    async def ping(self) -> bool:
        try:
            from redis.asyncio import Redis

            self._connect()
            await Redis(connection_pool=self._pool).ping()
            return True
        except self._errors as e:
            self._failed(e)
            return False

    async def spend(self, name: str, caller: str, *, spend: bool) -> float | None:
        """0: allowed (and spent, if ``spend``); > 0: refused, the seconds to wait; None: Redis failed."""
        window = self._windows[name]
        try:
            limiter = self._connect()
            if await (limiter.hit if spend else limiter.test)(window, name, caller):
                retry_after = 0.0
            else:
                stats = await limiter.get_window_stats(window, name, caller)
                retry_after = max(0.001, stats.reset_time - time.time())
        except self._errors as e:
            self._failed(e)
            return None
        if self._failing:
            self._failing = False
            log.info("rate limits: redis reachable again: shared through %s", redacted(self.url))
        return retry_after

    def _failed(self, error: Exception) -> None:
        now = time.monotonic()
        self._retry_at = now + REDIS_RETRY_S
        self._failing = True
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning("rate limits: redis unreachable at %s (%s: %s): each process limits on its own, "
                        "trying again every %g s", redacted(self.url), type(error).__name__, error, REDIS_RETRY_S)

    async def close(self) -> None:
        if self._pool is not None and self._loop is asyncio.get_running_loop():
            await self._pool.disconnect()
        self._loop = self._pool = self._limiter = None
