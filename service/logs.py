"""Logging: readable lines in a terminal, one JSON object per line in production.

Every line carries the context it was logged in: the API binds the request id (``X-Request-ID``)
for the whole request, and a worker binds the training id (and the request id that asked for
the training) while it trains. The context is a contextvar, so it follows the request into
threadpool calls and never leaks between concurrent requests; a logging filter on the handler
copies it onto each record.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from service.config import Settings

CONTEXT_FIELDS = ("request_id", "training_id", "dataset")
_context: ContextVar[dict[str, Any]] = ContextVar("felis_log_context", default={})


def bind(**fields: Any) -> None:
    """Add fields to the logging context of the current request or task (None removes a field)."""
    merged = {**_context.get(), **fields}
    _context.set({k: v for k, v in merged.items() if v is not None})


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Fields on every line logged inside the block, e.g. ``with log_context(training_id=t.id,
    request_id=t.request_id): run_training(t.id)``."""
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def current() -> dict[str, Any]:
    return dict(_context.get())


class ContextFilter(logging.Filter):
    """Copies the bound context onto each record (a field set with ``extra=`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in CONTEXT_FIELDS:
            if getattr(record, key, None) is not None:
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger [request_id=... training_id=...]: message``"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(context)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        fields = [f"{k}={getattr(record, k)}" for k in CONTEXT_FIELDS if getattr(record, k, None) is not None]
        record.context = f" [{' '.join(fields)}]" if fields else ""
        return super().format(record)


def make_handler(settings: Settings, stream=None) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_json else TextFormatter())
    handler.addFilter(ContextFilter())
    return handler


def configure_logging(settings: Settings) -> None:
    root = logging.getLogger()
    root.handlers[:] = [make_handler(settings)]
    root.setLevel(settings.log_level.upper())
