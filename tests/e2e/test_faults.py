"""Faults with real processes: a full disk, an API killed during an upload's ingest, the same image
uploaded concurrently. Nothing stored is lost or half-written, an upload is stored whole or not at
all, and every failure is a clean 4xx/5xx."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import ASSETS, DATASETS, needs_datasets
from tests.utils.processes import create_postgres_database, start_felis

pytestmark = pytest.mark.timeout(300)


def _cats() -> list[Path]:
    return sorted((ASSETS / "cifar-cat" / "train" / "cat").iterdir())


def test_same_image_uploaded_concurrently_is_stored_once(tmp_path):
    proc, base = start_felis("api", tmp_path)
    try:
        httpx.post(f"{base}/v1/datasets", json={"name": "pets"})
        data = _cats()[0].read_bytes()

        def upload(i: int) -> dict:
            r = httpx.post(f"{base}/v1/datasets/pets/images", data={"label": "cat"},
                           files={"files": (f"copy{i}.jpg", data, "image/jpeg")}, timeout=60)
            assert r.status_code in (201, 422), r.text
            return r.json()["results"][0]

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(upload, range(32)))
        assert sum(r["status"] == "created" for r in results) == 1
        assert {r["image_id"] for r in results} == {results[0]["image_id"]}
        assert httpx.get(f"{base}/v1/datasets/pets").json()["image_count"] == 1
        blobs = [p for p in (tmp_path / "var" / "blobs").rglob("*") if p.is_file()]
        assert len(blobs) == 1 and blobs[0].read_bytes() == data
    finally:
        proc.stop()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MiB filesystem for blobs: real ENOSPC, not a mock (needs root to mount tmpfs)."""
    mnt = tmp_path / "blobs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        if os.environ.get("CI"):
            pytest.fail("could not mount a tmpfs for the disk-full test")
        pytest.skip("mounting a tmpfs needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_is_a_clean_507_and_loses_nothing(tmp_path, tiny_disk):
    proc, base = start_felis("api", tmp_path, FELIS_STORAGE_PATH=str(tiny_disk))
    try:
        httpx.post(f"{base}/v1/datasets", json={"name": "pets"})
        first = _cats()[:3]
        r = httpx.post(f"{base}/v1/datasets/pets/images", data={"label": "cat"},
                       files=[("files", (p.name, p.read_bytes())) for p in first])
        assert r.status_code == 201
        stored = {x["image_id"]: p.read_bytes() for x, p in zip(r.json()["results"], first)}
        filler = tiny_disk / "filler"
        with open(filler, "wb", buffering=0) as f:  # take every free byte
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        big = sorted((ASSETS / "cifar-cat" / "train" / "noncat").iterdir())
        r = httpx.post(f"{base}/v1/datasets/pets/images", data={"label": "noncat"},
                       files=[("files", (p.name, p.read_bytes())) for p in big])
        assert r.status_code == 507, r.text
        assert r.json()["error"]["code"] == "storage_full"
        filler.unlink()
        for image_id, data in stored.items():
            assert httpx.get(f"{base}/v1/datasets/pets/images/{image_id}/content").content == data
        assert not list(tiny_disk.rglob(".tmp-*"))
        listing = httpx.get(f"{base}/v1/datasets/pets/images", params={"limit": 1000}).json()
        for img in listing["data"]:  # every row has its whole blob
            content = httpx.get(f"{base}/v1/datasets/pets/images/{img['id']}/content").content
            assert hashlib.sha256(content).hexdigest() == img["sha256"]
    finally:
        proc.stop()


def _photos_zip() -> bytes:
    """The 1,200 real photos of photos/train, a folder per label, stored (JPEG does not deflate)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted((DATASETS / "photos" / "train").rglob("*.jpg")):
            zf.write(path, path.relative_to(DATASETS / "photos" / "train").as_posix())
    return buf.getvalue()


def _blob_names(root: Path) -> set[str]:
    return {p.name for p in root.rglob("*") if p.is_file() and not p.name.startswith(".tmp-")}


def _count(engine, sql: str) -> int:
    with engine.connect() as conn:
        return conn.exec_driver_sql(sql).scalar()


@needs_datasets()
@pytest.mark.timeout(120)
@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgresql", marks=pytest.mark.production)])
def test_api_killed_during_ingest_stores_nothing_of_that_upload(tmp_path, db):
    """SIGKILL once the body is parsed and some of its files are stored: none of that request's
    images is visible after a restart, earlier ones are intact, and the workers' sweep removes the
    dead upload's stage and its blobs once FELIS_UPLOAD_STAGE_TTL_SECONDS has passed. Before:
    the rows of the files stored so far stayed (SQLite committed at each RELEASE SAVEPOINT)."""
    from service.store.db import make_engine

    env = {"FELIS_UPLOAD_STAGE_TTL_SECONDS": "3", "FELIS_BLOB_GRACE_SECONDS": "1", "FELIS_TRAINING_SWEEP_SECONDS": "1"}
    drop = None
    if db == "postgresql":
        env["FELIS_DATABASE_URL"], drop = create_postgres_database()
    url = env.get("FELIS_DATABASE_URL") or f"sqlite:///{tmp_path / 'var' / 'felis.db'}"
    blobs = tmp_path / "var" / "blobs"
    archive = _photos_zip()
    proc, base = start_felis("api", tmp_path, **env)
    engine = make_engine(url)
    procs = [proc]
    try:
        httpx.post(f"{base}/v1/datasets", json={"name": "pets"})
        earlier = _cats()[:3]
        r = httpx.post(f"{base}/v1/datasets/pets/images", data={"label": "cat"},
                       files=[("files", (p.name, p.read_bytes())) for p in earlier])
        assert r.status_code == 201
        stored = {x["image_id"]: p.read_bytes() for x, p in zip(r.json()["results"], earlier)}
        before = _blob_names(blobs)

        answer: list[object] = []

        def upload() -> None:
            try:
                answer.append(httpx.post(f"{base}/v1/datasets/pets/images", timeout=120,
                                         files={"archive": ("photos.zip", archive, "application/zip")}))
            except httpx.HTTPError as e:
                answer.append(e)

        sender = threading.Thread(target=upload)
        sender.start()
        deadline = time.monotonic() + 60
        while len(_blob_names(blobs) - before) < 80:  # more than a chunk of its files is stored
            assert time.monotonic() < deadline and not answer, f"the upload never got going: {answer}"
            time.sleep(0.05)
        proc.kill_group()
        sender.join(30)
        assert answer and isinstance(answer[0], httpx.HTTPError), f"the upload finished before the kill: {answer}"
        assert len(_blob_names(blobs) - before) >= 80

        assert _count(engine, "SELECT count(*) FROM images") == len(earlier)  # nothing of the killed request
        assert _count(engine, "SELECT count(*) FROM image_stage") > 0  # only its stage, for the sweep

        proc, base = start_felis("up", tmp_path, **env)  # the API again, and a worker that sweeps
        procs.append(proc)
        listing = httpx.get(f"{base}/v1/datasets/pets/images", params={"limit": 1000}).json()
        assert {img["id"] for img in listing["data"]} == set(stored)
        deadline = time.monotonic() + 45
        while _count(engine, "SELECT count(*) FROM image_stage") or _blob_names(blobs) != before:
            assert time.monotonic() < deadline, (f"the sweep left {_count(engine, 'SELECT count(*) FROM image_stage')} "
                                                 f"staged rows, {len(_blob_names(blobs) - before)} blobs")
            time.sleep(0.3)
        for image_id, data in stored.items():
            assert httpx.get(f"{base}/v1/datasets/pets/images/{image_id}/content").content == data
        again = sorted((DATASETS / "photos" / "train" / "cat").iterdir())[:5]
        r = httpx.post(f"{base}/v1/datasets/pets/images", data={"label": "cat"},
                       files=[("files", (p.name, p.read_bytes())) for p in again], timeout=60)
        assert r.status_code == 201 and r.json()["created"] == len(again), r.text
        for x, p in zip(r.json()["results"], again):
            assert httpx.get(f"{base}/v1/datasets/pets/images/{x['image_id']}/content").content == p.read_bytes()
    finally:
        for p in procs:
            p.stop()
        engine.dispose()
        if drop:
            drop()
