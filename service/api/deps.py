"""Dependencies the routes list by name."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException

from service.api.auth import Caller, current_caller
from service.config import Settings, get_settings
from service.errors import InvalidRequest
from service.serving.cache import ModelCache
from service.store.blobs import BlobStore, get_store
from service.store.db import new_session


async def read_form(request: Request, max_files: int, max_fields: int) -> FormData:
    """The multipart body, or a clear 422 when it is not one. The caller closes it."""
    try:
        return await request.form(max_files=max_files, max_fields=max_fields)
    except MultiPartException as e:
        raise InvalidRequest(f"unreadable multipart body: {e.message}", code="invalid_multipart") from e
    except (AssertionError, ValueError) as e:  # not multipart/form-data at all
        raise InvalidRequest("send the images as multipart/form-data", code="invalid_multipart") from e


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
