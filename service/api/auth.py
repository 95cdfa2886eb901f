"""Who may call: API keys (Bearer or X-API-Key) with scopes, and per-caller rate limits.

Reads (GET) and predict need the ``predict`` scope; everything that changes state needs ``write``.
Keys are required when ``FELIS_API_KEYS_REQUIRED`` (on in production mode); a key that is sent
is always checked."""

from __future__ import annotations

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from service.api.deps import SettingsDep
from service.api.ratelimit import RateLimiter
from service.config import Settings
from service.domain import keys
from service.errors import Unauthorized
from service.store.db import session_scope


def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    return request.headers.get("x-api-key") or None


def _scope_for(request: Request) -> str:
    if request.method in ("GET", "HEAD", "OPTIONS") or request.url.path.endswith("/predict"):
        return "predict"
    return "write"


def make_limiters(settings: Settings) -> dict[str, RateLimiter]:
    return {"predict": RateLimiter(settings.rate_limit_predict_per_minute),
            "upload": RateLimiter(settings.rate_limit_upload_per_minute)}


def _check_key(key: str, scope: str) -> str:
    """The key's id when it is valid and grants `scope` (one database read)."""
    with session_scope() as session:
        row = keys.authenticate(session, key)
        keys.authorize(row, scope)
        return row.id


async def authorize_request(request: Request, settings: SettingsDep) -> None:
    """On the event loop: a request without a key costs no thread hop and no database read."""
    key = _presented_key(request)
    caller = request.client.host if request.client else "unknown"
    if key:
        request.state.api_key_id = caller = await run_in_threadpool(_check_key, key, _scope_for(request))
    elif settings.api_keys_required:
        raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>'", code="api_key_required")
    path = request.url.path
    if request.method == "POST" and path.endswith("/predict"):
        request.app.state.limiters["predict"].take(caller)
    elif request.method == "POST" and path.endswith("/images"):
        request.app.state.limiters["upload"].take(caller)
