"""/v1/datasets: names and label counts need predict; creating and deleting need write."""

from __future__ import annotations

from fastapi import APIRouter, BackgroundTasks, Query, Response
from pydantic import BaseModel, Field

from service.api.auth import InDataset, Requires
from service.api.deps import CallerDep, SessionDep
from service.domain import cleanup, datasets, keys
from service.domain.keys import Scope

router = APIRouter(prefix="/datasets", tags=["datasets"])


class DatasetCreate(BaseModel):
    name: str = Field(description="1-64 characters of a-z, 0-9, '_' and '-'", examples=["pets"])


@router.post("", status_code=201, dependencies=[Requires(Scope.WRITE, every_dataset=True)])
def create_dataset(body: DatasetCreate, session: SessionDep) -> dict:
    dataset = datasets.create(session, body.name)
    session.commit()
    return datasets.describe(session, dataset)


@router.get("", dependencies=[Requires(Scope.PREDICT)])
def list_datasets(session: SessionDep, caller: CallerDep, limit: int = Query(100, ge=1, le=1000),
                  offset: int = Query(0, ge=0, le=2**31 - 1)) -> dict:
    """Every dataset; for a key limited to datasets, those."""
    if caller.key_id is not None and caller.datasets is not None:
        rows, total = keys.visible_datasets(session, caller.key_id, limit=limit, offset=offset)
    else:
        rows, total = datasets.list_all(session, limit=limit, offset=offset)
    return {"data": datasets.describe_many(session, rows), "count": total}


@router.get("/{name}", dependencies=[Requires(Scope.PREDICT), InDataset])
def get_dataset(name: str, session: SessionDep) -> dict:
    return datasets.describe(session, datasets.get(session, name))


@router.delete("/{name}", status_code=204, dependencies=[Requires(Scope.WRITE), InDataset])
def delete_dataset(name: str, session: SessionDep, background: BackgroundTasks) -> Response:
    """Answers at once: the dataset is gone from every listing and its name is free; its trainings
    are cancelled, and its images, versions and blobs are removed in the background (starting
    now, in batches that never hold up other requests; the workers' sweep finishes what is left)."""
    dataset_id = cleanup.delete_dataset(session, name)
    background.add_task(cleanup.purge_soon, dataset_id)
    return Response(status_code=204)
