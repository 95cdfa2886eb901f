"""worker.watchdog in isolation: which reserved messages it gives back, and when (the end-to-end
case, a pool process killed after the hand-over, is tests/e2e/test_crashes.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from celery.worker import state

from worker import watchdog


@dataclass(eq=False)
class _Request:
    id: str
    name: str = "felis.train"
    time_start: float | None = None
    acknowledged: bool = False
    rejected: list = field(default_factory=list)

    def reject(self, requeue=False):
        self.rejected.append(requeue)
        self.acknowledged = True


@pytest.fixture
def dog(monkeypatch):
    monkeypatch.setattr(state, "reserved_requests", set())
    monkeypatch.setattr(state, "active_requests", set())
    monkeypatch.setattr(state, "task_ready", lambda r, **_: state.reserved_requests.discard(r))
    clock = [1000.0]
    monkeypatch.setattr(watchdog.time, "monotonic", lambda: clock[0])
    d = watchdog.StuckTaskWatchdog.__new__(watchdog.StuckTaskWatchdog)
    d.seconds, d.first_seen, d.timer, d.restarts = 60, {}, None, 0
    monkeypatch.setattr(d, "restart_worker", lambda: setattr(d, "restarts", d.restarts + 1))
    return d, clock


def test_a_message_no_pool_process_started_is_given_back_and_the_worker_ends(dog):
    d, clock = dog
    stuck, running, started = _Request("a"), _Request("b"), _Request("c", time_start=999.0)
    state.reserved_requests.update({stuck, running, started})
    state.active_requests.add(running)
    assert d.check() == [] and d.restarts == 0  # first seen now
    clock[0] += 59
    assert d.check() == [] and d.restarts == 0  # not yet FELIS_WORKER_STUCK_TASK_SECONDS
    clock[0] += 2
    assert d.check() == ["a"] and stuck.rejected == [True] and d.restarts == 1
    assert stuck not in state.reserved_requests and not running.rejected and not started.rejected


def test_a_message_that_starts_in_time_is_forgotten(dog):
    d, clock = dog
    r = _Request("a")
    state.reserved_requests.add(r)
    d.check()
    clock[0] += 30
    r.time_start = clock[0]  # a pool process took it up
    d.check()
    assert d.first_seen == {}
    clock[0] += 100
    assert d.check() == [] and d.restarts == 0 and not r.rejected
