"""An isolated felis app in this process, for module-scoped API fixtures that train once."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def isolated_client(data_dir: Path) -> Iterator["TestClient"]:  # noqa: F821
    """A TestClient on a fresh embedded-mode app: no FELIS_ setting from the environment except
    FELIS_DATASETS, its own data folder (SQLite, blobs, broker), the caches reset before and after."""
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.store.db import init_db
    from tests.conftest import _reset_caches

    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith("FELIS_") and key != "FELIS_DATASETS":
                mp.delenv(key)
        mp.setenv("FELIS_DATA_DIR", str(data_dir))
        mp.setenv("FELIS_ALLOWED_HOSTS", "testserver")
        _reset_caches()
        init_db()
        try:
            with TestClient(create_app()) as client:
                yield client
        finally:
            _reset_caches()
