"""Fixtures of the domain tests: a dataset holding the 32 small real images of tests/assets."""

from __future__ import annotations

import io

import pytest

from service.domain import datasets, uploads
from tests.conftest import ASSETS, zip_folder


@pytest.fixture
def pets(session, store, settings):
    dataset = datasets.create(session, "pets")
    session.commit()
    archive = io.BytesIO(zip_folder(ASSETS / "cifar-cat" / "train"))
    uploads.ingest(session, store, dataset, uploads.archive_candidates(archive, settings), settings)
    return dataset
