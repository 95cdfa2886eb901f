"""/v1/datasets/{name}/models: versions, promotion, checkpoint download, evaluation, thresholds."""

from __future__ import annotations

from fastapi import APIRouter, Path, Response
from pydantic import BaseModel, Field

from service import datasets, versions
from service.api.deps import SessionDep, StoreDep

router = APIRouter(prefix="/datasets/{name}/models", tags=["models"])

VersionPath = Path(ge=1, le=2**31 - 1)


@router.get("")
def list_versions(name: str, session: SessionDep) -> dict:
    dataset = datasets.get(session, name)
    rows = versions.list_for(session, dataset)
    return {"data": [versions.describe(v, dataset) for v in rows], "count": len(rows)}


@router.get("/{version}")
def get_version(name: str, session: SessionDep, version: int = VersionPath) -> dict:
    dataset = datasets.get(session, name)
    return versions.describe(versions.get(session, dataset, version), dataset)


@router.get("/{version}/evaluation")
def get_evaluation(name: str, session: SessionDep, version: int = VersionPath) -> dict:
    """Validation-split evaluation: accuracy, per-label precision/recall/F1, ROC AUC, confusion matrix,
    threshold curves, calibration, and the per-epoch history."""
    dataset = datasets.get(session, name)
    return {"version": version, **versions.get(session, dataset, version).evaluation}


@router.post("/{version}/promote")
def promote_version(name: str, session: SessionDep, version: int = VersionPath) -> dict:
    row = versions.promote(session, name, version)
    return versions.describe(row, datasets.get(session, name))


@router.get("/{version}/download", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}, "description": "the checkpoint"}})
def download_version(name: str, session: SessionDep, store: StoreDep, version: int = VersionPath) -> Response:
    """The checkpoint: weights, architecture, labels, preprocessing, metrics (load with models.checkpoint)."""
    row = versions.get(session, datasets.get(session, name), version)
    return Response(store.get(row.checkpoint_key), media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{name}-v{version}.pt"'})


class ThresholdSet(BaseModel):
    threshold: float | None = Field(None, ge=0.0, le=1.0, description="decision threshold for the label")
    min_precision: float | None = Field(None, gt=0.0, le=1.0,
                                        description="or: the lowest threshold reaching this validation precision")


@router.put("/{version}/thresholds/{label}")
def set_threshold(name: str, label: str, body: ThresholdSet, session: SessionDep, version: int = VersionPath) -> dict:
    row = versions.set_threshold(session, name, version, label, threshold=body.threshold,
                                 min_precision=body.min_precision)
    return versions.describe(row, datasets.get(session, name))
