"""Celery tasks: thin adapters that take ids and call the domain (service.domain.pipeline, .extraction, .suggesting, .trainings)."""

from __future__ import annotations

import logging
import threading

from celery import signals

from service.config import get_settings
from service.limits import cpu_budget
from service.logs import configure_logging, log_context
from service.store.db import init_db, session_scope
from service.store.queue import EXTRACT_TASK, SUGGEST_TASK, TRAIN_TASK
from worker.app import celery_app
from worker.metrics import install_worker_metrics

log = logging.getLogger("felis.worker")

install_worker_metrics()


@celery_app.task(name=TRAIN_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def train(self, training_id: str) -> str:
    """Run one training to a final state. Safe to deliver twice: the domain claims it atomically.
    Its log lines carry the training id and the id of the HTTP request that asked for it."""
    from service.domain import trainings
    from service.store.tables import Training

    with session_scope() as s:
        t = s.get(Training, training_id)
        request_id = t.request_id if t else None
    with log_context(training_id=training_id, request_id=request_id):
        try:
            from service.domain.pipeline import run_training

            return run_training(training_id, worker_name=self.request.hostname)
        except Exception as e:  # failed before the domain could record it (an import error, say)
            log.exception("training %s could not run", training_id)
            trainings.fail(training_id, "worker_error", f"{type(e).__name__}: {e}")
            return trainings.status_of(training_id)


@celery_app.task(name=EXTRACT_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def extract(self, shard_id: int) -> str:
    """Compute one shard of a training's features (service.domain.extraction). Safe to deliver
    twice: the shard is claimed atomically, and what is cached already is not computed again."""
    from service.domain.extraction import run_shard

    return run_shard(int(shard_id), worker_name=self.request.hostname)


@celery_app.task(name=SUGGEST_TASK, acks_late=True, reject_on_worker_lost=True)
def suggest(dataset_id: int) -> int:
    """Suggest labels for a dataset's unlabeled images from its default version. Safe to deliver
    twice and to run beside another: each run computes only what is still missing."""
    from service.domain.suggesting import run_suggestions

    with log_context(dataset_id=dataset_id):
        return run_suggestions(int(dataset_id))


@signals.setup_logging.connect
def _setup_logging(**_: object) -> None:
    """The worker logs like the API: JSON lines in production, with request and training ids."""
    configure_logging(get_settings())


@signals.worker_process_init.connect
def _init_process(**_: object) -> None:
    """Once per worker process: tune malloc and threads, open the database."""
    from models.runtime import tune_process

    tune_process(cpu_budget(get_settings().torch_threads))  # the cgroup quota, not the node's cores
    init_db()


@signals.worker_ready.connect
def _start_sweep_loop(**_: object) -> None:
    """Every worker sweeps: trainings whose worker died (no heartbeat within the lease), queued
    trainings whose message was never confirmed sent (service.domain.trainings.sweep), the rows
    of deleted datasets (service.domain.cleanup.purge), and the stages of dead uploads, orphan
    blobs and orphan features (service.domain.cleanup.collect)."""
    settings = get_settings()
    interval = settings.training_sweep_seconds or max(5.0, settings.training_lease_seconds / 4)
    stop = threading.Event()

    def loop() -> None:
        from service.domain import cleanup
        from service.domain.trainings import sweep
        from service.store.blobs import get_store
        from service.store.db import is_unreachable, new_session, unreachable_reason
        from service.store.queue import enqueue_shard, enqueue_training, queue_depth

        while not stop.wait(interval):
            try:
                sweep(settings, enqueue_training, enqueue_shard=enqueue_shard, queue_empty=lambda: queue_depth() == 0)
                with new_session() as session:
                    cleanup.purge(session, get_store())
                    cleanup.collect(session, get_store(), settings)
            except Exception as e:
                if is_unreachable(e):  # a database outage: one line a round, not a traceback
                    log.warning("sweep skipped: the database is unreachable (%s)", unreachable_reason(e))
                else:
                    log.warning("sweep failed", exc_info=True)

    threading.Thread(target=loop, daemon=True, name="felis-sweep").start()
    signals.worker_shutdown.connect(lambda **_: stop.set(), weak=False)
