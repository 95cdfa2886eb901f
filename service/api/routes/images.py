"""/v1/datasets/{name}/images: upload (files or a zip), list, read, thumbnails, relabel (one or many), delete."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from models.split import MAX_NEAR_DUPLICATE_BITS, NEAR_DUPLICATE_BITS
from service.api.auth import InDataset, Requires
from service.api.deps import SessionDep, SettingsDep, StoreDep, read_body, read_form
from service.api.errors import error_body
from service.api.metrics import Counts, count_uploads
from service.api.middleware import BodyLimit, Capped, InFlight
from service.domain import datasets, images, uploads
from service.domain.keys import Scope
from service.errors import InvalidRequest

router = APIRouter(prefix="/datasets/{name}/images", tags=["images"], dependencies=[InDataset])

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                                  "description": "image files, all with the same label"},
                        "label": {"type": "string", "description": "the label of every file in 'files'"},
                        "archive": {"type": "string", "format": "binary",
                                    "description": "a zip with one top-level folder per label"},
                    },
                }
            }
        },
    }
}


# What an upload's form keeps of its files in memory, all parts together; the rest is spooled to
# temporary files. Enough for thousands of small images (5,000 CIFAR-size JPEGs take about 6 MB).
_FORM_MEMORY_BYTES = 8 * 1024 * 1024


@router.post("", status_code=201, openapi_extra=_UPLOAD_BODY,
             dependencies=[Requires(Scope.WRITE, rate_limit="upload"), Counts(count_uploads), InFlight(Capped.REQUESTS),
                           BodyLimit()],
             responses={207: {"description": "some files were not stored"},
                        422: {"description": "no file was stored"}})
async def upload_images(name: str, request: Request, session: SessionDep, store: StoreDep,
                        settings: SettingsDep) -> JSONResponse:
    """Upload images: `files` (repeatable) with one `label` (none: stored unlabeled), or one `archive`
    zip with a folder per label (its top-level images and its `unlabeled/` folder: unlabeled)."""
    dataset = await run_in_threadpool(datasets.get, session, name)
    form = await read_form(request, max_files=settings.max_files_per_request, max_fields=100,
                           max_memory_bytes=_FORM_MEMORY_BYTES)
    try:
        archives = [f for f in form.getlist("archive") if isinstance(f, UploadFile)]
        files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        labels = form.getlist("label")
        label = labels[0] if labels else None
        if archives and files:
            raise InvalidRequest("send either 'files' or 'archive', not both", code="mixed_upload")
        if len(archives) > 1:
            raise InvalidRequest("send one 'archive' per request", code="too_many_archives")
        if archives and any(labels):  # an empty one (curl -F label=) says nothing
            raise InvalidRequest("an archive's labels are its folders (one per label; top-level images are stored "
                                 "unlabeled): send it without 'label'", code="label_with_archive")
        if len(labels) > 1:
            raise InvalidRequest("send one 'label' per request: every file of a request gets it", code="too_many_labels")
        if archives:
            candidates = await run_in_threadpool(uploads.archive_candidates, archives[0].file, settings)
        elif files:
            candidates = uploads.files_candidates(
                [(f.filename or "upload", uploads.file_reader(f.file, settings)) for f in files],
                label if isinstance(label, str) else None)
        else:
            raise InvalidRequest("no files: send 'files' (with 'label') or 'archive'", code="empty_upload")
        report = await run_in_threadpool(uploads.ingest, session, store, dataset, candidates, settings)
    finally:
        await form.close()
    body = report.as_dict()
    if body["created"] == len(body["results"]):
        return JSONResponse(body, status_code=201)
    if body["created"]:
        return JSONResponse(body, status_code=207)
    reason = "all files were duplicates" if body["duplicates"] == len(body["results"]) else "no file could be stored"
    return JSONResponse({**error_body("no_images_created", reason), **body}, status_code=422)


@router.get("", dependencies=[Requires(Scope.READ)])
def list_images(name: str, session: SessionDep, label: str | None = None,
                labeled: bool | None = Query(None, description="true: only labelled images; false: only unlabeled ones"),
                limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=2**31 - 1),
                cursor: str | None = Query(None, max_length=200, description="next_cursor of the page before")) -> dict:
    """Oldest first. Page with `cursor` (each page the same cost, however deep) or `offset`."""
    dataset = datasets.get(session, name)
    rows, total, after = images.list_images(session, dataset, label=label, labeled=labeled, limit=limit, offset=offset,
                                            cursor=cursor)
    return {"data": [images.describe(i) for i in rows], "count": total, "next_cursor": after}


class KnownQuery(BaseModel):
    sha256: list[str] = Field(description="content hashes (hex) of files about to be uploaded; at most 10,000")


_KNOWN = TypeAdapter(KnownQuery)
_KNOWN_BODY_BYTES = 1024 * 1024  # 10,000 hashes of 66 bytes, with room


@router.post("/known", dependencies=[Requires(Scope.READ), BodyLimit(_KNOWN_BODY_BYTES)],
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": _KNOWN.json_schema()}}}})
async def known_images(name: str, request: Request, session: SessionDep) -> dict:
    """Which of these sha256s the dataset holds already: `{"known": [...]}`. An upload that
    resumes after an interruption sends only the others (felis upload does)."""
    try:
        body = _KNOWN.validate_json(await read_body(request, _KNOWN_BODY_BYTES))
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_context=False)) from None
    dataset = await run_in_threadpool(datasets.get, session, name)
    return {"known": await run_in_threadpool(images.known, session, dataset, body.sha256)}


@router.get("/near-duplicates", dependencies=[Requires(Scope.READ)])
def near_duplicates(name: str, session: SessionDep,
                    max_distance: int = Query(NEAR_DUPLICATE_BITS, ge=0, le=MAX_NEAR_DUPLICATE_BITS),
                    limit: int = Query(50, ge=1, le=1000), offset: int = Query(0, ge=0, le=2**31 - 1)) -> dict:
    """Groups of near-identical images (perceptual hash within max_distance bits), label conflicts
    first, a page at a time; count is the number of groups."""
    groups, total = images.near_duplicates(session, datasets.get(session, name), max_distance, limit=limit, offset=offset)
    return {"data": groups, "count": total, "max_distance": max_distance}


@router.get("/{image_id}", dependencies=[Requires(Scope.READ)])
def get_image(name: str, image_id: str, session: SessionDep) -> dict:
    return images.describe(images.get(session, datasets.get(session, name), image_id))


_MEDIA = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif",
          "BMP": "image/bmp", "TIFF": "image/tiff"}


@router.get("/{image_id}/content", response_class=Response, dependencies=[Requires(Scope.READ)],
            responses={200: {"content": {"image/*": {}}, "description": "the uploaded bytes"}})
def get_image_content(name: str, image_id: str, session: SessionDep, store: StoreDep) -> Response:
    image = images.get(session, datasets.get(session, name), image_id)
    return Response(images.content(store, image), media_type=_MEDIA.get(image.format, "application/octet-stream"),
                    headers={"Cache-Control": "private, max-age=31536000, immutable", "ETag": f'"{image.sha256}"',
                             "X-Content-Type-Options": "nosniff"})


@router.get("/{image_id}/thumbnail", response_class=Response, dependencies=[Requires(Scope.READ)],
            responses={200: {"content": {"image/jpeg": {}}, "description": "a small upright RGB JPEG, cached"}})
def get_image_thumbnail(name: str, image_id: str, session: SessionDep, store: StoreDep,
                        size: int = Query(images.THUMBNAIL_SIZE, description="longest side in pixels: "
                                          + ", ".join(map(str, images.THUMBNAIL_SIZES)))) -> Response:
    """A small JPEG of the image (longest side `size`, EXIF orientation applied), made once and cached."""
    image = images.get(session, datasets.get(session, name), image_id)
    return Response(images.thumbnail(store, image, size), media_type="image/jpeg",
                    headers={"Cache-Control": "private, max-age=31536000, immutable",
                             "ETag": f'"{image.sha256}-{size}"', "X-Content-Type-Options": "nosniff"})


class ImagePatch(BaseModel):
    label: str | None = Field(description="the new label; null: unlabeled again")


class ImageLabel(BaseModel):
    image_id: str = Field(max_length=64)
    label: str | None = Field(max_length=64, description="null: unlabeled")


_LABELS = TypeAdapter(list[ImageLabel])
_LABELS_BODY_BYTES = 256 * 1024  # 1,000 items of ~100 bytes, with room: read no more than this


@router.post("/labels", dependencies=[Requires(Scope.WRITE), BodyLimit(_LABELS_BODY_BYTES)],
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": _LABELS.json_schema()}}}},
             responses={207: {"description": "some items were rejected: a result per item"}})
async def label_images(name: str, request: Request, session: SessionDep) -> JSONResponse:
    """Label many images at once: `[{"image_id", "label"}]` (label null: unlabeled again), at most
    1,000. 200 when every item applied, 207 otherwise; a result per item, in order."""
    try:
        items = _LABELS.validate_json(await read_body(request, _LABELS_BODY_BYTES))
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_context=False)) from None
    dataset = await run_in_threadpool(datasets.get, session, name)
    results = await run_in_threadpool(images.label_many, session, dataset, [(i.image_id, i.label) for i in items])
    rejected = sum(r["status"] == "rejected" for r in results)
    return JSONResponse({"results": results, "applied": len(results) - rejected, "rejected": rejected},
                        status_code=207 if rejected else 200)


@router.patch("/{image_id}", dependencies=[Requires(Scope.WRITE)])
def relabel_image(name: str, image_id: str, body: ImagePatch, session: SessionDep) -> dict:
    return images.describe(images.relabel(session, datasets.get(session, name), image_id, body.label))


@router.delete("/{image_id}", status_code=204, dependencies=[Requires(Scope.WRITE)])
def delete_image(name: str, image_id: str, session: SessionDep, store: StoreDep) -> Response:
    images.delete(session, store, datasets.get(session, name), image_id)
    return Response(status_code=204)
