"""POST /v1/datasets/{name}/predict"""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from service.api.deps import ModelCacheDep, SettingsDep
from service.errors import InvalidRequest
from service.predictions import predict

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


@router.post("/datasets/{name}/predict", openapi_extra=_PREDICT_BODY)
async def predict_images(name: str, request: Request, cache: ModelCacheDep, settings: SettingsDep,
                         version: int | None = Query(None, ge=1, le=2**31 - 1)) -> dict:
    """Probabilities for every label, the top label and the thresholded decision, per image."""
    try:
        form = await request.form(max_files=settings.max_predict_files + 1, max_fields=20)
    except MultiPartException as e:
        raise InvalidRequest(f"unreadable multipart body: {e.message}", code="invalid_multipart") from e
    except (AssertionError, ValueError) as e:
        raise InvalidRequest("send the images as multipart/form-data 'files'", code="invalid_multipart") from e
    try:
        files = [(f.filename or "upload", await f.read()) for f in form.getlist("files") if isinstance(f, UploadFile)]
    finally:
        await form.close()
    return await predict(cache, name, version, files, settings)
