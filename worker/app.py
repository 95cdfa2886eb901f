"""The Celery app: broker, the ``gpu`` queue, delivery guarantees and time limits.

Importing this module is cheap (no torch): the API imports it to enqueue. Tasks are in
``worker.tasks`` and are loaded by the worker process only (``include``).
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from service.config import Settings, get_settings

TRAIN_TASK = "felis.train"
GPU_QUEUE = "gpu"


def broker_options(settings: Settings) -> dict:
    if settings.embedded_broker:
        # filesystem:// is a broker made of files: two processes on one machine, no server.
        folder = settings.broker_dir
        for sub in ("queue", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "control_folder": str(folder / "control"),
        }
    # Redis re-delivers an unacknowledged message after visibility_timeout: keep it above the
    # longest training, or a long run would be delivered to a second worker while still running.
    return {"visibility_timeout": settings.training_time_limit + 600}


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("felis", broker=settings.broker_url, include=["worker.tasks"])
    app.conf.update(
        broker_transport_options=broker_options(settings),
        broker_connection_retry_on_startup=True,
        task_queues=[Queue(GPU_QUEUE, routing_key=GPU_QUEUE)],
        task_default_queue=GPU_QUEUE,
        task_routes={TRAIN_TASK: {"queue": GPU_QUEUE}},
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # state lives in the metadata store, not in a result backend
        # A training is idempotent by id, so late acks are safe: a message is acknowledged
        # only after the task ran, and a worker that dies mid-training leaves it to another.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # a long job never waits behind another on a busy worker
        task_soft_time_limit=settings.training_soft_time_limit,
        task_time_limit=settings.training_time_limit,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,  # for Flower
        task_send_sent_event=True,
    )
    return app


celery_app = make_celery()
