"""/v1/datasets"""

from __future__ import annotations

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, Field

from service.api.deps import SessionDep
from service.domain import cleanup, datasets

router = APIRouter(prefix="/datasets", tags=["datasets"])


class DatasetCreate(BaseModel):
    name: str = Field(description="1-64 characters of a-z, 0-9, '_' and '-'", examples=["pets"])


@router.post("", status_code=201)
def create_dataset(body: DatasetCreate, session: SessionDep) -> dict:
    dataset = datasets.create(session, body.name)
    session.commit()
    return datasets.describe(session, dataset)


@router.get("")
def list_datasets(session: SessionDep, limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=2**31 - 1)) -> dict:
    rows, total = datasets.list_all(session, limit=limit, offset=offset)
    return {"data": [datasets.describe(session, d) for d in rows], "count": total}


@router.get("/{name}")
def get_dataset(name: str, session: SessionDep) -> dict:
    return datasets.describe(session, datasets.get(session, name))


@router.delete("/{name}", status_code=204)
def delete_dataset(name: str, session: SessionDep) -> Response:
    """Answers at once: the dataset is gone from every listing and its name is free; its trainings
    are cancelled, and its images, versions and blobs are removed in the background."""
    cleanup.delete_dataset(session, name)
    return Response(status_code=204)
