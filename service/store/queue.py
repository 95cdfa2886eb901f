"""The job queue: its names, the broker settings both sides share, and handing work over.

The API (which sends) and the worker (which consumes) take the task and queue names from here,
so they cannot disagree (importing the names costs no Celery import). Work is enqueued only
after the database commit that created it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from functools import lru_cache
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.config import Settings, get_settings
from service.errors import Unavailable

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger("felis.queue")

TRAIN_TASK = "felis.train"  # runs one training to a final state (worker.tasks.train)
SUGGEST_TASK = "felis.suggest"  # suggests labels for a dataset's unlabeled images (worker.tasks.suggest)
EXTRACT_TASK = "felis.extract"  # computes one shard of a training's features (worker.tasks.extract)
GPU_QUEUE = "gpu"  # the training workers' queue: `felis worker --queues gpu`


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


def celery_app(settings: Settings | None = None, include: Iterable[str] = ()) -> Celery:
    """A Celery app on the configured broker with felis's queue and routes: what sender and worker share."""
    from celery import Celery
    from kombu import Queue

    settings = settings or get_settings()
    app = Celery("felis", broker=settings.broker_url, include=list(include))
    app.conf.update(
        broker_transport_options=broker_options(settings),
        broker_connection_retry_on_startup=True,
        task_queues=[Queue(GPU_QUEUE, routing_key=GPU_QUEUE)],
        task_default_queue=GPU_QUEUE,
        task_routes={name: {"queue": GPU_QUEUE} for name in (TRAIN_TASK, SUGGEST_TASK, EXTRACT_TASK)},
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # state lives in the metadata store, not in a result backend
        task_send_sent_event=True,
    )
    return app


@lru_cache
def get_producer() -> Celery:
    """The Celery app this process sends with, configured from the current settings."""
    return celery_app()


def enqueue_suggestions(dataset_id: int) -> None:
    """Unavailable when the broker is down (the caller decides whether that matters)."""
    try:
        get_producer().send_task(SUGGEST_TASK, args=[int(dataset_id)], queue=GPU_QUEUE, retry=True,
                                 retry_policy={"max_retries": 1, "interval_start": 0.2})
    except Exception as e:
        raise Unavailable(f"the job queue is unreachable: {e}", code="broker_unavailable") from e


def enqueue_training(training_id: str) -> None:
    try:
        get_producer().send_task(TRAIN_TASK, args=[training_id], queue=GPU_QUEUE, retry=True,
                                 retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5})
    except Exception as e:  # kombu raises OperationalError and friends when the broker is down
        raise Unavailable(f"the job queue is unreachable: {e}", code="broker_unavailable") from e


def enqueue_shard(shard_id: int) -> None:
    try:
        get_producer().send_task(EXTRACT_TASK, args=[int(shard_id)], queue=GPU_QUEUE, retry=True,
                                 retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5})
    except Exception as e:
        raise Unavailable(f"the job queue is unreachable: {e}", code="broker_unavailable") from e


def check_broker() -> None:
    try:
        with get_producer().connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
    except Exception as e:
        raise Unavailable(f"the job queue is unreachable: {e}", code="broker_unavailable") from e


def queue_depth(queue: str = GPU_QUEUE) -> int | None:
    """Messages waiting in the broker's queue. Redis: LLEN of the queue's lists (kombu keeps one
    per priority step); filesystem: the message files in the broker's queue folder."""
    settings = get_settings()
    url = settings.broker_url
    if settings.embedded_broker:
        folder = settings.broker_dir / "queue"
        if not folder.is_dir():
            return 0
        # kombu's filesystem transport names a message <ms>_<uuid>.<queue>.msg
        return sum(1 for name in os.listdir(folder) if name.partition(".")[2] == f"{queue}.msg")
    if url.startswith(("redis://", "rediss://", "unix://")):
        client = _redis(url)
        keys = [queue] + [f"{queue}\x06\x16{p}" for p in (3, 6, 9)]  # kombu's priority lists
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.llen(key)
        return int(sum(pipe.execute()))
    return None


@lru_cache(maxsize=4)
def _redis(url: str):
    import redis

    return redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)


class QueueDepthCollector(Collector):
    """felis_queue_depth{queue}: training messages waiting in the broker, read when scraped.
    Both the API's /metrics and the worker's metrics server register one."""

    def __init__(self, queue: str = GPU_QUEUE):
        self.queue = queue

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [GaugeMetricFamily("felis_queue_depth", "Training messages waiting in the broker", labels=["queue"])]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("felis_queue_depth", "Training messages waiting in the broker", labels=["queue"])
        try:
            depth = queue_depth(self.queue)
        except Exception as e:  # a down broker shows as a missing sample, and in /readyz
            log.debug("queue depth unavailable: %s", e)
            depth = None
        if depth is not None:
            family.add_metric([self.queue], depth)
        yield family
