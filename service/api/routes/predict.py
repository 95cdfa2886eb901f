"""POST /v1/datasets/{name}/predict"""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from starlette.datastructures import UploadFile

from service.api.auth import InDataset, Requires
from service.api.deps import ModelCacheDep, SettingsDep, read_form
from service.api.metrics import Counts, count_predictions
from service.api.middleware import BodyLimit, Capped, InFlight
from service.domain.keys import Scope
from service.errors import InvalidRequest
from service.serving.predictions import Upload, predict

router = APIRouter(tags=["predict"])

_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
            "required": ["files"],
        }}},
    }
}


@router.post("/datasets/{name}/predict", openapi_extra=_PREDICT_BODY,
             dependencies=[Requires(Scope.PREDICT, rate_limit="predict"), InDataset, Counts(count_predictions),
                           InFlight(Capped.REQUESTS), BodyLimit()])
async def predict_images(name: str, request: Request, cache: ModelCacheDep, settings: SettingsDep,
                         version: int | None = Query(None, ge=1, le=2**31 - 1),
                         alias: str | None = Query(None, min_length=1, max_length=255,
                                                   description="a publish name (Custom Vision's): the version it names")) -> dict:
    """Probabilities for every label, the top label and the thresholded decision, per image."""
    if version is not None and alias is not None:
        raise InvalidRequest("give either 'version' or 'alias', not both", code="version_and_alias")
    form = await read_form(request, max_files=settings.max_predict_files, max_fields=20)
    try:  # open until answered: each file is read where it is decoded, within the limits
        files = [Upload(f.filename or "upload", f.file, f.size) for f in form.getlist("files") if isinstance(f, UploadFile)]
        return await predict(cache, name, version, files, settings, alias=alias)
    finally:
        await form.close()
