"""Every error leaves the API as ``{"error": {"code": "...", "message": "..."}}``; domain errors
are mapped to HTTP status codes here and nowhere else."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute, iter_route_contexts
from pydantic import BaseModel
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import Scope

from service import errors as e

log = logging.getLogger("felis.api")

class ErrorDetail(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# Documented on every /v1 operation, so clients (and schemathesis) know every answer's shape.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (400, "malformed request body"), (401, "no or an invalid API key"), (403, "the key lacks the scope"), (404, "not found"),
        (409, "conflicts with the current state"), (413, "request too large"), (422, "invalid request"),
        (429, "rate limited, or too many unfinished trainings"), (503, "a dependency is unavailable"), (507, "storage is full"),
    )
}

STATUS: dict[type[e.FelisError], int] = {
    e.InvalidRequest: 422,
    e.NotFound: 404,
    e.AlreadyExists: 409,
    e.Conflict: 409,
    e.TooLarge: 413,
    e.Unauthorized: 401,
    e.Forbidden: 403,
    e.RateLimited: 429,
    e.TooMany: 429,
    e.StorageFull: 507,
    e.Unavailable: 503,
}


def error_body(code: str, message: str, details: Any = None, **extra: Any) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        err["details"] = details
    return {"error": err, **extra}


def refusal(scope: Scope, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    """A refusal made by a middleware before any route runs (a body over the limit, a full in-flight
    cap, a Host this server does not answer for, another site's page), in the error form of the API
    the request was for: the route that would have answered renders it when its class says how
    (a ProtocolRoute's ``render_error(status, code, message, headers)``: /v2's, Custom Vision's), else
    felis's form. Only refused requests look the route up."""
    for route in iter_route_contexts(list(getattr(scope.get("app"), "routes", ()))):
        render = getattr(route.original_route, "render_error", None)
        if render is not None and route.matches(scope)[0] is not Match.NONE:
            return render(status, code, message, headers)
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def status_for(exc: e.FelisError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 400


def headers_for(exc: e.FelisError) -> dict[str, str]:
    """The headers that go with a domain error's status (also for the OIP routes' error bodies)."""
    headers = {}
    if isinstance(exc, e.RateLimited):
        headers["Retry-After"] = str(max(1, int(exc.retry_after + 0.999)))
    if isinstance(exc, e.Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return headers


class ProtocolRoute(APIRoute):
    """The route class of an API with an error form of its own (/v2's, Custom Vision's): every error
    of its routes and of their dependencies (the key check) leaves through ``render_error``, as do
    the middlewares' refusals (refusal() above). Statuses and headers stay this module's; a
    subclass says only how a body looks (``render_error``, and ``render_domain`` where a domain
    error's code is not enough) and how a request the schema refuses is answered."""

    validation_status: ClassVar[int] = 422
    validation_loc_skips: ClassVar[tuple[str, ...]] = ("body",)  # parts of an error's loc not worth naming

    @staticmethod
    def render_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
        raise NotImplementedError

    @classmethod
    def render_domain(cls, exc: e.FelisError) -> Response:
        return cls.render_error(status_for(exc), exc.code, exc.message, headers_for(exc))

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler, cls = super().get_route_handler(), type(self)

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except e.FelisError as exc:
                return cls.render_domain(exc)
            except RequestValidationError as exc:
                return cls.render_error(cls.validation_status, "validation_error",
                                        validation_message(exc.errors(), request.headers.get("content-type"), cls.validation_loc_skips))
            except StarletteHTTPException as exc:  # e.g. the body over FELIS_MAX_REQUEST_BYTES, counted while read
                code = "request_too_large" if exc.status_code == 413 else "http_error"
                return cls.render_error(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))
            except OperationalError as exc:  # the metadata store is down: clients may retry
                log.error("database error: %s", exc)
                return cls.render_error(503, "database_unavailable", "the metadata store is unavailable")
            except ClientDisconnect:
                _log_gone(request)
                return cls.render_error(CLIENT_GONE, "client_disconnected", CLIENT_GONE_MESSAGE)
            except Exception:
                log.exception("unhandled error")
                return cls.render_error(500, "internal_error", "an unexpected error occurred")

        return handle


async def _felis_error(_: Request, exc: e.FelisError) -> JSONResponse:
    return JSONResponse(error_body(exc.code, exc.message, exc.details), status_code=status_for(exc),
                        headers=headers_for(exc))


def validation_message(errors: list[dict], content_type: str | None, skips: tuple[str, ...] = ("body",)) -> str:
    """The first error of a request the schema refused, as one line that says what to change:
    where it is and pydantic's words, or, for a body that is no JSON object, why (not JSON at
    all and where it breaks; sent as another content type, which is never parsed)."""
    first = (errors or [{}])[0]
    loc, kind = tuple(first.get("loc", ())), first.get("type")
    if kind == "json_invalid":
        at = f" at character {loc[1]}" if len(loc) > 1 else ""
        return f"body: not valid JSON{at} ({(first.get('ctx') or {}).get('error', 'JSON decode error')})"
    if loc == ("body",) and kind in ("model_attributes_type", "dict_type", "list_type", "missing"):
        media = (content_type or "").split(";")[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            return f"body: send JSON with 'Content-Type: application/json' (this request's: {media or 'none'})"
        return "body: a JSON object is required" if kind != "list_type" else "body: a JSON array is required"
    where = ".".join(str(x) for x in loc if x not in skips)
    given = first.get("input")
    if isinstance(given, float) and not math.isfinite(given):  # JSON's NaN, Infinity, 1e999: over and under every bound
        return f"{where or 'request'}: must be a finite number, not {'NaN' if math.isnan(given) else given}"
    return f"{where or 'request'}: {first.get('msg', 'invalid request')}"


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    details = [{"loc": list(err.get("loc", ())), "message": err.get("msg", "")} for err in exc.errors()]
    return JSONResponse(error_body("validation_error", validation_message(exc.errors(), request.headers.get("content-type")), details),
                        status_code=422)


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {400: "malformed_body", 404: "not_found", 405: "method_not_allowed",
            413: "request_too_large"}.get(exc.status_code, "http_error")
    return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def _database_down(_: Request, exc: OperationalError) -> JSONResponse:
    log.error("database error: %s", exc)
    return JSONResponse(error_body("database_unavailable", "the metadata store is unavailable"), status_code=503)


CLIENT_GONE = 499  # nginx's 'client closed request': no one reads it, but logs and metrics see no 5xx
CLIENT_GONE_MESSAGE = "the client disconnected before its request was read"


def _log_gone(request: Request) -> None:
    log.info("%s %s: the client disconnected before its request was read", request.method, request.url.path)


async def _client_gone(request: Request, _: ClientDisconnect) -> JSONResponse:
    """A client that went away mid-body (an interrupted upload, curl -m): its doing, not a fault."""
    _log_gone(request)
    return JSONResponse(error_body("client_disconnected", CLIENT_GONE_MESSAGE), status_code=CLIENT_GONE)


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return JSONResponse(error_body("internal_error", "an unexpected error occurred"), status_code=500)


def install(app: FastAPI) -> None:
    app.add_exception_handler(e.FelisError, _felis_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(OperationalError, _database_down)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _unexpected)
