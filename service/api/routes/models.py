"""/v1/datasets/{name}/models: versions, promotion, checkpoint download, evaluation, thresholds
(per label, and the open-set one).

A version's metadata needs predict (an app picks its version); its evaluation and files need read."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from service.api.auth import InDataset, Requires
from service.api.deps import SessionDep, StoreDep
from service.domain import datasets, versions
from service.domain.keys import Scope
from service.errors import NotFound

router = APIRouter(prefix="/datasets/{name}/models", tags=["models"], dependencies=[InDataset])

VersionPath = Path(ge=1, le=2**31 - 1)


@router.get("", dependencies=[Requires(Scope.PREDICT)])
def list_versions(name: str, session: SessionDep) -> dict:
    dataset = datasets.get(session, name)
    rows = versions.list_for(session, dataset)
    return {"data": [versions.describe(v, dataset) for v in rows], "count": len(rows)}


@router.get("/{version}", dependencies=[Requires(Scope.PREDICT)])
def get_version(name: str, session: SessionDep, version: int = VersionPath) -> dict:
    dataset = datasets.get(session, name)
    return versions.describe(versions.get(session, dataset, version), dataset)


@router.get("/{version}/evaluation", dependencies=[Requires(Scope.READ)])
def get_evaluation(name: str, session: SessionDep, version: int = VersionPath) -> dict:
    """Validation-split evaluation: accuracy, per-label precision/recall/F1, ROC AUC, confusion matrix,
    threshold curves, calibration, and the per-epoch history."""
    dataset = datasets.get(session, name)
    return {"version": version, **versions.get(session, dataset, version).evaluation}


@router.delete("/{version}", status_code=204, dependencies=[Requires(Scope.WRITE)])
def delete_version(name: str, session: SessionDep, store: StoreDep, version: int = VersionPath,
                   force: bool = Query(False, description="also the default version (the dataset is then left without one)")) -> Response:
    """Delete one version, its checkpoint and its ONNX graph. The default version answers 409
    version_is_default unless ?force=true. Version numbers are never given again."""
    versions.delete(session, store, name, version, force=force)
    return Response(status_code=204)


@router.post("/{version}/promote", dependencies=[Requires(Scope.WRITE)])
def promote_version(name: str, session: SessionDep, version: int = VersionPath) -> dict:
    row = versions.promote(session, name, version)
    return versions.describe(row, datasets.get(session, name))


@router.get("/{version}/download", response_class=Response, dependencies=[Requires(Scope.READ)],
            responses={200: {"content": {"application/octet-stream": {}}, "description": "the checkpoint or ONNX graph"}})
def download_version(name: str, session: SessionDep, store: StoreDep, version: int = VersionPath,
                     format: Literal["checkpoint", "onnx"] = Query("checkpoint")) -> Response:
    """checkpoint: weights, architecture, labels, preprocessing, metrics (load with models.checkpoint);
    onnx: the graph predict serves (INT8 backbone for int8 versions), labels and preprocessing in its
    metadata (models.predictor.Predictor.from_onnx, or any ONNX runtime)."""
    row = versions.get(session, datasets.get(session, name), version)
    if format == "onnx":
        if not row.onnx_key:
            raise NotFound(f"version {version} of {name!r} has no ONNX graph", code="onnx_not_available")
        key, filename = row.onnx_key, f"{name}-v{version}.onnx"
    else:
        key, filename = row.checkpoint_key, f"{name}-v{version}.pt"
    return Response(store.get(key), media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


class ThresholdSet(BaseModel):
    model_config = ConfigDict(strict=True)  # numbers only: true was taken as 1.0, "0.5" as 0.5

    threshold: float | None = Field(None, ge=0.0, le=1.0, description="decision threshold for the label")
    min_precision: float | None = Field(None, gt=0.0, le=1.0,
                                        description="or: the lowest threshold reaching this validation precision")


@router.put("/{version}/thresholds/{label}", dependencies=[Requires(Scope.WRITE)])
def set_threshold(name: str, label: str, body: ThresholdSet, session: SessionDep, version: int = VersionPath) -> dict:
    row = versions.set_threshold(session, name, version, label, threshold=body.threshold,
                                 min_precision=body.min_precision)
    return versions.describe(row, datasets.get(session, name))


@router.delete("/{version}/thresholds/{label}", dependencies=[Requires(Scope.WRITE)])
def clear_threshold(name: str, label: str, session: SessionDep, version: int = VersionPath) -> dict:
    """Remove the label's decision threshold, from the next prediction on (none set: the same answer)."""
    row = versions.clear_threshold(session, name, version, label)
    return versions.describe(row, datasets.get(session, name))


class OodThresholdSet(BaseModel):
    model_config = ConfigDict(strict=True)

    threshold: float | None = Field(None, ge=0.0, le=2.0, description="open-set threshold: an image whose ood_score "
                                    "(cosine distance, 0..2) is above it is flagged ood")
    flagged_fraction: float | None = Field(None, gt=0.0, lt=1.0,
                                           description="or: the share of the training images it would flag")


@router.put("/{version}/ood-threshold", dependencies=[Requires(Scope.WRITE)])
def set_ood_threshold(name: str, body: OodThresholdSet, session: SessionDep, version: int = VersionPath) -> dict:
    """Move the open-set threshold, from the next prediction on. 409 ood_unavailable for a version
    trained before it had an index; 422 invalid_ood_threshold unless exactly one field is given."""
    row = versions.set_ood_threshold(session, name, version, threshold=body.threshold,
                                     flagged_fraction=body.flagged_fraction)
    return versions.describe(row, datasets.get(session, name))
