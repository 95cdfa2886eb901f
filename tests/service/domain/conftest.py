"""Fixtures of the domain tests: a dataset holding the 32 small real images of tests/assets."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest

from service.domain import datasets, uploads
from tests.conftest import ASSETS, zip_folder
from tests.utils.processes import create_postgres_database


@pytest.fixture
def pets(session, store, settings):
    dataset = datasets.create(session, "pets")
    session.commit()
    archive = io.BytesIO(zip_folder(ASSETS / "cifar-cat" / "train"))
    uploads.ingest(session, store, dataset, uploads.archive_candidates(archive, settings), settings)
    return dataset


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.production)])
def metadata_store(request, felis_env, monkeypatch) -> Iterator[str]:
    """Run the test on SQLite, or on a PostgreSQL database of its own (dropped afterwards): yields
    which. Sessions made through service.store.db afterwards talk to it."""
    from service.store.db import init_db
    from tests.conftest import _reset_caches

    drop = None
    if request.param == "postgresql":
        url, drop = create_postgres_database()
        monkeypatch.setenv("FELIS_DATABASE_URL", url)
        _reset_caches()
        init_db()
    try:
        yield request.param
    finally:
        _reset_caches()
        if drop:
            drop()
