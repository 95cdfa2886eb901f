"""The Celery app of the worker: delivery guarantees and time limits on top of the broker,
queue and routes that ``service.store.queue`` shares with the API.

Importing this module is cheap (no torch). Tasks are in ``worker.tasks`` and are loaded by the
worker process only (``include``).
"""

from __future__ import annotations

from celery import Celery

from service.config import Settings, get_settings
from service.store.queue import celery_app as _base_app


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = _base_app(settings, include=["worker.tasks"])
    app.conf.update(
        # A training is idempotent by id, so late acks are safe: a message is acknowledged
        # only after the task ran, and a worker that dies mid-training leaves it to another.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # a long job never waits behind another on a busy worker
        task_soft_time_limit=settings.training_soft_time_limit,
        task_time_limit=settings.training_time_limit,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,  # for Flower
    )
    from worker.watchdog import StuckTaskWatchdog

    app.steps["consumer"].add(StuckTaskWatchdog)  # a message no pool process started is given back
    return app


celery_app = make_celery()
