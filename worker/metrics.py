"""The worker's Prometheus metrics, served on ``worker_metrics_host``:``worker_metrics_port`` (default
127.0.0.1:9808 in embedded mode, 0.0.0.0:9808 in production):

  felis_trainings_total{outcome}                             succeeded | failed | cancelled
  felis_training_duration_seconds{outcome}                   claim to final status
  felis_trainings_running                                    trainings in progress on this worker
  felis_queue_depth{queue}                                   trainings waiting in the broker

Celery runs trainings in forked pool processes; the worker therefore uses prometheus_client's
multiprocess mode (a directory of mmapped files, ``PROMETHEUS_MULTIPROC_DIR``) and serves the
sum from its main process. ``install_worker_metrics`` connects it all to Celery's signals.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
from datetime import datetime, timezone
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
    values,
)

from service.store.queue import TRAIN_TASK, QueueDepthCollector

log = logging.getLogger("felis.metrics")


def _multiproc_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


class _WorkerMetrics:
    """Made after multiprocess mode is on, in whichever process first needs them."""

    def __init__(self) -> None:
        self.trainings = Counter("felis_trainings", "Trainings this worker ran to a final status, by outcome",
                                 ["outcome"], registry=None)
        self.duration = Histogram("felis_training_duration_seconds", "Training time from claim to final status",
                                  ["outcome"], registry=None,
                                  buckets=(10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400))
        self.running = Gauge("felis_trainings_running", "Trainings in progress", registry=None,
                             multiprocess_mode="livesum")


_worker_metrics: _WorkerMetrics | None = None
_task_started: dict[str, float] = {}
_owned_dir: str | None = None


def worker_metrics() -> _WorkerMetrics:
    global _worker_metrics
    if _worker_metrics is None:
        _worker_metrics = _WorkerMetrics()
    return _worker_metrics


def start_worker_metrics_server(port: int | None = None, addr: str | None = None) -> int | None:
    """In the worker's main process, before the pool forks: switch prometheus_client to
    multiprocess mode and serve the sum over the pool on ``addr``:``port`` (default
    ``worker_metrics_host``: loopback in embedded mode, every interface in production so that
    Prometheus can scrape it; port 0 turns it off). Returns the port, or None when it is off or
    taken (a second worker on the same host: logged, not fatal)."""
    global _owned_dir
    from service.config import get_settings

    if port is None:
        port = get_settings().worker_metrics_port
    if addr is None:
        addr = get_settings().worker_metrics_host
    if not port:
        return None
    if not _multiproc_dir():
        _owned_dir = tempfile.mkdtemp(prefix="felis-worker-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = _owned_dir
    values.ValueClass = values.get_value_class()  # prometheus_client may have been imported already
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(QueueDepthCollector())
    try:
        server, _thread = start_http_server(port, addr=addr, registry=registry)
    except OSError as e:
        log.warning("worker metrics: cannot listen on port %s (%s); metrics server off", port, e)
        return None
    bound = server.server_address[1]
    log.info("worker metrics on http://%s:%s/metrics", addr if addr not in ("", "0.0.0.0", "::") else socket.gethostname(),
             bound)
    return bound


def stop_worker_metrics() -> None:
    """Forget the multiprocess files of a directory this module made (at worker shutdown)."""
    global _owned_dir
    if _owned_dir:
        shutil.rmtree(_owned_dir, ignore_errors=True)
        _owned_dir = None


def _on_task_prerun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    if getattr(task, "name", None) == TRAIN_TASK and task_id:
        _task_started[task_id] = time.time()
        worker_metrics().running.inc()


def _on_task_postrun(task_id: str | None = None, task: Any = None, args: Any = None, retval: Any = None,
                     **_: Any) -> None:
    if getattr(task, "name", None) != TRAIN_TASK or task_id not in _task_started:
        return
    started = _task_started.pop(task_id)
    metrics = worker_metrics()
    metrics.running.dec()
    training_id = args[0] if args else None
    if training_id:
        record_training(training_id, started)


def record_training(training_id: str, not_before: float) -> None:
    """Count a training that reached a final status, if this process is the one that ran it
    (a redelivered message for a finished training is not counted twice)."""
    from service.domain import trainings
    from service.store.db import session_scope
    from service.store.tables import Training

    try:
        with session_scope() as s:
            t = s.get(Training, training_id)
            if t is None or not trainings.is_final(t.status) or t.started_at is None:
                return
            started, finished = _epoch(t.started_at), _epoch(t.finished_at) if t.finished_at else time.time()
            outcome = t.status
    except Exception:
        log.warning("could not record metrics for training %s", training_id, exc_info=True)
        return
    if started < not_before - 2.0:  # claimed before this task started: another run's work
        return
    metrics = worker_metrics()
    metrics.trainings.labels(outcome).inc()
    metrics.duration.labels(outcome).observe(max(0.0, finished - started))


def _epoch(ts: datetime) -> float:
    return (ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)).timestamp()


def _on_child_exit(pid: int | None = None, **_: Any) -> None:
    if _multiproc_dir():
        multiprocess.mark_process_dead(pid or os.getpid())


def install_worker_metrics() -> None:
    """Connect the worker metrics to Celery's signals; call once where the worker loads its tasks."""
    from celery import signals

    signals.worker_init.connect(lambda **_: start_worker_metrics_server(), weak=False)
    signals.worker_shutdown.connect(lambda **_: stop_worker_metrics(), weak=False)
    signals.task_prerun.connect(_on_task_prerun, weak=False)
    signals.task_postrun.connect(_on_task_postrun, weak=False)
    signals.worker_process_shutdown.connect(_on_child_exit, weak=False)
