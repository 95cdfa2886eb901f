"""Handing work to the workers. Called only after the database commit that created the work."""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from service.errors import Unavailable


@lru_cache
def get_producer() -> Celery:
    """The Celery app this process sends with, configured from the current settings."""
    from worker.app import make_celery

    return make_celery()


def enqueue_training(training_id: str) -> None:
    from worker.app import GPU_QUEUE, TRAIN_TASK

    try:
        get_producer().send_task(TRAIN_TASK, args=[training_id], queue=GPU_QUEUE, retry=True,
                             retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5})
    except Exception as e:  # kombu raises OperationalError and friends when the broker is down
        raise Unavailable(f"the job queue is unreachable: {e}", code="broker_unavailable") from e


def check_broker() -> None:
    try:
        with get_producer().connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
    except Exception as e:
        raise Unavailable(f"the job queue is unreachable: {e}", code="broker_unavailable") from e
