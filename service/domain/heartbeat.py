"""The heartbeat a worker keeps while it holds a training or a shard: a thread that proves it
alive through long steps (one batch of features holds the main thread for seconds)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from service.config import Settings
from service.store.db import is_unreachable, unreachable_reason

log = logging.getLogger("felis.heartbeat")


def heartbeat_interval(settings: Settings) -> float:
    return max(1.0, settings.training_lease_seconds / 6)  # six beats a lease


class Heartbeat:
    """Proves the worker alive while a long step (one batch of features) holds the main thread:
    calls ``beat`` every ``interval`` seconds until it returns False (the work is no longer ours)
    or stop() is called. A failing beat is logged and tried again (the lease allows several)."""

    def __init__(self, beat: Callable[[], bool], interval: float, name: str):
        self.beat, self.interval, self.name = beat, interval, name
        self.lost = threading.Event()  # set when a beat said the work is no longer ours
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"heartbeat-{name}")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self.beat():
                    log.warning("%s: no longer ours; heartbeat stops", self.name)
                    self.lost.set()
                    return
            except Exception as e:  # a missed beat is not fatal; the lease allows several
                if is_unreachable(e):  # a database outage: one line a beat, not a traceback
                    log.warning("heartbeat for %s: the database is unreachable (%s)", self.name, unreachable_reason(e))
                else:
                    log.warning("heartbeat for %s failed", self.name, exc_info=True)
