"""Custom Vision's error form, ``{"code": "NotFoundProject", "message": "..."}``, for its routes.

The HTTP status of a domain error is still service.api.errors.status_for's (the one place they
map); only the body changes, by the routers' route class (``CustomVisionRoute``), never by the
URL. ``CODES`` maps felis's codes to Custom Vision's (its CustomVisionErrorCodes names); any other
falls back by the error's class.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from service import errors as e
from service.api.errors import ProtocolRoute, status_for

CODES: dict[str, str] = {
    # who is calling
    "api_key_required": "Unauthorized",
    "invalid_api_key": "Unauthorized",
    "insufficient_scope": "Forbidden",
    "key_limited_to_datasets": "Forbidden",
    "invalid_signature": "Forbidden",
    "url_expired": "Forbidden",
    # what is not there
    "project_not_found": "NotFoundProject",
    "dataset_not_found": "NotFoundProject",
    "tag_not_found": "NotFoundTag",
    "iteration_not_found": "NotFoundIteration",
    "training_not_found": "NotFoundIteration",
    "version_not_found": "NotFoundIteration",
    "no_model": "NotFoundIteration",
    "publish_name_not_found": "NotFound",
    "image_not_found": "NotFoundImage",
    "domain_not_found": "NotFoundDomain",
    # projects and tags
    "invalid_project_name": "BadRequestProjectName",
    "invalid_description": "BadRequestProjectDescription",
    "unknown_domain": "BadRequestProjectUnknownDomain",
    "unknown_classification": "BadRequestProjectUnknownClassification",
    "multilabel_unsupported": "BadRequestNotSupported",
    "tag_type_unsupported": "BadRequestNotSupported",
    "invalid_tag_name": "BadRequestTagName",
    "tag_exists": "BadRequestTagNameNotUnique",
    "project_name_taken": "BadRequestProjectNameNotUnique",
    # images
    "too_many_images": "BadRequestExceededBatchSize",
    "too_many_files": "BadRequestExceededBatchSize",
    "request_too_large": "BadRequestImageSizeBytes",
    "file_too_large": "BadRequestImageSizeBytes",
    "image_too_large": "BadRequestImageDimensions",
    "image_too_small": "BadRequestImageDimensions",
    "not_an_image": "BadRequestImageFormat",
    "unsupported_format": "BadRequestImageFormat",
    "truncated_image": "BadRequestImageFormat",
    "empty_file": "BadRequestImageStream",
    "empty_upload": "BadRequestImageBatch",
    "invalid_batch": "BadRequestImageBatch",
    "invalid_multipart": "BadRequestImageStream",
    "url_fetch_disabled": "BadRequestNotSupported",
    "url_not_allowed": "BadRequestImageUrl",
    "invalid_url": "BadRequestImageUrl",
    "url_unreachable": "BadRequestImageUrl",
    "url_unreadable": "BadRequestImageUrl",
    # training and iterations
    "too_few_labels": "BadRequestTrainingValidationFailed",
    "too_few_images": "BadRequestTrainingValidationFailed",
    "training_memory_exceeded": "BadRequestTrainingValidationFailed",
    "too_many_trainings": "BadRequestTrainingAlreadyInProgress",
    "training_active": "BadRequestIterationIsTraining",
    "iteration_not_completed": "BadRequestIterationNotCompleted",
    "iteration_published": "BadRequestCannotDeletePublishedIteration",
    "iteration_not_published": "BadRequestUnpublishFailed",
    "publish_name_taken": "BadRequestPublishNameNotUnique",
    "invalid_publish_name": "BadRequestInvalidPublishName",
    "invalid_threshold": "BadRequestInvalidThreshold",
    "version_is_default": "Conflict",
    "version_published": "BadRequestCannotDeletePublishedIteration",
    # the service
    "rate_limited": "TooManyRequests",
    "server_busy": "TooManyRequests",
    "storage_full": "ErrorStorageFull",
    "database_unavailable": "ErrorServiceUnavailable",
    "broker_unavailable": "ErrorServiceUnavailable",
    "storage_unavailable": "ErrorServiceUnavailable",
    "validation_error": "BadRequest",
}
_BY_CLASS: tuple[tuple[type[e.FelisError], str], ...] = (
    (e.NotFound, "NotFound"), (e.AlreadyExists, "Conflict"), (e.Conflict, "Conflict"), (e.TooLarge, "BadRequest"),
    (e.InvalidRequest, "BadRequest"), (e.Unauthorized, "Unauthorized"), (e.Forbidden, "Forbidden"),
    (e.RateLimited, "TooManyRequests"), (e.TooMany, "TooManyRequests"), (e.StorageFull, "ErrorStorageFull"),
    (e.Unavailable, "ErrorServiceUnavailable"),
)
_BY_STATUS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 405: "BadRequestNotSupported",
              409: "Conflict", 413: "BadRequestImageSizeBytes", 415: "UnsupportedMediaType", 429: "TooManyRequests"}


def code_for(exc: e.FelisError) -> str:
    if exc.code in CODES:
        return CODES[exc.code]
    return next((code for cls, code in _BY_CLASS if isinstance(exc, cls)), "ErrorUnknown")


def error_response(code: str, message: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status, headers=headers)


def _felis(exc: e.FelisError) -> JSONResponse:
    headers = {}
    if isinstance(exc, e.RateLimited):
        headers["Retry-After"] = str(max(1, int(exc.retry_after + 0.999)))
    return error_response(code_for(exc), exc.message, status_for(exc), headers)


class CustomVisionRoute(ProtocolRoute):
    """Renders every error of its routes (their dependencies' too: the key check) in Custom Vision's
    form, and the middlewares' refusals made before they run (service.api.errors.refusal)."""

    validation_status = 400  # as the service answers a parameter it cannot read
    validation_loc_skips = ("query", "path", "body")

    @staticmethod
    def render_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return error_response(CODES.get(code) or _BY_STATUS.get(status, "ErrorUnknown"), message, status, headers)

    @classmethod
    def render_domain(cls, exc: e.FelisError) -> JSONResponse:
        return _felis(exc)
