"""Liveness and readiness. /readyz says which component is ``ok`` or ``unavailable``, never why:
the error (addresses, bucket names, driver messages) goes to the log, not to whoever asks."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
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


def _database(session, request: Request) -> None:
    if not getattr(request.app.state, "database_checked", True):  # started while it was down: not checked yet
        raise RuntimeError("the schema has not been checked since the process started without the database")
    session.execute(text("SELECT 1"))


@router.get("/readyz")
def readyz(request: Request, session: SessionDep, store: StoreDep) -> JSONResponse:
    """Ready to serve: the database (its schema checked), the blob storage and the job queue all answer."""
    checks: dict[str, str] = {}
    for name, probe in (
        ("database", lambda: _database(session, request)),
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
