"""A watchdog in the worker's main process for messages that Celery took but no pool process started.

The main process takes a message (one at a time: prefetch 1), hands it to an idle pool process,
and the task starts there. If that process dies after the hand-over and before the start (an
OOM kill, a SIGKILL between two shards), billiard forks a replacement but the job is gone with
the dead process. Celery still holds the message as reserved and unacknowledged (acks_late), so
the one prefetch slot stays taken: the worker fetches nothing more, no lease runs out (no
training started), and the sweep's re-sent copies pile up unconsumed. Every training then waits
for a restart (celery/celery#2011 is the same class of fault).

StuckTaskWatchdog, a consumer bootstep on the worker's timer, gives back to the broker any message
reserved longer than FELIS_WORKER_STUCK_TASK_SECONDS without a pool process having started it
(reject with requeue: nothing is lost). Then it ends the worker process, its pool processes
first (Celery's warm shutdown would wait for the lost job for ever). The pool that lost the job does not hand out
the message again (measured with the embedded broker: the given-back message came back and
stayed unstarted), so a fresh worker process has to take it. `felis up` starts a new worker, and
so do Kubernetes and compose (restart policies). A message that was only slow to start would run
twice, and that is harmless: every task takes an id and claims its row atomically.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time

from celery import bootsteps

from service.config import get_settings

log = logging.getLogger("felis.worker")


class StuckTaskWatchdog(bootsteps.StartStopStep):
    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent, **kwargs):
        super().__init__(parent, **kwargs)
        self.seconds = get_settings().worker_stuck_task_seconds
        self.first_seen: dict[str, float] = {}  # reserved, not started: request id -> when first seen so
        self.timer = None

    def start(self, consumer) -> None:
        if self.seconds > 0:
            self.timer = consumer.timer.call_repeatedly(max(0.5, self.seconds / 5), self.check)

    def stop(self, consumer) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def check(self) -> list[str]:
        """Give back what waited too long; returns the ids of the requests given back."""
        from celery.worker import state

        now = time.monotonic()
        waiting = [r for r in list(state.reserved_requests)
                   if r not in state.active_requests and r.time_start is None and not r.acknowledged]
        self.first_seen = {r.id: self.first_seen.get(r.id, now) for r in waiting}
        given_back = []
        for r in waiting:
            if now - self.first_seen[r.id] < self.seconds:
                continue
            log.error("task %s[%s] was taken %.0f s ago and no pool process started it (the process it went to died?): "
                      "giving its message back to the broker", r.name, r.id, now - self.first_seen.pop(r.id))
            try:
                r.reject(requeue=True)
            finally:
                state.task_ready(r)
            given_back.append(r.id)
        if given_back:
            self.restart_worker()
        return given_back

    def restart_worker(self) -> None:
        """End this worker process now, its pool processes first; its supervisor starts a fresh one.
        Not Celery's shutdown: a warm one waits for the lost job for ever, and a cold one was seen to
        hang too once the pool had lost it."""
        from billiard.process import active_children

        log.error("the worker's pool lost a job: ending this worker so that a fresh one takes its messages")
        for child in active_children():
            with contextlib.suppress(OSError):
                os.kill(child.pid, signal.SIGKILL)
        logging.shutdown()
        os._exit(EXIT_CODE)


EXIT_CODE = 75  # EX_TEMPFAIL: the worker ended itself to be started again
