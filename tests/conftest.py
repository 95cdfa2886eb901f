"""Shared fixtures: an isolated felis (data dir, SQLite, filesystem broker) per test, real images."""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(__file__).resolve().parent / "assets"
DATASETS = Path(os.environ.get("FELIS_DATASETS", ROOT.parent / "shared" / "datasets")).resolve()


def pytest_configure(config: pytest.Config) -> None:
    # CI sets FELIS_DATASETS: then the tests that read the shared sets must run, never skip.
    if os.environ.get("FELIS_DATASETS") and not DATASETS.is_dir():
        raise pytest.UsageError(f"FELIS_DATASETS={DATASETS} does not exist")


def needs_datasets() -> pytest.MarkDecorator:
    return pytest.mark.skipif(not DATASETS.is_dir(), reason=f"shared datasets not at {DATASETS}")


def _reset_caches() -> None:
    from service.config import get_settings
    from service.store import queue
    from service.store.blobs import get_store
    from service.store.db import reset_caches

    get_settings.cache_clear()
    reset_caches()
    get_store.cache_clear()
    queue.get_producer.cache_clear()


@pytest.fixture
def felis_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh embedded-mode felis under tmp_path: SQLite, local blobs, filesystem broker."""
    for key in list(os.environ):
        if key.startswith("FELIS_") and key != "FELIS_DATASETS":
            monkeypatch.delenv(key)
    monkeypatch.setenv("FELIS_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("FELIS_ALLOWED_HOSTS", "testserver")  # the Host header of Starlette's TestClient
    _reset_caches()
    from service.store.db import init_db

    init_db()
    yield tmp_path / "var"
    _reset_caches()


@pytest.fixture
def session(felis_env: Path):
    from service.store.db import new_session

    s = new_session()
    yield s
    s.close()


@pytest.fixture
def store(felis_env: Path):
    from service.store.blobs import get_store

    return get_store()


@pytest.fixture
def settings(felis_env: Path):
    from service.config import get_settings

    return get_settings()


def asset_images(split: str = "train", label: str = "cat") -> list[Path]:
    return sorted((ASSETS / "cifar-cat" / split / label).iterdir())


def zip_folder(folder: Path, wrapper: str | None = None) -> bytes:
    """A zip of a folder-per-label tree, as `cd folder && zip -r set.zip .` makes it."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                arc = path.relative_to(folder).as_posix()
                zf.write(path, f"{wrapper}/{arc}" if wrapper else arc)
    return buf.getvalue()
