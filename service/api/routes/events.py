"""GET /v1/trainings/{id}/events: a training's progress as server-sent events.

Each event's ``data`` is the same JSON as GET /v1/trainings/{id}. One is sent at once, then one
whenever the training changes (the worker writes progress at most twice a second), and the
stream ends after the event with a final status. A comment line every 15 s keeps proxies from
closing an idle stream. Browsers: EventSource, or fetch() when an Authorization header is needed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import TypeAdapter
from starlette.concurrency import run_in_threadpool

from service.api.deps import SessionDep
from service.domain import trainings
from service.errors import NotFound
from service.store.db import session_scope

router = APIRouter(tags=["trainings"])

_AS_JSON = TypeAdapter(dict)
POLL_SECONDS = 0.5  # how often the stream looks at the training row
KEEPALIVE_SECONDS = 15.0


def _snapshot(training_id: str) -> dict:
    with session_scope() as s:
        # the same serializer FastAPI uses for GET /v1/trainings/{id}, so both read alike
        return _AS_JSON.dump_python(trainings.describe(s, trainings.get(s, training_id)), mode="json")


async def _stream(request: Request, first: dict, training_id: str) -> AsyncIterator[str]:
    yield "retry: 2000\n\n"
    current, sent_at, n = first, time.monotonic(), 0
    previous = None
    while True:
        if current != previous:
            n += 1
            yield f"id: {n}\ndata: {json.dumps(current, separators=(',', ':'))}\n\n"
            previous, sent_at = current, time.monotonic()
            if current["status"] in trainings.FINAL:
                return
        elif time.monotonic() - sent_at >= KEEPALIVE_SECONDS:
            yield ": keep-alive\n\n"
            sent_at = time.monotonic()
        await asyncio.sleep(POLL_SECONDS)
        if await request.is_disconnected():
            return
        try:
            current = await run_in_threadpool(_snapshot, training_id)
        except NotFound:  # deleted with its dataset while we watched
            return


@router.get("/trainings/{training_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "the training (as GET /v1/trainings/{id}) each time it changes"}})
def training_events(training_id: str, request: Request, session: SessionDep) -> StreamingResponse:
    first = _AS_JSON.dump_python(trainings.describe(session, trainings.get(session, training_id)), mode="json")  # 404 up front
    # The stream can last as long as the training: hand the request's database connection back
    # now (the stream opens a short session per look) instead of holding it until the stream ends.
    session.close()
    return StreamingResponse(_stream(request, first, training_id), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
