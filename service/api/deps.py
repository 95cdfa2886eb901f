"""Dependencies the routes list by name."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import aclosing
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser, parse_options_header

from service.api.auth import Caller, current_caller
from service.config import Settings, get_settings
from service.errors import InvalidRequest, TooLarge
from service.serving.cache import ModelCache
from service.store.blobs import BlobStore, get_store
from service.store.db import new_session


class _BudgetParser(MultiPartParser):
    """Starlette's multipart parser with one memory budget for all of a form's file parts: a part
    is spooled to a temporary file as soon as it would take the form past it. (Starlette's own keeps
    up to 1 MiB of every part in memory: a 512 MiB body of 1 MiB parts stayed in RAM.) Without a
    budget, Starlette's rule. Text fields take at most 64 KiB each."""

    def __init__(self, *args, memory_bytes: int | None, **kwargs) -> None:
        super().__init__(*args, max_part_size=64 * 1024, **kwargs)
        self._left = memory_bytes  # what the parts that stay in memory may still take; None: no budget
        self._part_bytes = 0

    @property
    def spool_max_size(self) -> int:  # read by on_headers_finished when a file part begins
        if self._left is None:
            return MultiPartParser.spool_max_size
        return max(self._left, 1)  # 0 would mean "never spool"

    def on_headers_finished(self) -> None:
        self._part_bytes = 0
        super().on_headers_finished()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._part_bytes += end - start
        super().on_part_data(data, start, end)

    def on_part_end(self) -> None:
        if self._left is not None and self._current_part.file is not None and self._part_bytes <= self.spool_max_size:
            self._left = max(self._left - self._part_bytes, 0)  # it stays in memory
        super().on_part_end()


_TOO_MANY_FILES = "Too many files"  # how Starlette's parser words a file part past max_files


async def read_form(request: Request, max_files: int, max_fields: int,
                    max_memory_bytes: int | None = None) -> FormData:
    """The multipart body, or a clear 422 when it is not one. The caller closes it.
    ``max_files``: the route's limit; more file parts answer 413 too_many_files, the parser
    stopping at the first one past it.
    ``max_memory_bytes``: what its file parts may keep in memory, all together (the rest is
    spooled to temporary files); None: Starlette's default, up to 1 MiB of each part."""
    content_type, _ = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data":  # a urlencoded form (it has no files) or no form: the route says what is missing
        return await request.form(max_files=max_files, max_fields=max_fields)
    try:
        async with aclosing(request.stream()) as stream:
            return await _BudgetParser(request.headers, stream, max_files=max_files, max_fields=max_fields,
                                       memory_bytes=max_memory_bytes).parse()
    except MultiPartException as e:
        if e.message.startswith(_TOO_MANY_FILES):
            raise TooLarge(f"more than {max_files} files in one request; the limit is {max_files}",
                           code="too_many_files") from e
        raise InvalidRequest(f"unreadable multipart body: {e.message}", code="invalid_multipart") from e
    except (AssertionError, ValueError) as e:  # multipart/form-data without a boundary
        raise InvalidRequest("send the images as multipart/form-data", code="invalid_multipart") from e


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, never more than max_bytes + 1 of it read: 413 request_too_large past it
    (for JSON routes whose bodies are small: the global cap, FELIS_MAX_REQUEST_BYTES, is for uploads)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise TooLarge(f"the body exceeds {max_bytes} bytes for this route", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _session() -> Iterator[Session]:
    session = new_session()
    try:
        yield session
    finally:
        session.close()


# The dependencies below are `async def` although they never await: FastAPI runs a plain `def`
# dependency in its thread pool, one thread hop per dependency per request, which the predict
# path cannot afford. They must stay cheap and non-blocking.


async def _settings() -> Settings:
    return get_settings()


async def _store() -> BlobStore:
    return get_store()


async def _model_cache(request: Request) -> ModelCache:
    return request.app.state.models


async def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


SessionDep = Annotated[Session, Depends(_session)]
SettingsDep = Annotated[Settings, Depends(_settings)]
StoreDep = Annotated[BlobStore, Depends(_store)]
ModelCacheDep = Annotated[ModelCache, Depends(_model_cache)]
RequestIdDep = Annotated[str | None, Depends(_request_id)]
# who is calling (service.api.auth): what a route requires is declared with auth.Requires; a route
# lists the caller only to act on it (a key limited to datasets lists only those)
CallerDep = Annotated[Caller, Depends(current_caller)]
