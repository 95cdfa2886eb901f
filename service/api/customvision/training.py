"""Custom Vision's training API (``/customvision/v3.N/training``, as the SDK's
CustomVisionTrainingClient calls it): projects, tags, images, iterations. Reads need a key with
``read``, changes one with ``write`` (a felis write key is a Training-Key)."""

from __future__ import annotations

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service.api.customvision import bodies, schemas
from service.api.customvision.auth import TrainingCallerDep, TrainingRequires
from service.api.customvision.errors import CustomVisionRoute
from service.api.deps import RequestIdDep, SessionDep, SettingsDep, StoreDep
from service.api.middleware import BodyLimit, Capped, InFlight
from service.config import Settings
from service.domain import customvision as cv
from service.domain import trainings
from service.domain.keys import Scope
from service.errors import InvalidRequest, NotFound
from service.store.queue import enqueue_training
from service.store.tables import Image

router = APIRouter(prefix="/customvision/{api_version}/training", tags=["customvision"],
                   route_class=CustomVisionRoute, include_in_schema=False)

READ, WRITE = TrainingRequires(Scope.READ), TrainingRequires(Scope.WRITE)
Version = Path(pattern=r"^v3\.\d+(-preview)?$")  # any v3.N: the SDK 3.1.1 sends v3.4-preview


def _ids(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


# --- domains and projects --------------------------------------------------------------------


@router.get("/domains", dependencies=[READ])
def get_domains(api_version: str = Version) -> list[dict]:
    return [schemas.domain(d) for d in cv.DOMAINS]


@router.get("/domains/{domainId}", dependencies=[READ])
def get_domain(domainId: str, api_version: str = Version) -> dict:  # noqa: N803 (Custom Vision's names)
    if domainId.lower() not in cv.DOMAINS:
        raise NotFound(f"domain {domainId!r} does not exist", code="domain_not_found")
    return schemas.domain(domainId.lower())


@router.post("/projects", dependencies=[TrainingRequires(Scope.WRITE, every_dataset=True)])
def create_project(session: SessionDep, name: str = Query(max_length=cv.MAX_NAME), description: str | None = None,
                   domainId: str | None = None, classificationType: str | None = None,  # noqa: N803
                   api_version: str = Version) -> dict:
    """A project, and its dataset (named after a slug of the project's name)."""
    ref = cv.create_project(session, name, description=description, domain_id=domainId,
                            classification_type=classificationType)
    session.commit()
    return schemas.project(ref)


@router.get("/projects", dependencies=[READ])
def get_projects(session: SessionDep, caller: TrainingCallerDep, api_version: str = Version) -> list[dict]:
    return [schemas.project(ref) for ref in cv.list_projects(session, caller.datasets)]


@router.get("/projects/{projectId}", dependencies=[READ])
def get_project(projectId: str, session: SessionDep, caller: TrainingCallerDep,  # noqa: N803
                api_version: str = Version) -> dict:
    return schemas.project(cv.get_project(session, projectId, caller.datasets))


@router.delete("/projects/{projectId}", status_code=204, dependencies=[WRITE])
def delete_project(projectId: str, session: SessionDep, caller: TrainingCallerDep,  # noqa: N803
                   api_version: str = Version) -> Response:
    """Answers at once, as DELETE /v1/datasets/{name}: trainings cancelled, files removed in the background."""
    cv.delete_project(session, cv.get_project(session, projectId, caller.datasets))
    return Response(status_code=204)


# --- tags ------------------------------------------------------------------------------------


@router.post("/projects/{projectId}/tags", dependencies=[WRITE])
def create_tag(projectId: str, session: SessionDep, caller: TrainingCallerDep,  # noqa: N803
               name: str = Query(max_length=cv.MAX_NAME), description: str | None = None, type: str | None = None,  # noqa: A002
               api_version: str = Version) -> dict:
    ref = cv.get_project(session, projectId, caller.datasets)
    tag = cv.create_tag(session, ref, name, description=description, kind=type)
    session.commit()
    return schemas.tag(tag, cv.image_counts(session, ref))


@router.get("/projects/{projectId}/tags", dependencies=[READ])
def get_tags(projectId: str, session: SessionDep, caller: TrainingCallerDep,  # noqa: N803
             api_version: str = Version) -> list[dict]:
    ref = cv.get_project(session, projectId, caller.datasets)
    counts = cv.image_counts(session, ref)
    return [schemas.tag(t, counts) for t in cv.tags_of(session, ref)]


@router.get("/projects/{projectId}/tags/{tagId}", dependencies=[READ])
def get_tag(projectId: str, tagId: str, session: SessionDep, caller: TrainingCallerDep,  # noqa: N803
            api_version: str = Version) -> dict:
    ref = cv.get_project(session, projectId, caller.datasets)
    tags = [t for t in cv.tags_of(session, ref) if t.id == tagId.lower()]
    if not tags:
        raise NotFound(f"tag {tagId!r} does not exist in this project", code="tag_not_found")
    return schemas.tag(tags[0], cv.image_counts(session, ref))


# --- images ----------------------------------------------------------------------------------


def _summary(request: Request, settings: Settings, ref: cv.ProjectRef, results: list[dict], rows: dict[str, Image],
             session) -> JSONResponse:
    body = schemas.image_create_summary(request, settings, results, rows, {t.label: t for t in cv.tags_of(session, ref)})
    return JSONResponse(jsonable_encoder(body), status_code=200 if body["isBatchSuccessful"] else 207)


@router.post("/projects/{projectId}/images/files",
             dependencies=[TrainingRequires(Scope.WRITE, rate_limit="upload"), InFlight(Capped.REQUESTS), BodyLimit()])
async def create_images_from_files(projectId: str, request: Request, session: SessionDep, store: StoreDep,  # noqa: N803
                                   settings: SettingsDep, caller: TrainingCallerDep,
                                   api_version: str = Version) -> JSONResponse:
    """A JSON batch of base64 images (at most 64, 6 MiB each: bodies.py), each with one tag."""
    ref = await run_in_threadpool(cv.get_project, session, projectId, caller.datasets)
    await run_in_threadpool(session.close)  # no connection held while the body arrives
    images, batch_tags = await bodies.read_image_batch(request)
    try:
        if not images:
            raise InvalidRequest("the batch holds no images", code="empty_upload")
        results, rows = await run_in_threadpool(cv.add_images, session, store, ref, images, batch_tags, settings)
    finally:
        for image in images:
            if image.file is not None:
                image.file.close()
    return await run_in_threadpool(_summary, request, settings, ref, results, rows, session)


@router.post("/projects/{projectId}/images",
             dependencies=[TrainingRequires(Scope.WRITE, rate_limit="upload"), InFlight(Capped.REQUESTS), BodyLimit()])
async def create_images_from_data(projectId: str, request: Request, session: SessionDep, store: StoreDep,  # noqa: N803
                                  settings: SettingsDep, caller: TrainingCallerDep, tagIds: str | None = None,
                                  api_version: str = Version) -> JSONResponse:
    """Images as multipart parts (``imageData``) or one raw body, all with the tags of ``tagIds``."""
    ref = await run_in_threadpool(cv.get_project, session, projectId, caller.datasets)
    await run_in_threadpool(session.close)  # no connection held while the body arrives
    parts = await bodies.read_parts(request, max_parts=bodies.MAX_BATCH_IMAGES, max_part_bytes=bodies.MAX_IMAGE_BYTES)
    try:
        if not parts:
            raise InvalidRequest("the request holds no image", code="empty_upload")
        images = [cv.NewImage(name=f"image-{i + 1}", tag_ids=[], file=p.file if p.fits else None,
                              status=None if p.fits else "ErrorImageSize") for i, p in enumerate(parts)]
        results, rows = await run_in_threadpool(cv.add_images, session, store, ref, images, _ids(tagIds), settings)
    finally:
        for part in parts:
            part.file.close()
    return await run_in_threadpool(_summary, request, settings, ref, results, rows, session)


@router.get("/projects/{projectId}/images/tagged", dependencies=[READ])
def get_tagged_images(projectId: str, request: Request, session: SessionDep, settings: SettingsDep,  # noqa: N803
                      caller: TrainingCallerDep, iterationId: str | None = None, tagIds: str | None = None,
                      orderBy: str | None = Query(None, pattern="^(?i:newest|oldest|suggested)$"),
                      take: int = Query(50, ge=0, le=256), skip: int = Query(0, ge=0, le=2**31 - 1),
                      api_version: str = Version) -> list[dict]:
    """The images with one of the tags (of ``tagIds``, or any), with signed, expiring URLs to their bytes."""
    ref = cv.get_project(session, projectId, caller.datasets)
    rows = cv.tagged_images(session, ref, tag_ids=_ids(tagIds), newest_first=(orderBy or "newest").lower() != "oldest",
                            take=take, skip=skip)
    return [schemas.image(request, settings, image, tag) for image, tag in rows]


@router.get("/projects/{projectId}/images/tagged/count", dependencies=[READ])
def get_tagged_image_count(projectId: str, session: SessionDep, caller: TrainingCallerDep,  # noqa: N803
                           iterationId: str | None = None, tagIds: str | None = None,
                           api_version: str = Version) -> int:
    ref = cv.get_project(session, projectId, caller.datasets)
    wanted = {t.lower() for t in _ids(tagIds)}
    counts = cv.image_counts(session, ref)
    return sum(counts.get(t.label, 0) for t in cv.tags_of(session, ref) if not wanted or t.id in wanted)


# --- iterations ------------------------------------------------------------------------------


@router.post("/projects/{projectId}/train", dependencies=[WRITE])
def train_project(projectId: str, session: SessionDep, settings: SettingsDep, request_id: RequestIdDep,  # noqa: N803
                  caller: TrainingCallerDep, api_version: str = Version) -> dict:
    """A training with felis's defaults, as a new iteration (status Training until it completes or fails)."""
    ref = cv.get_project(session, projectId, caller.datasets)
    iteration, training = cv.train(session, ref, settings, request_id=request_id, key_id=caller.key_id)
    session.commit()  # enqueue only after the rows are durable
    trainings.send(training.id, enqueue_training)
    return schemas.iteration(ref, iteration, cv.iteration_state(session, ref, iteration))


@router.get("/projects/{projectId}/iterations", dependencies=[READ])
def get_iterations(projectId: str, session: SessionDep, caller: TrainingCallerDep,  # noqa: N803
                   api_version: str = Version) -> list[dict]:
    ref = cv.get_project(session, projectId, caller.datasets)
    return [schemas.iteration(ref, it, cv.iteration_state(session, ref, it)) for it in cv.iterations_of(session, ref)]


@router.get("/projects/{projectId}/iterations/{iterationId}", dependencies=[READ])
def get_iteration(projectId: str, iterationId: str, session: SessionDep, caller: TrainingCallerDep,  # noqa: N803
                  api_version: str = Version) -> dict:
    ref = cv.get_project(session, projectId, caller.datasets)
    iteration = cv.get_iteration(session, ref, iterationId)
    return schemas.iteration(ref, iteration, cv.iteration_state(session, ref, iteration))


@router.delete("/projects/{projectId}/iterations/{iterationId}", status_code=204, dependencies=[WRITE])
def delete_iteration(projectId: str, iterationId: str, session: SessionDep, store: StoreDep,  # noqa: N803
                     caller: TrainingCallerDep, api_version: str = Version) -> Response:
    """The iteration and its model version; refused while it trains or is published."""
    ref = cv.get_project(session, projectId, caller.datasets)
    cv.delete_iteration(session, store, ref, cv.get_iteration(session, ref, iterationId))
    return Response(status_code=204)


@router.get("/projects/{projectId}/iterations/{iterationId}/performance", dependencies=[READ])
def get_iteration_performance(projectId: str, iterationId: str, session: SessionDep,  # noqa: N803
                              caller: TrainingCallerDep, threshold: float = Query(0.5, ge=0, le=1),
                              overlapThreshold: float | None = None, api_version: str = Version) -> dict:
    """Precision, recall (at ``threshold``) and average precision per tag and over all, on validation images."""
    ref = cv.get_project(session, projectId, caller.datasets)
    return schemas.performance(cv.performance(session, ref, cv.get_iteration(session, ref, iterationId), threshold))


@router.post("/projects/{projectId}/iterations/{iterationId}/publish", dependencies=[WRITE])
def publish_iteration(projectId: str, iterationId: str, session: SessionDep, caller: TrainingCallerDep,  # noqa: N803
                      publishName: str = Query(max_length=cv.MAX_NAME), predictionId: str = Query(max_length=1024),
                      overwrite: bool = False, api_version: str = Version) -> bool:
    """The publish name becomes an alias of the iteration's version (also for /v1 predict's ?alias=)."""
    ref = cv.get_project(session, projectId, caller.datasets)
    cv.publish(session, ref, cv.get_iteration(session, ref, iterationId), publishName, predictionId, overwrite=overwrite)
    return True


@router.delete("/projects/{projectId}/iterations/{iterationId}/publish", status_code=204, dependencies=[WRITE])
def unpublish_iteration(projectId: str, iterationId: str, session: SessionDep, caller: TrainingCallerDep,  # noqa: N803
                        api_version: str = Version) -> Response:
    ref = cv.get_project(session, projectId, caller.datasets)
    cv.unpublish(session, ref, cv.get_iteration(session, ref, iterationId))
    return Response(status_code=204)
