"""/v1/datasets/{name}/label-issues: the images a version's training says are probably mislabelled."""

from __future__ import annotations

from fastapi import APIRouter, Query

from service.api.auth import InDataset, Requires
from service.api.deps import SessionDep, StoreDep
from service.domain import datasets, label_issues
from service.domain.keys import Scope

router = APIRouter(prefix="/datasets/{name}/label-issues", tags=["label-issues"], dependencies=[InDataset])


@router.get("", dependencies=[Requires(Scope.READ)])
def list_label_issues(name: str, session: SessionDep, store: StoreDep,
                      version: int | None = Query(None, ge=1, le=2**31 - 1, description="default: the default version"),
                      limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=2**31 - 1)) -> dict:
    """The images whose label the held-out predictions of that version's training contradict, most
    likely first: image_id, filename, label (at training), current_label, suggested_label, score
    (0..1, higher = more likely wrong). 409 label_issues_unavailable for a version without a report
    (fine-tuned, imported, or older)."""
    return label_issues.report(session, store, datasets.get(session, name), version, limit=limit, offset=offset)
