"""Recovering trainings whose worker died: a running training with no heartbeat for longer than
the lease is queued again (up to a few attempts) or failed with a reason. Never 'running' forever."""

from __future__ import annotations

import logging

from sqlalchemy import update

from service.config import Settings, get_settings
from service.domain.trainings import stale
from service.store.db import session_scope
from service.store.queue import enqueue_training
from service.store.tables import Training, utcnow

log = logging.getLogger("felis.recovery")

MAX_ATTEMPTS = 3


def recover_stale(settings: Settings | None = None) -> int:
    settings = settings or get_settings()
    requeue: list[str] = []
    with session_scope() as s:
        for t in stale(s, settings.training_lease_seconds):
            if t.attempts >= MAX_ATTEMPTS:
                values = {"status": "failed", "finished_at": utcnow(),
                          "error": {"code": "worker_lost",
                                    "message": f"the worker stopped responding {t.attempts} times"}}
            else:
                values = {"status": "queued"}
            # guarded by status and heartbeat, so two sweepers never both act on one training
            done = s.execute(update(Training).where(Training.id == t.id, Training.status == "running",
                                                    Training.heartbeat_at == t.heartbeat_at).values(**values))
            if done.rowcount == 1 and values["status"] == "queued":
                requeue.append(t.id)
    for training_id in requeue:
        log.warning("training %s lost its worker; queued again", training_id)
        enqueue_training(training_id)
    return len(requeue)
