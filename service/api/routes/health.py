"""Liveness and readiness. /readyz says which component is ``ok`` or ``unavailable``, never why:
the error (addresses, bucket names, driver messages) goes to the log, not to whoever asks."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from service.api.deps import SessionDep, StoreDep
from service.store.queue import check_broker

log = logging.getLogger("felis.api")
router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    """The process is up and serving."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(session: SessionDep, store: StoreDep) -> JSONResponse:
    """Ready to serve: the database, the blob storage and the job queue all answer."""
    checks: dict[str, str] = {}
    for name, probe in (
        ("database", lambda: session.execute(text("SELECT 1"))),
        ("storage", store.check),
        ("broker", check_broker),
    ):
        try:
            probe()
            checks[name] = "ok"
        except Exception as e:  # any failure means not ready; the detail goes to the log, not the caller
            log.warning("readiness: the %s is unavailable: %s", name, getattr(e, "message", None) or e)
            checks[name] = "unavailable"
    ok = all(v == "ok" for v in checks.values())
    body = {"status": "ready" if ok else "not_ready", "checks": checks}
    if not ok:
        body["error"] = {"code": "not_ready", "message": "a dependency is unavailable"}
    return JSONResponse(body, status_code=200 if ok else 503)
