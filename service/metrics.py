"""Prometheus metrics: the API's ``/metrics`` and the worker's metrics server.

API (``MetricsMiddleware`` + ``router``):
  felis_http_request_duration_seconds{method,route,status}  latency, by route template (not raw path)
  felis_predictions_total{dataset,version}                   images classified
  felis_uploaded_files_total{status,reason}                  files offered: created | duplicate | rejected
  felis_queue_depth{queue}                                   trainings waiting in the broker (read at scrape)
Worker (``install_worker_metrics``; served on ``worker_metrics_port``, default 9808):
  felis_trainings_total{outcome}                             succeeded | failed | cancelled
  felis_training_duration_seconds{outcome}                   claim to final status
  felis_trainings_running                                    trainings in progress on this worker
  felis_queue_depth{queue}

The middleware also binds the request id to the logging context (see service.logs), so it is
mounted inside ``RequestIdMiddleware``. Uploads and predictions are counted from the JSON
answers of those two routes, so the routes themselves carry no metrics code.

Celery runs trainings in forked pool processes; the worker therefore uses prometheus_client's
multiprocess mode (a directory of mmapped files, ``PROMETHEUS_MULTIPROC_DIR``) and serves the
sum from its main process. Set ``PROMETHEUS_MULTIPROC_DIR`` for the API too when it runs with
several uvicorn workers, and then /metrics sums them the same way.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import (CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest, multiprocess, start_http_server, values)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.logs import bind

log = logging.getLogger("felis.metrics")

QUEUE = "gpu"  # worker.app.GPU_QUEUE (not imported: that would import Celery into every API process)
UNMATCHED = "<unmatched>"  # requests no route matched (scanners): one label, not one per path
UPLOAD_ROUTE = "/v1/datasets/{name}/images"
PREDICT_ROUTE = "/v1/datasets/{name}/predict"

HTTP_LATENCY = Histogram(
    "felis_http_request_duration_seconds", "HTTP request latency until the last body byte, by route template",
    ["method", "route", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
PREDICTIONS = Counter("felis_predictions", "Images classified, by dataset and model version", ["dataset", "version"])
UPLOADED_FILES = Counter("felis_uploaded_files", "Files offered for upload, by status and rejection reason",
                         ["status", "reason"])

# --- the API side --------------------------------------------------------------------------


class MetricsMiddleware:
    """Times each HTTP request by route template, counts uploads and predictions, binds the request id."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = (scope.get("state") or {}).get("request_id")
        if request_id:
            bind(request_id=request_id)
        start = time.perf_counter()
        status, streaming = 500, False
        captured: list[bytes] | None = None

        async def send_and_watch(message: Message) -> None:
            nonlocal status, streaming, captured
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = dict(message.get("headers") or [])
                streaming = headers.get(b"content-type", b"").startswith(b"text/event-stream")
                if _route(scope) in (UPLOAD_ROUTE, PREDICT_ROUTE) and scope["method"] == "POST":
                    captured = []
            elif message["type"] == "http.response.body" and captured is not None:
                captured.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            route = _route(scope)
            if not streaming:  # an event stream lasts as long as the training; not a latency
                HTTP_LATENCY.labels(scope["method"], route, str(status)).observe(time.perf_counter() - start)
            if captured is not None:
                _count_answer(route, scope, status, b"".join(captured))


def _route(scope: Scope) -> str:
    """The matched route's template (``/v1/datasets/{name}``), never the raw path."""
    # Newer FastAPI keeps included routers whole and records the full template here; older
    # versions copy routes with their prefixes, so the route itself has it.
    context = (scope.get("fastapi") or {}).get("effective_route_context")
    for template in (getattr(context, "path_format", None),
                     getattr(getattr(context, "starlette_route", None), "path_format", None)):
        if template:
            return template
    route = scope.get("route")
    if isinstance(route, Mount):
        return route.path.rstrip("/") + "/{path}"
    return getattr(route, "path_format", None) or UNMATCHED


def _count_answer(route: str, scope: Scope, status: int, body: bytes) -> None:
    try:
        answer = json.loads(body) if body else {}
    except ValueError:
        return
    if not isinstance(answer, dict):
        return
    if route == UPLOAD_ROUTE and status in (201, 207, 422):
        for result in answer.get("results") or []:
            status_ = str(result.get("status", "unknown"))
            UPLOADED_FILES.labels(status_, str(result.get("reason") or "") if status_ == "rejected" else "").inc()
    elif route == PREDICT_ROUTE and status == 200:
        dataset = (scope.get("path_params") or {}).get("name") or str(answer.get("dataset", ""))
        n = sum(1 for p in answer.get("predictions") or [] if "probabilities" in p)
        if n:
            PREDICTIONS.labels(dataset, str(answer.get("model_version", ""))).inc(n)


class QueueDepthCollector(Collector):
    """felis_queue_depth: messages waiting in the broker's training queue, read when scraped.
    Redis: LLEN of the queue's lists (kombu keeps one per priority step); filesystem: the message
    files in the broker's queue folder."""

    def __init__(self, queue: str = QUEUE):
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


def queue_depth(queue: str = QUEUE) -> int | None:
    from service.config import get_settings

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


REGISTRY.register(QueueDepthCollector())

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
def metrics() -> Response:
    """The Prometheus text exposition of this process (of all processes, in multiprocess mode)."""
    if _multiproc_dir():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(QueueDepthCollector())
    else:
        registry = REGISTRY
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _multiproc_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


# --- the worker side --------------------------------------------------------------------------



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
_TRAIN_TASK = "felis.train"  # worker.app.TRAIN_TASK
_owned_dir: str | None = None


def worker_metrics() -> _WorkerMetrics:
    global _worker_metrics
    if _worker_metrics is None:
        _worker_metrics = _WorkerMetrics()
    return _worker_metrics


def start_worker_metrics_server(port: int | None = None, addr: str = "0.0.0.0") -> int | None:
    """In the worker's main process, before the pool forks: switch prometheus_client to
    multiprocess mode and serve the sum over the pool on ``port`` (0 turns it off). Returns the
    port, or None when it is off or taken (a second worker on the same host: logged, not fatal)."""
    global _owned_dir
    from service.config import get_settings

    if port is None:
        port = get_settings().worker_metrics_port
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
    log.info("worker metrics on http://%s:%s/metrics", socket.gethostname(), bound)
    return bound


def stop_worker_metrics() -> None:
    """Forget the multiprocess files of a directory this module made (at worker shutdown)."""
    global _owned_dir
    if _owned_dir:
        shutil.rmtree(_owned_dir, ignore_errors=True)
        _owned_dir = None


def _on_task_prerun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    if getattr(task, "name", None) == _TRAIN_TASK and task_id:
        _task_started[task_id] = time.time()
        worker_metrics().running.inc()


def _on_task_postrun(task_id: str | None = None, task: Any = None, args: Any = None, retval: Any = None,
                     **_: Any) -> None:
    if getattr(task, "name", None) != _TRAIN_TASK or task_id not in _task_started:
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
    from service.db import session_scope
    from service.tables import Training

    try:
        with session_scope() as s:
            t = s.get(Training, training_id)
            if t is None or t.status not in ("succeeded", "failed", "cancelled") or t.started_at is None:
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
