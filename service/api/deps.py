"""Dependencies the routes list by name."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from service.config import Settings, get_settings
from service.db import new_session
from service.predictions import ModelCache
from service.storage import BlobStore, get_store


def _session() -> Iterator[Session]:
    session = new_session()
    try:
        yield session
    finally:
        session.close()


def _model_cache(request: Request) -> ModelCache:
    return request.app.state.models


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


SessionDep = Annotated[Session, Depends(_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[BlobStore, Depends(get_store)]
ModelCacheDep = Annotated[ModelCache, Depends(_model_cache)]
RequestIdDep = Annotated[str | None, Depends(_request_id)]
