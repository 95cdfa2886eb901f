"""/v2: the Open Inference Protocol (KServe v2) over REST, for apps that speak it (tritonclient,
KServe's and MLServer's clients). A model is a dataset; its versions are the dataset's versions;
without one in the path the dataset's default version answers. The request and response bodies
(plain JSON and the binary tensor data extension) are service.serving.oip's; inference is the
same micro-batched predict as POST /v1/datasets/{name}/predict.

Keys, scopes, rate limits and the in-flight cap are declared on each route as on /v1 predict;
the health probes need no key. Errors leave as the protocol's ``{"error": "<code>: <message>"}``
with the status service.api.errors gives the domain error (``OipRoute``): 400 for a request the
codec cannot read, 404 for an unknown dataset or version, 413 past felis's limits, 422 for an
element that is not a readable image.
"""

from __future__ import annotations

import io
import logging
from typing import Any

from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool
from starlette.types import Scope as AsgiScope

from service.api import errors
from service.api.auth import InDataset, Requires
from service.api.deps import ModelCacheDep, SessionDep, SettingsDep, StoreDep
from service.api.metrics import PREDICTIONS, Counts
from service.api.middleware import BodyLimit, Capped, InFlight
from service.domain import datasets, versions
from service.domain.keys import Scope
from service.errors import FelisError, Unavailable
from service.serving import oip
from service.serving.cache import ModelCache
from service.serving.predictions import Upload, predict
from service.store.db import get_engine

log = logging.getLogger("felis.api")


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(oip.error_body(code, message), status_code=status, headers=headers)


class OipRoute(errors.ProtocolRoute):
    """A route whose errors are the protocol's ``{"error": "<code>: <message>"}``, with the status
    (and headers: Retry-After, WWW-Authenticate) of service.api.errors's table."""

    render_error = staticmethod(_error)


class OipErrorBody(BaseModel):
    error: str  # "<code>: <message>"


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": OipErrorBody, "description": text_}
    for status, text_ in ((400, "a request the protocol cannot read"), (401, "no or an invalid API key"),
                          (403, "the key lacks the scope"), (404, "no such model (dataset) or version"),
                          (413, "too many images, or one too large"), (422, "an image that cannot be read"),
                          (429, "rate limited"), (503, "not ready, or a dependency is unavailable"))
}
router = APIRouter(prefix="/v2", tags=["inference (Open Inference Protocol v2)"], route_class=OipRoute,
                   responses=_ERRORS)
VersionPath = Path(ge=1, le=2**31 - 1)
Predicts = Requires(Scope.PREDICT, rate_limit="predict")


# --- health and metadata ---------------------------------------------------------------------


@router.get("/health/live")
async def live() -> dict:
    """The process is up (no key needed)."""
    return {"live": True}


def _can_serve(session, store) -> bool:
    try:
        session.execute(text("SELECT 1"))
        store.check()
        return True
    except Exception as e:  # not ready; the detail goes to the log, not to whoever asks
        log.warning("v2 readiness: %s", getattr(e, "message", None) or e)
        return False


@router.get("/health/ready")
def ready(session: SessionDep, store: StoreDep) -> JSONResponse:
    """Ready to infer: the database and the blob storage answer (no key needed; the job queue,
    which inference does not use, is /readyz's concern)."""
    ok = _can_serve(session, store)
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("", dependencies=[Predicts])
async def server_metadata(request: Request) -> dict:
    return oip.server_metadata(request.app.version)


def _model_metadata(session, name: str, version: int | None) -> dict:
    dataset = datasets.get(session, name)
    row = versions.resolve(session, dataset, version)
    return oip.model_metadata(name, [v.version for v in versions.list_for(session, dataset)], list(row.labels))


@router.get("/models/{name}", dependencies=[Predicts, InDataset])
def model_metadata(name: str, session: SessionDep) -> dict:
    """The inputs and outputs of the dataset's default version, and every version."""
    return _model_metadata(session, name, None)


@router.get("/models/{name}/versions/{version}", dependencies=[Predicts, InDataset])
def model_version_metadata(name: str, session: SessionDep, version: int = VersionPath) -> dict:
    return _model_metadata(session, name, version)


def _load(cache: ModelCache, name: str, version: int | None) -> None:
    """Look the version up and load it into this process's model cache (as the next inference would)."""
    with get_engine().connect() as conn:
        serving = versions.for_serving(conn, name, version)
    try:
        model = cache.acquire(serving.checkpoint_key, serving.version, serving.onnx_key)
    except FelisError:
        raise
    except Exception as e:
        log.exception("v2 model ready: %s version %s does not load", name, serving.version)
        raise Unavailable(f"version {serving.version} of {name!r} does not load", code="model_not_ready") from e
    cache.release(model)


async def _ready(cache: ModelCache, name: str, version: int | None) -> dict:
    await run_in_threadpool(_load, cache, name, version)
    return {"name": name, "ready": True}


@router.get("/models/{name}/ready", dependencies=[Predicts, InDataset])
async def model_ready(name: str, cache: ModelCacheDep) -> dict:
    """200 once the default version is loaded here (loading it if need be); 404 without one."""
    return await _ready(cache, name, None)


@router.get("/models/{name}/versions/{version}/ready", dependencies=[Predicts, InDataset])
async def model_version_ready(name: str, cache: ModelCacheDep, version: int = VersionPath) -> dict:
    return await _ready(cache, name, version)


# --- inference -------------------------------------------------------------------------------


def count_inferences(scope: AsgiScope, status: int, answer: dict[str, Any]) -> None:
    """felis_predictions_total from an inference's JSON header (MetricsMiddleware's Counts): the
    images answered, from the first output with one row per image."""
    if status != 200:
        return
    for out in answer.get("outputs") or []:
        if isinstance(out, dict) and out.get("name") != "labels" and isinstance(out.get("shape"), list) and out["shape"]:
            dataset = (scope.get("path_params") or {}).get("name") or str(answer.get("model_name", ""))
            PREDICTIONS.labels(dataset, str(answer.get("model_version", ""))).inc(int(out["shape"][0]))
            return


_OFF_LOOP_BYTES = 1 << 20  # a body larger than this is parsed on a worker thread, not the event loop

_INFER_DOC = {
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}},
            "inputs": {"type": "array", "items": {"type": "object", "required": ["name", "datatype", "shape"],
                                                  "properties": {
                "name": {"type": "string", "enum": [oip.INPUT]}, "datatype": {"type": "string", "enum": ["BYTES"]},
                "shape": {"type": "array", "items": {"type": "integer"}},
                "parameters": {"type": "object", "properties": {"content_type": {"type": "string", "enum": ["base64"]},
                                                                "binary_data_size": {"type": "integer"}}},
                "data": {"type": "array", "items": {"type": "string"}}}}},
            "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string", "enum": list(oip.OUTPUTS)},
                "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}}}}},
        }}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                     "description": "the JSON, then binary tensor data (Inference-Header-Content-Length)"},
    }},
}
_INFER_200 = {200: {"description": "the outputs; with binary outputs, the JSON then their data "
                    "(Inference-Header-Content-Length: the JSON's length)",
                    "content": {"application/json": {}, "application/octet-stream": {}}}}


async def _infer(name: str, version: int | None, request: Request, cache: ModelCache, settings) -> Response:
    body = await request.body()  # at most FELIS_MAX_REQUEST_BYTES (BodySizeLimitMiddleware), and inflated as much
    encoding = request.headers.get("content-encoding", "")
    if encoding.strip().lower() not in ("", "identity"):
        body = await run_in_threadpool(oip.inflate, body, encoding, settings.max_request_bytes)
    args = (body, request.headers.get(oip.HEADER_LENGTH))
    limits = {"max_elements": settings.max_predict_files, "max_element_bytes": settings.max_file_bytes}
    parsed = (await run_in_threadpool(lambda: oip.parse_request(*args, **limits)) if len(body) > _OFF_LOOP_BYTES
              else oip.parse_request(*args, **limits))
    files = [Upload(f"image[{i}]", io.BytesIO(data), len(data)) for i, data in enumerate(parsed.images)]
    answer = await predict(cache, name, version, files, settings)
    content, header_length = oip.encode_response(name, answer["model_version"], oip.tensors_from_answer(answer),
                                                 parsed.outputs, parsed.id)
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream", headers={oip.HEADER_LENGTH: str(header_length)})


_INFER = {"response_class": Response, "openapi_extra": _INFER_DOC, "responses": _INFER_200,
          "dependencies": [Predicts, InDataset, Counts(count_inferences), InFlight(Capped.REQUESTS),
                           BodyLimit()]}


@router.post("/models/{name}/infer", **_INFER)
async def infer(name: str, request: Request, cache: ModelCacheDep, settings: SettingsDep) -> Response:
    """Classify the images of the `image` input (BYTES [N], encoded files) with the default version."""
    return await _infer(name, None, request, cache, settings)


@router.post("/models/{name}/versions/{version}/infer", **_INFER)
async def infer_version(name: str, request: Request, cache: ModelCacheDep, settings: SettingsDep,
                        version: int = VersionPath) -> Response:
    return await _infer(name, version, request, cache, settings)
