"""The one exception the client raises for an API error answer."""

from __future__ import annotations

from typing import Any


class FelisError(Exception):
    """An error answer from the API: HTTP ``status``, the machine-readable ``code`` and the ``message``.

    Connection problems are reported the same way with status 0 and code ``connection_error``."""

    def __init__(self, status: int, code: str, message: str, details: Any = None, body: Any = None):
        super().__init__(f"{status} {code}: {message}" if status else f"{code}: {message}")
        self.status, self.code, self.message, self.details, self.body = status, code, message, details, body
