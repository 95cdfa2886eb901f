"""The FastAPI app: wiring only. Models load in the lifespan, never at import."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from contextlib import asynccontextmanager, suppress

from fastapi import APIRouter, FastAPI
from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool

from models.malloc import keep_freed_memory
from service.api import errors
from service.api.auth import KnownKeys, bootstrap_admin_key, make_limiters
from service.api.customvision import content as cv_content
from service.api.customvision import prediction as cv_prediction
from service.api.customvision import training as cv_training
from service.api.guards import RequestGuardMiddleware
from service.api.metrics import MetricsMiddleware
from service.api.metrics import router as metrics_router
from service.api.middleware import (
    BodySizeLimitMiddleware,
    InflightLimitMiddleware,
    RequestIdMiddleware,
)
from service.api.routes import (
    console,
    datasets,
    events,
    health,
    images,
    keys,
    label_issues,
    models,
    oip,
    predict,
    suggestions,
    trainings,
)
from service.config import get_settings
from service.serving.cache import ModelCache
from service.store.blobs import LocalBlobStore, get_store
from service.store.db import init_db

log = logging.getLogger("felis.api")


def _database_ready(app: FastAPI) -> None:
    """The schema is this code's (embedded: migrated), and the admin key exists if one is configured."""
    init_db()
    bootstrap_admin_key(get_settings())
    app.state.database_checked = True


async def _wait_for_database(app: FastAPI) -> None:
    """Started without the metadata store: check it again every few seconds until it answers; a
    schema that is not this code's then stops the process, as it would have at start."""
    delay = 0.5
    while True:
        await asyncio.sleep(delay)
        try:
            await run_in_threadpool(_database_ready, app)
        except OperationalError:
            delay = min(delay * 2, 5.0)
            continue
        except Exception:
            log.exception("the metadata store answers, but this process cannot use it: stopping")
            os.kill(os.getpid(), signal.SIGTERM)
            return
        log.info("the metadata store answers again: ready")
        return


@asynccontextmanager
async def lifespan(app: FastAPI):
    # before any model is loaded: ~2x faster inference here; two heaps and 64 MB of slack keep
    # the process small under many concurrent requests
    keep_freed_memory(max_arenas=2, keep_bytes=64 << 20)
    waiting = None
    try:
        _database_ready(app)
    except OperationalError as e:  # PostgreSQL down or unreachable: serve (live, not ready), as when it goes away later
        log.error("the metadata store is unavailable at start (%s): serving 503 database_unavailable and "
                  "/readyz not ready until it answers", str(e).splitlines()[0][:300])
        app.state.database_checked = False
        waiting = asyncio.create_task(_wait_for_database(app))
    store = get_store()
    if isinstance(store, LocalBlobStore):
        store.sweep_temp()
    app.state.models = ModelCache(store, get_settings())
    log.info(app.state.limiters.describe())  # shared through Redis, or per process
    await app.state.limiters.probe()  # Redis unreachable now: said now, not at the first request
    yield
    if waiting is not None:
        waiting.cancel()
        with suppress(asyncio.CancelledError):
            await waiting
    app.state.models.close()
    await app.state.limiters.close()


def create_app() -> FastAPI:
    settings = get_settings()
    app = FastAPI(title="felis", version="0.1.0", lifespan=lifespan,
                  description="Upload labeled images, train on a worker, predict over HTTP.")
    app.state.limiters = make_limiters(settings)  # rate limits: through Redis when configured, else per process
    app.state.known_keys = KnownKeys()  # keys checked lately: still taken while the database is down
    # what each route requires (scope, rate limit, metrics) is declared on the route: service.api.auth
    v1 = APIRouter(prefix="/v1", responses=errors.ERROR_RESPONSES)
    for router in (datasets.router, images.router, label_issues.router, suggestions.router, trainings.router, events.router,
                   models.router, predict.router, keys.router):
        v1.include_router(router)
    app.include_router(v1)
    app.include_router(oip.router)  # /v2: the Open Inference Protocol (KServe v2), beside /v1
    for router in (cv_training.router, cv_prediction.router, cv_content.router):  # /customvision: Azure Custom Vision's API
        app.include_router(router)
    app.include_router(health.router)
    app.include_router(metrics_router)
    app.include_router(console.router)
    errors.install(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(InflightLimitMiddleware, max_requests=settings.max_inflight_requests,
                       max_streams=settings.max_event_streams)  # past a cap: 503 before the body is read
    app.add_middleware(RequestGuardMiddleware, settings=settings)  # other sites' pages, foreign Hosts: 403
    app.add_middleware(MetricsMiddleware)  # inside RequestIdMiddleware: it logs with the request id
    app.add_middleware(RequestIdMiddleware)
    return app
