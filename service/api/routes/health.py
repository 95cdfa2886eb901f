"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from service.api.deps import SessionDep, StoreDep
from service.store.queue import check_broker

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
        except Exception as e:
            checks[name] = f"error: {getattr(e, 'message', None) or e}"
    ok = all(v == "ok" for v in checks.values())
    body = {"status": "ready" if ok else "not_ready", "checks": checks}
    if not ok:
        body["error"] = {"code": "not_ready", "message": "a dependency is unavailable"}
    return JSONResponse(body, status_code=200 if ok else 503)
