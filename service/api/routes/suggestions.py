"""/v1/datasets/{name}/suggestions: the labels the default version suggests for unlabeled images."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query

from service.api.auth import InDataset, Requires
from service.api.deps import SessionDep
from service.domain import datasets, suggestions
from service.domain.keys import Scope

router = APIRouter(prefix="/datasets/{name}/suggestions", tags=["suggestions"], dependencies=[InDataset])


@router.get("", dependencies=[Requires(Scope.READ)])
def list_suggestions(name: str, session: SessionDep, order: Literal["uncertain", "certain"] = Query("uncertain"),
                     limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=2**31 - 1)) -> dict:
    """The unlabeled images with the default version's suggested label, its probability and `ood`
    (like none of the training images): `uncertain` (default) puts first what is most useful to
    label by hand (ood, then the least probable), `certain` what is safest to accept in bulk. Only
    reads: the worker computes suggestions after each training and for images uploaded later;
    `pending` counts the unlabeled images it has not reached yet. 404 no_model before a training."""
    return suggestions.page(session, datasets.get(session, name), order=order, limit=limit, offset=offset)
