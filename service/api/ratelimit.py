"""Per-caller rate limits (token buckets), per API process: a 429 with Retry-After when exceeded."""

from __future__ import annotations

import threading
import time

from service.errors import RateLimited


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
