"""Custom Vision's prediction API (``/customvision/v3.N/prediction``, as the SDK's
CustomVisionPredictionClient calls it): classify an image with a published iteration. Needs a key
with ``predict`` (a felis predict key is a Prediction-Key), counted by the predict rate limit.

No route stores the image: ``classify_image`` answers as ``classify_image_with_no_store`` does
(a Prediction-Key never writes). The body is read raw, within Custom Vision's 4 MB (bodies.py).
``classify_image_url`` fetches the image the body names, only from the hosts of
FELIS_CUSTOMVISION_URL_HOSTS (off when empty) and never from private addresses (fetch.py).
"""

from __future__ import annotations

import json
from typing import IO, Any

from fastapi import APIRouter, Path, Request
from starlette.concurrency import run_in_threadpool

from service.api.customvision import bodies, fetch, schemas
from service.api.customvision.auth import PredictionCallerDep, PredictionRequires
from service.api.customvision.errors import CustomVisionRoute
from service.api.deps import ModelCacheDep, SessionDep, SettingsDep
from service.api.middleware import BodyLimit, Capped, InFlight
from service.config import Settings
from service.domain import customvision as cv
from service.domain.keys import Scope
from service.errors import InvalidRequest, TooLarge
from service.serving.predictions import Upload, predict

router = APIRouter(prefix="/customvision/{api_version}/prediction", tags=["customvision"],
                   route_class=CustomVisionRoute, include_in_schema=False)

Version = Path(pattern=r"^v3\.\d+(-preview)?$")
_DECLARED = [PredictionRequires(Scope.PREDICT, rate_limit="predict"), InFlight(Capped.REQUESTS), BodyLimit()]
_MAX_URL_BODY = 8 * 1024  # classify_image_url's {"url": ...}


async def _image_part(request: Request) -> tuple[IO[bytes], int | None]:
    parts = await bodies.read_parts(request, max_parts=1, max_part_bytes=bodies.MAX_PREDICTION_BYTES)
    if not parts:
        raise InvalidRequest("send the image as imageData", code="empty_file")
    if not parts[0].fits:
        parts[0].file.close()
        raise TooLarge(f"the image is over {bodies.MAX_PREDICTION_BYTES} bytes", code="file_too_large")
    return parts[0].file, parts[0].size


async def _image_at_url(request: Request, settings: Settings) -> tuple[IO[bytes], int | None]:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_URL_BODY:
            raise TooLarge(f"the body is over {_MAX_URL_BODY} bytes: send {{\"url\": \"...\"}}", code="request_too_large")
    try:
        url = json.loads(body).get("url")
    except (ValueError, AttributeError):
        url = None
    if not isinstance(url, str):
        raise InvalidRequest('send {"url": "https://..."} as JSON', code="invalid_url")
    return await fetch.fetch_image(url, settings.customvision_url_hosts, bodies.MAX_PREDICTION_BYTES), None


async def _classify(projectId: str, publishedName: str, request: Request, session, cache, settings,  # noqa: N803
                    caller, read=None) -> dict[str, Any]:
    target = await run_in_threadpool(cv.prediction_target, session, projectId, publishedName, caller.datasets)
    await run_in_threadpool(session.close)  # nothing more to read: no connection held while the body arrives
    file, size = await (read(request, settings) if read else _image_part(request))
    try:
        answer = await predict(cache, target.dataset, target.version, [Upload("imageData", file, size)], settings)
    finally:
        file.close()
    return schemas.image_prediction(projectId, target, answer["predictions"][0]["probabilities"])


@router.post("/{projectId}/classify/iterations/{publishedName}/image", dependencies=_DECLARED)
async def classify_image(projectId: str, publishedName: str, request: Request, session: SessionDep,  # noqa: N803
                         cache: ModelCacheDep, settings: SettingsDep, caller: PredictionCallerDep,
                         application: str | None = None, api_version: str = Version) -> dict:
    """Each tag's probability, likeliest first. The image is not stored (as with_no_store)."""
    return await _classify(projectId, publishedName, request, session, cache, settings, caller)


@router.post("/{projectId}/classify/iterations/{publishedName}/image/nostore", dependencies=_DECLARED)
async def classify_image_with_no_store(projectId: str, publishedName: str, request: Request,  # noqa: N803
                                       session: SessionDep, cache: ModelCacheDep, settings: SettingsDep,
                                       caller: PredictionCallerDep, application: str | None = None,
                                       api_version: str = Version) -> dict:
    return await _classify(projectId, publishedName, request, session, cache, settings, caller)


@router.post("/{projectId}/classify/iterations/{publishedName}/url", dependencies=_DECLARED)
async def classify_image_url(projectId: str, publishedName: str, request: Request, session: SessionDep,  # noqa: N803
                             cache: ModelCacheDep, settings: SettingsDep, caller: PredictionCallerDep,
                             application: str | None = None, api_version: str = Version) -> dict:
    """The image at ``{"url"}``, fetched within fetch.py's rules (off unless FELIS_CUSTOMVISION_URL_HOSTS)."""
    return await _classify(projectId, publishedName, request, session, cache, settings, caller, _image_at_url)


@router.post("/{projectId}/classify/iterations/{publishedName}/url/nostore", dependencies=_DECLARED)
async def classify_image_url_with_no_store(projectId: str, publishedName: str, request: Request,  # noqa: N803
                                           session: SessionDep, cache: ModelCacheDep, settings: SettingsDep,
                                           caller: PredictionCallerDep, application: str | None = None,
                                           api_version: str = Version) -> dict:
    return await _classify(projectId, publishedName, request, session, cache, settings, caller, _image_at_url)
