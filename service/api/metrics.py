"""The API's Prometheus metrics: ``MetricsMiddleware`` and the ``/metrics`` route.

  felis_http_request_duration_seconds{method,route,status}  latency, by route template (not raw path)
  felis_predictions_total{dataset,version}                   images classified
  felis_uploaded_files_total{status,reason}                  files offered: created | duplicate | rejected
  felis_queue_depth{queue}                                   trainings waiting in the broker (read at scrape)

The worker's metrics are in ``worker.metrics``. The middleware also binds the request id to the
logging context (see service.logs), so it is mounted inside ``RequestIdMiddleware``. Uploads and
predictions are counted from the JSON answers of the routes that declare it, where they are
declared: ``dependencies=[Counts(count_uploads)]``; the routes' bodies carry no metrics code.
/metrics needs an admin key for every dataset when keys are required (its labels name datasets).

Set ``PROMETHEUS_MULTIPROC_DIR`` when the API runs with several uvicorn workers; /metrics then
sums them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from fastapi import APIRouter, Depends, Request, Response, params
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.auth import Requires
from service.domain.keys import Scope as KeyScope
from service.logs import bind
from service.store.queue import QueueDepthCollector

UNMATCHED = "<unmatched>"  # requests no route matched (scanners): one label, not one per path
_COUNTER = "metrics_counter"  # request.state: the counter the route declared (Counts)

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
        json_length: int | None = None  # an Open Inference Protocol answer with binary data: its JSON's length

        async def send_and_watch(message: Message) -> None:
            nonlocal status, streaming, captured, json_length
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = dict(message.get("headers") or [])
                value = headers.get(b"inference-header-content-length", b"")
                json_length = int(value) if value.isdigit() else None
                streaming = headers.get(b"content-type", b"").startswith(b"text/event-stream")
                if _counter(scope) is not None:
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
            counter = _counter(scope)
            if captured is not None and counter is not None:
                answer = _json_object(b"".join(captured)[:json_length])
                if answer is not None:
                    counter(scope, status, answer)


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


# --- what routes count: declared on the route --------------------------------------------------

AnswerCounter = Callable[[Scope, int, dict[str, Any]], None]  # (the request's scope, status, the JSON answer)


def count_uploads(scope: Scope, status: int, answer: dict[str, Any]) -> None:
    """felis_uploaded_files_total from an upload's per-file report."""
    if status in (201, 207, 422):
        for result in answer.get("results") or []:
            status_ = str(result.get("status", "unknown"))
            UPLOADED_FILES.labels(status_, str(result.get("reason") or "") if status_ == "rejected" else "").inc()


def count_predictions(scope: Scope, status: int, answer: dict[str, Any]) -> None:
    """felis_predictions_total from a predict answer: the images that got probabilities."""
    if status == 200:
        dataset = (scope.get("path_params") or {}).get("name") or str(answer.get("dataset", ""))
        n = sum(1 for p in answer.get("predictions") or [] if isinstance(p, dict) and "probabilities" in p)
        if n:
            PREDICTIONS.labels(dataset, str(answer.get("model_version", ""))).inc(n)


def Counts(counter: AnswerCounter) -> params.Depends:  # noqa: N802
    """The dependency a route lists so that MetricsMiddleware feeds its JSON answers to ``counter``."""

    async def declare(request: Request) -> None:
        setattr(request.state, _COUNTER, counter)

    declare.counter = counter  # type: ignore[attr-defined]
    return Depends(declare)


def _counter(scope: Scope) -> AnswerCounter | None:
    return (scope.get("state") or {}).get(_COUNTER)


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        answer = json.loads(body) if body else {}
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


router = APIRouter(tags=["metrics"], dependencies=[Requires(KeyScope.ADMIN, every_dataset=True)])


@router.get("/metrics", include_in_schema=False)
def metrics() -> Response:
    """The Prometheus text exposition of this process (of all processes, in multiprocess mode)."""
    if _multiproc_dir():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    body = generate_latest(registry) + generate_latest(_queue_registry())
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@lru_cache
def _queue_registry() -> CollectorRegistry:
    """The queue depth, read from the broker at each scrape (made on the first scrape, not at import)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(QueueDepthCollector())
    return registry


def _multiproc_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")
