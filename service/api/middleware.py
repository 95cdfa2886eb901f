"""ASGI middleware: request ids, the request body size limit and the per-process in-flight caps."""

from __future__ import annotations

import json
import re
import uuid
from typing import ClassVar

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class RequestIdMiddleware:
    """Takes X-Request-ID from the caller (or makes one), exposes it and echoes it back."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"x-request-id", rid.encode("latin-1")))
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodySizeLimitMiddleware:
    """413 for a body over the limit, by Content-Length up front or by counting a chunked one."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _too_large(send, self.max_bytes)
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # handled by the app's HTTPException handler
                    raise HTTPException(413, f"the request body is over the limit of {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)


# The requests that hold memory (bodies, decoded images) or a connection for long.
_BODY_ROUTES = re.compile(r"^/v1/datasets/[^/]+/(?:images|predict)$")  # POST: upload, predict
_STREAM_ROUTES = re.compile(r"^/v1/trainings/[^/]+/events$")  # GET: server-sent events


class InflightLimitMiddleware:
    """Per-process caps on requests in progress: past one, 503 with Retry-After at once, before
    the body is read, instead of a queue that grows until the process runs out of memory.

    Upload and predict requests share one cap (``FELIS_MAX_INFLIGHT_REQUESTS``); training event
    streams, which last as long as a training, have their own (``FELIS_MAX_EVENT_STREAMS``). A
    slot is held until the response is sent (or the client goes away). 0 turns a cap off."""

    RETRY_AFTER: ClassVar[dict[str, int]] = {"requests": 1, "streams": 5}  # seconds

    def __init__(self, app: ASGIApp, max_requests: int, max_streams: int):
        self.app = app
        self.limits = {"requests": max_requests, "streams": max_streams}
        self.in_flight = {"requests": 0, "streams": 0}  # one event loop per process: no lock needed

    @staticmethod
    def kind(scope: Scope) -> str | None:
        method, path = scope.get("method"), scope.get("path", "")
        if method == "POST" and _BODY_ROUTES.match(path):
            return "requests"
        if method in ("GET", "HEAD") and _STREAM_ROUTES.match(path):
            return "streams"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = self.kind(scope) if scope["type"] == "http" else None
        if kind is None or self.limits[kind] <= 0:
            return await self.app(scope, receive, send)
        if self.in_flight[kind] >= self.limits[kind]:
            return await _busy(send, kind, self.limits[kind], self.RETRY_AFTER[kind])
        self.in_flight[kind] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight[kind] -= 1


async def _busy(send: Send, kind: str, limit: int, retry_after: int) -> None:
    if kind == "streams":
        code, message = "too_many_streams", (f"this server already streams {limit} trainings' events "
                                              f"(FELIS_MAX_EVENT_STREAMS); retry later or poll GET /v1/trainings/{{id}}")
    else:
        code, message = "server_busy", (f"this server already has {limit} upload and predict requests in progress "
                                        f"(FELIS_MAX_INFLIGHT_REQUESTS); retry in a moment")
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", str(retry_after).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _too_large(send: Send, limit: int) -> None:
    body = json.dumps({"error": {"code": "request_too_large",
                                 "message": f"the request body is over the limit of {limit} bytes"}}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
