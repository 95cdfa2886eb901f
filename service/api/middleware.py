"""ASGI middleware: request ids, the request body size limit and the per-process in-flight caps."""

from __future__ import annotations

import enum
import os
import random
from collections.abc import Iterable
from typing import Any, ClassVar

from fastapi import Depends, params
from fastapi.routing import iter_route_contexts
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import refusal


_ids = random.Random(os.urandom(32))  # request ids need to be unique, not secret
os.register_at_fork(after_in_child=lambda: _ids.seed(os.urandom(32)))


def new_request_id() -> str:
    """32 random hex digits, without a system call per request (uuid4 reads os.urandom each time,
    and every system call on the event loop's thread gives the GIL away to a decode thread)."""
    return f"{_ids.getrandbits(128):032x}"


class RequestIdMiddleware:
    """Takes X-Request-ID from the caller (or makes one), exposes it and echoes it back."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or new_request_id()
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"x-request-id", rid.encode("latin-1")))
            await send(message)

        await self.app(scope, receive, send_with_id)


SMALL_BODY_BYTES = 64 * 1024  # the body of a route that declares no BodyLimit: JSON of a few fields


def BodyLimit(max_bytes: int | None = None) -> params.Depends:  # noqa: N802
    """What a route lists to take a body over SMALL_BODY_BYTES: ``max_bytes``, or None for
    FELIS_MAX_REQUEST_BYTES (uploads, predictions)::

        @router.post("/datasets/{name}/images", dependencies=[Requires(...), BodyLimit()])

    Every other route takes at most SMALL_BODY_BYTES. FastAPI reads and parses a route's JSON body
    before its dependencies run, the key check included, so the limit cannot wait for the route:
    BodySizeLimitMiddleware reads the marker off the app's routes and refuses the body first."""
    async def body_limit() -> None:
        return None

    body_limit.body_limit = max_bytes or 0  # type: ignore[attr-defined]  # 0: FELIS_MAX_REQUEST_BYTES
    return Depends(body_limit)


def _declared(routes: Iterable[BaseRoute], marker: str) -> list[tuple[Any, Any]]:
    """The app's routes (included routers' too) whose dependencies carry ``marker``, with its value."""
    out = []
    for route in iter_route_contexts(list(routes)):
        dependant = getattr(route, "dependant", None)
        for sub in dependant.dependencies if dependant is not None else ():
            value = getattr(sub.call, marker, None)
            if value is not None:
                out.append((route, value))
    return out


class BodySizeLimitMiddleware:
    """413 for a body over its route's limit (``BodyLimit``; SMALL_BODY_BYTES where the route
    declares none; none over FELIS_MAX_REQUEST_BYTES), by Content-Length up front or by counting
    a chunked one. Only a body past SMALL_BODY_BYTES looks its route up (a few regex matches over the routes that declare one)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes
        self.least = min(SMALL_BODY_BYTES, max_bytes)  # what every route takes
        self._large: list[tuple[Any, int]] | None = None  # read off the app at its first large body

    def limit(self, scope: Scope) -> int:
        if self._large is None:
            self._large = [(route, n or self.max_bytes)
                           for route, n in _declared(scope["app"].routes if "app" in scope else (), "body_limit")]
        for route, n in self._large:
            if route.matches(scope)[0] is Match.FULL:
                return min(n, self.max_bytes)
        return self.least

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        limit: int | None = None  # the route's, once the body is past what every route takes
        if length is not None and length.isdigit() and int(length) > self.least:
            limit = self.limit(scope)
            if int(length) > limit:
                return await _too_large(scope, receive, send, limit)
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen, limit
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.least:
                    if limit is None:
                        limit = self.limit(scope)
                    if seen > limit:  # handled by the app's HTTPException handler
                        raise HTTPException(413, f"the request body is over the limit of {limit} bytes for this route")
            return message

        await self.app(scope, limited_receive, send)


class Capped(str, enum.Enum):
    """The in-flight caps a route may count against (declared on the route with ``InFlight``)."""

    REQUESTS = "requests"  # bodies and decoded images held in memory: predict, upload
    STREAMS = "streams"  # connections held as long as a training runs: event streams


def InFlight(cap: Capped) -> params.Depends:  # noqa: N802
    """What a route lists to count against a per-process in-flight cap::

        @router.post("/datasets/{name}/predict", dependencies=[Requires(...), InFlight(Capped.REQUESTS)])

    The dependency does nothing when the route runs: InflightLimitMiddleware reads the marker off
    the app's routes and takes the slot before the route runs, before its body is read."""
    async def in_flight() -> None:
        return None

    in_flight.in_flight = Capped(cap)  # type: ignore[attr-defined]
    return Depends(in_flight)


def capped_routes(routes: Iterable[BaseRoute]) -> list[tuple[Any, Capped]]:
    """The app's routes (included routers' too) that declare an in-flight cap, with theirs."""
    return _declared(routes, "in_flight")


class InflightLimitMiddleware:
    """Per-process caps on requests in progress: past one, 503 with Retry-After at once, before
    the body is read, instead of a queue that grows until the process runs out of memory.

    Which requests count is declared on their routes (``InFlight``). Upload and predict requests
    share one cap (``FELIS_MAX_INFLIGHT_REQUESTS``); training event streams, which last as long as
    a training, have their own (``FELIS_MAX_EVENT_STREAMS``). A slot is held until the response is
    sent (or the client goes away). 0 turns a cap off."""

    RETRY_AFTER: ClassVar[dict[Capped, int]] = {Capped.REQUESTS: 1, Capped.STREAMS: 5}  # seconds

    def __init__(self, app: ASGIApp, max_requests: int, max_streams: int):
        self.app = app
        self.limits = {Capped.REQUESTS: max_requests, Capped.STREAMS: max_streams}
        self.in_flight = {Capped.REQUESTS: 0, Capped.STREAMS: 0}  # one event loop per process: no lock needed
        self._capped: list[tuple[Any, Capped]] | None = None  # read off the app at its first request

    def kind(self, scope: Scope) -> Capped | None:
        """The cap the request's route declares, if any (a few regex matches: only capped routes are tried)."""
        if self._capped is None:
            self._capped = capped_routes(scope["app"].routes) if "app" in scope else []
        for route, cap in self._capped:
            if route.matches(scope)[0] is Match.FULL:
                return cap
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = self.kind(scope) if scope["type"] == "http" else None
        if kind is None or self.limits[kind] <= 0:
            return await self.app(scope, receive, send)
        if self.in_flight[kind] >= self.limits[kind]:
            return await _busy(scope, receive, send, kind, self.limits[kind], self.RETRY_AFTER[kind])
        self.in_flight[kind] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight[kind] -= 1


async def _busy(scope: Scope, receive: Receive, send: Send, kind: Capped, limit: int, retry_after: int) -> None:
    if kind is Capped.STREAMS:
        code, message = "too_many_streams", (f"this server already streams {limit} trainings' events "
                                              f"(FELIS_MAX_EVENT_STREAMS); retry later or poll GET /v1/trainings/{{id}}")
    else:
        code, message = "server_busy", (f"this server already has {limit} upload and predict requests in progress "
                                        f"(FELIS_MAX_INFLIGHT_REQUESTS); retry in a moment")
    await refusal(scope, 503, code, message, {"Retry-After": str(retry_after)})(scope, receive, send)


async def _too_large(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
    message = f"the request body is over the limit of {limit} bytes for this route"
    await refusal(scope, 413, "request_too_large", message)(scope, receive, send)
