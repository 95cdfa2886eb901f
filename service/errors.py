"""Domain errors. Each carries a machine-readable ``code``; the API maps classes to HTTP in one place
(``service/api/errors.py``), so nothing here knows about status codes."""

from __future__ import annotations

from typing import Any


class FelisError(Exception):
    """Base class: ``code`` is stable and machine-readable, ``message`` is for people."""

    code = "error"

    def __init__(self, message: str, *, code: str | None = None, details: Any = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.details = details


class NotFound(FelisError):
    code = "not_found"


class AlreadyExists(FelisError):
    code = "already_exists"


class Conflict(FelisError):
    """The request is valid but the resource's state does not allow it now."""

    code = "conflict"


class InvalidRequest(FelisError):
    code = "invalid_request"


class TooLarge(FelisError):
    code = "too_large"


class StorageFull(FelisError):
    code = "storage_full"


class Unavailable(FelisError):
    """A dependency (database, broker, storage) cannot be reached right now."""

    code = "unavailable"


class Unauthorized(FelisError):
    code = "unauthorized"


class Forbidden(FelisError):
    code = "forbidden"


class RateLimited(FelisError):
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: float, **kw: Any):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class TooMany(FelisError):
    """A count is at its cap (unfinished trainings of a dataset or of a key): valid, but refused
    until one of those finishes or is cancelled; no time to wait is known (no Retry-After)."""

    code = "too_many"


class SchemaOutdated(Unavailable):
    """The database's schema is not the one this code was written for (older, unknown, or never
    migrated): the process refuses to run on it. ``details`` holds ``current`` and ``head``."""

    code = "schema_outdated"
