"""The bytes behind get_tagged_images' signed URLs (urls.py): no key, a valid unexpired signature.
``original`` and ``resized`` are the stored bytes; ``thumbnail`` the cached JPEG of at most 320 px
a side that /v1's thumbnails are (service.domain.images.thumbnail)."""

from __future__ import annotations

from fastapi import APIRouter, Path, Query, Response
from starlette.concurrency import run_in_threadpool

from service.api.customvision import urls
from service.api.customvision.errors import CustomVisionRoute
from service.api.deps import SessionDep, SettingsDep, StoreDep
from service.domain import customvision as cv
from service.domain import images

router = APIRouter(prefix=urls.CONTENT_PREFIX, tags=["customvision"], route_class=CustomVisionRoute,
                   include_in_schema=False)

THUMBNAIL_SIDE = 320
_MEDIA = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "BMP": "image/bmp", "WEBP": "image/webp",
          "TIFF": "image/tiff"}
_HEADERS = {"Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"}


# open by design (tests/service/api/test_routes_declare_scopes.py OPEN): the signature is the permission
@router.get("/{image_id}/{kind}")
async def image_content(image_id: str, session: SessionDep, store: StoreDep, settings: SettingsDep,
                        kind: str = Path(pattern="^(original|resized|thumbnail)$"),
                        expires: int = Query(ge=0, le=2**62), signature: str = Query(max_length=128)) -> Response:
    urls.verify(settings, urls.content_path(image_id, kind), expires, signature)
    image = await run_in_threadpool(cv.image_for_content, session, image_id)
    if kind == "thumbnail":
        data = await run_in_threadpool(images.thumbnail, store, image, THUMBNAIL_SIDE)
        return Response(data, media_type="image/jpeg", headers=_HEADERS)
    data = await run_in_threadpool(images.content, store, image)
    return Response(data, media_type=_MEDIA.get(image.format.upper(), "application/octet-stream"), headers=_HEADERS)
