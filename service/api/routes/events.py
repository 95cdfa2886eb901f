"""GET /v1/trainings/{id}/events: a training's progress as server-sent events.

Each event's ``data`` is the same JSON as GET /v1/trainings/{id}. One is sent at once, then one
whenever the training changes (the worker writes progress at most twice a second), and the
stream ends after the event with a final status. A comment line every 15 s keeps proxies from
closing an idle stream. A stream whose key is revoked ends within KEY_CHECK_SECONDS of its next
event or keep-alive. Browsers: EventSource, or fetch() when an Authorization header is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import TypeAdapter
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import State

from service.api.auth import InTraining, Requires
from service.api.deps import CallerDep, SessionDep
from service.api.middleware import Capped, InFlight
from service.domain import keys, trainings
from service.domain.keys import Scope
from service.errors import NotFound
from service.store.db import session_scope

log = logging.getLogger("felis.api")
router = APIRouter(tags=["trainings"])

_AS_JSON = TypeAdapter(dict)
POLL_SECONDS = 0.5  # how often this process looks at a watched training's row (once for all its streams)
KEEPALIVE_SECONDS = 15.0
KEY_CHECK_SECONDS = 2.0  # a stream's key is looked at again before an event or keep-alive this long after the last look


def _key_still_valid(key_id: str) -> bool:
    with session_scope() as s:
        return keys.still_valid(s, key_id)


def _snapshot(training_id: str) -> dict:
    with session_scope() as s:
        # the same serializer FastAPI uses for GET /v1/trainings/{id}, so both read alike
        return _AS_JSON.dump_python(trainings.describe(s, trainings.get(s, training_id)), mode="json")


class _Watch:
    """One training as this process last read it, polled by one task for every stream that follows
    it: the database sees one look per POLL_SECONDS per training, however many streams watch."""

    def __init__(self, training_id: str, snapshot: dict, read_at: float):
        self.training_id = training_id
        # read_at: when the latest read that found `snapshot` began; a read that begins after an
        # earlier read ended sees at least what that one saw
        self.snapshot, self.read_at = snapshot, read_at
        self.gone = False  # deleted (with its dataset)
        self.followers = 0
        self.changed = asyncio.Event()  # set, and replaced, at each change
        self.task: asyncio.Task | None = None

    @property
    def finished(self) -> bool:
        return self.gone or self.snapshot["status"] in trainings.FINAL

    def _publish(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def poll(self) -> None:
        while not self.finished:
            await asyncio.sleep(POLL_SECONDS)
            read_at = time.monotonic()
            try:
                current = await run_in_threadpool(_snapshot, self.training_id)
            except NotFound:  # deleted with its dataset while we watched
                self.gone = True
                self._publish()
                return
            except Exception as e:  # the database is away: the streams keep their keep-alives, we retry
                log.warning("events: cannot read training %s: %s", self.training_id, e)
                continue
            differs, self.snapshot, self.read_at = current != self.snapshot, current, read_at
            if differs:
                self._publish()


@contextlib.asynccontextmanager
async def _follow(state: State, training_id: str, first: dict, first_at: float) -> AsyncIterator[_Watch]:
    """The watch of this training (made, and its poll started, by the first stream that follows it)."""
    watches: dict[str, _Watch] | None = getattr(state, "training_watches", None)
    if watches is None:
        watches = state.training_watches = {}
    watch = watches.get(training_id)
    if watch is None:
        watch = watches[training_id] = _Watch(training_id, first, first_at)
        watch.task = asyncio.create_task(watch.poll())
    watch.followers += 1
    try:
        yield watch
    finally:
        watch.followers -= 1
        if watch.followers == 0 and watches.get(training_id) is watch:
            del watches[training_id]
            watch.task.cancel()


async def _stream(request: Request, first: dict, first_at: float, training_id: str,
                  key_id: str | None) -> AsyncIterator[str]:
    yield "retry: 2000\n\n"
    n = 0
    key_checked = time.monotonic()

    async def key_revoked() -> bool:
        """The key the stream was opened with is revoked: the stream ends (a reconnect gets 401)."""
        nonlocal key_checked
        if key_id is None or time.monotonic() - key_checked < KEY_CHECK_SECONDS:
            return False
        key_checked = time.monotonic()
        return not await run_in_threadpool(_key_still_valid, key_id)

    def event(snapshot: dict) -> str:
        nonlocal n
        n += 1
        return f"id: {n}\ndata: {json.dumps(snapshot, separators=(',', ':'))}\n\n"

    yield event(first)
    if first["status"] in trainings.FINAL:
        return
    previous, sent_at = first, time.monotonic()
    async with _follow(request.app.state, training_id, first, first_at) as watch:
        while True:
            changed = watch.changed
            # Only a look that began after our first read ended is surely not older than it (a
            # stream can join a watch mid-poll); a final status is the last word anyway.
            if watch.snapshot != previous and (watch.read_at >= first_at or watch.finished):
                if await key_revoked():
                    return
                previous, sent_at = watch.snapshot, time.monotonic()
                yield event(previous)
                if previous["status"] in trainings.FINAL:
                    return
            if watch.gone:
                return
            wait = min(POLL_SECONDS, KEEPALIVE_SECONDS - (time.monotonic() - sent_at))
            if wait <= 0:
                if await key_revoked():
                    return
                yield ": keep-alive\n\n"
                sent_at = time.monotonic()
                continue
            try:
                await asyncio.wait_for(changed.wait(), wait)
            except TimeoutError:
                pass
            if await request.is_disconnected():
                return


@router.get("/trainings/{training_id}/events", response_class=StreamingResponse,
            dependencies=[Requires(Scope.READ), InTraining, InFlight(Capped.STREAMS)],
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "the training (as GET /v1/trainings/{id}) each time it changes"}})
def training_events(training_id: str, request: Request, session: SessionDep, caller: CallerDep) -> StreamingResponse:
    first = _AS_JSON.dump_python(trainings.describe(session, trainings.get(session, training_id)), mode="json")  # 404 up front
    first_at = time.monotonic()  # after the read: a look that begins later sees at least this
    # The stream can last as long as the training: hand the request's database connection back
    # now (one poll per training in this process opens a short session per look) instead of holding
    # it until the stream ends.
    session.close()
    return StreamingResponse(_stream(request, first, first_at, training_id, caller.key_id), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
