"""Trainings: POST /v1/datasets/{name}/trainings, then /v1/trainings/{id} to watch or cancel."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Query

from service.api.auth import InDataset, InTraining, Requires
from service.api.deps import CallerDep, RequestIdDep, SessionDep, SettingsDep
from service.domain import datasets, trainings
from service.domain.keys import Scope
from service.store.queue import enqueue_training

router = APIRouter(tags=["trainings"])

_OPTIONS_EXAMPLE = {"architecture": "efficientnet_lite0", "epochs": 30, "seed": 0}


@router.post("/datasets/{name}/trainings", status_code=202, dependencies=[Requires(Scope.WRITE), InDataset])
def request_training(name: str, session: SessionDep, settings: SettingsDep, request_id: RequestIdDep, caller: CallerDep,
                     options: dict[str, Any] = Body(default_factory=dict, examples=[_OPTIONS_EXAMPLE])) -> dict:
    """Queue a training of the dataset's current images. Options are validated before anything is
    queued (422; also when they would not fit a worker's memory). Unfinished trainings are capped
    per dataset and per API key (429 too_many_trainings). With the job queue down it is still
    accepted (202, queued): the workers' sweep sends its message once the queue is back."""
    training = trainings.request(session, name, options, settings, request_id=request_id, key_id=caller.key_id)
    session.commit()  # enqueue only after the row is durable, so the worker always finds it
    trainings.send(training.id, enqueue_training)
    return trainings.describe(session, training)


@router.get("/datasets/{name}/trainings", dependencies=[Requires(Scope.READ), InDataset])
def list_trainings(name: str, session: SessionDep, limit: int = Query(50, ge=1, le=1000),
                   offset: int = Query(0, ge=0, le=2**31 - 1),
                   cursor: str | None = Query(None, max_length=200, description="next_cursor of the page before")) -> dict:
    """Newest first. Page with `cursor` or `offset`; `count` is every training of the dataset."""
    rows, total, after = trainings.list_for(session, datasets.get(session, name), limit=limit, offset=offset, cursor=cursor)
    return {"data": [trainings.describe(session, t) for t in rows], "count": total, "next_cursor": after}


@router.get("/trainings/{training_id}", dependencies=[Requires(Scope.READ), InTraining])
def get_training(training_id: str, session: SessionDep) -> dict:
    return trainings.describe(session, trainings.get(session, training_id))


@router.post("/trainings/{training_id}/cancel", dependencies=[Requires(Scope.WRITE), InTraining])
def cancel_training(training_id: str, session: SessionDep) -> dict:
    return trainings.describe(session, trainings.cancel(session, training_id))
