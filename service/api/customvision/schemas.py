"""Custom Vision's JSON, as its SDK's models read it (camelCase keys, dashed ids, ISO times): the
answers of the training and prediction routes, rendered from service.domain.customvision's rows
and facts. Keys Custom Vision does not have are felis's own (``felisDataset``, ``felisTraining``,
``felisVersion``): the SDK ignores them; they name what to use through /v1."""

from __future__ import annotations

import uuid
from typing import Any

from starlette.requests import Request

from service.api.customvision import urls
from service.config import Settings
from service.domain import customvision as cv
from service.store.tables import CvIteration, CvTag, Image, utcnow


def domain(domain_id: str) -> dict[str, Any]:
    return {"id": domain_id, "name": cv.DOMAINS[domain_id], "type": "Classification", "exportable": False,
            "enabled": True, "exportablePlatforms": [], "modelInformation": None}


def project(ref: cv.ProjectRef) -> dict[str, Any]:
    p = ref.project
    return {"id": p.id, "name": p.name, "description": p.description,
            "settings": {"domainId": p.domain_id, "classificationType": p.classification_type,
                         "targetExportPlatforms": [], "useNegativeSet": False, "imageProcessingSettings": None},
            "created": p.created_at, "lastModified": p.last_modified, "thumbnailUri": None, "drModeEnabled": False,
            "status": "Succeeded", "felisDataset": ref.dataset.name}


def tag(t: CvTag, counts: dict[str, int]) -> dict[str, Any]:
    return {"id": t.id, "name": t.name, "description": t.description, "type": "Regular",
            "imageCount": counts.get(t.label, 0)}


def iteration(ref: cv.ProjectRef, it: CvIteration, state: cv.IterationState) -> dict[str, Any]:
    training = state.training
    started, finished = (training.started_at, training.finished_at) if training else (None, None)
    minutes = int((finished - started).total_seconds() // 60) if started and finished else None
    return {"id": it.id, "name": it.name, "status": state.status, "created": it.created_at,
            "lastModified": finished or it.last_modified, "trainedAt": finished if state.status == "Completed" else None,
            "projectId": ref.project.id, "exportable": False, "exportableTo": [], "domainId": ref.project.domain_id,
            "classificationType": ref.project.classification_type, "trainingType": "Regular",
            "reservedBudgetInHours": 0, "trainingTimeInMinutes": minutes, "publishName": state.publish_name,
            "originalPublishResourceId": state.prediction_id, "customBaseModelInfo": None,
            "trainingErrorDetails": state.error, "felisTraining": it.training_id, "felisVersion": state.version}


def performance(p: cv.Performance) -> dict[str, Any]:
    return {"perTagPerformance": [{"id": t.tag_id, "name": t.name, "precision": t.precision, "precisionStdDeviation": 0.0,
                                   "recall": t.recall, "recallStdDeviation": 0.0, "averagePrecision": t.average_precision}
                                  for t in p.per_tag],
            "precision": p.precision, "precisionStdDeviation": 0.0, "recall": p.recall, "recallStdDeviation": 0.0,
            "averagePrecision": p.average_precision}


def image(request: Request, settings: Settings, row: Image, t: CvTag | None) -> dict[str, Any]:
    """An image, with signed expiring URLs to its bytes (urls.py)."""
    image_id = cv.dashed(row.id)
    base = settings.public_url or str(request.base_url)
    return {"id": image_id, "created": row.created_at, "width": row.width, "height": row.height,
            "resizedImageUri": urls.signed_url(settings, base, image_id, "resized"),
            "thumbnailUri": urls.signed_url(settings, base, image_id, "thumbnail"),
            "originalImageUri": urls.signed_url(settings, base, image_id, "original"),
            "tags": [{"tagId": t.id, "tagName": t.name, "created": row.created_at}] if t else [],
            "regions": None, "metadata": None}


def image_create_summary(request: Request, settings: Settings, results: list[dict], rows: dict[str, Image],
                         tags_by_label: dict[str, CvTag]) -> dict[str, Any]:
    """isBatchSuccessful (every image OK, as Custom Vision says it) and one result per image, in order."""
    images = []
    for r in results:
        row = rows.get(r["imageId"]) if r["imageId"] else None
        images.append({"sourceUrl": r["sourceUrl"], "status": r["status"],
                       "image": image(request, settings, row, tags_by_label.get(row.label)) if row else None})
    return {"isBatchSuccessful": bool(results) and all(r["status"] == "OK" for r in results), "images": images}


def image_prediction(project_id: str, target: cv.PredictionTarget, probabilities: dict[str, float]) -> dict[str, Any]:
    """Every tag's probability, likeliest first."""
    predictions = []
    for label, p in sorted(probabilities.items(), key=lambda kv: -kv[1]):
        tag_id, tag_name = target.tags.get(label, (None, label))
        predictions.append({"probability": p, "tagId": tag_id, "tagName": tag_name, "boundingBox": None,
                            "tagType": "Regular"})
    return {"id": str(uuid.uuid4()), "project": project_id.lower(), "iteration": target.iteration_id,
            "created": utcnow(), "predictions": predictions}
