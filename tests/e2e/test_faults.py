"""Faults with real processes: a full disk, an API killed mid-upload, the same image uploaded
concurrently. Nothing stored is lost or half-written, and every failure is a clean 4xx/5xx."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import ASSETS
from tests.utils.processes import start_felis

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


def test_api_killed_mid_upload_leaves_no_orphan_rows(tmp_path):
    proc, base = start_felis("api", tmp_path)
    httpx.post(f"{base}/v1/datasets", json={"name": "pets"})
    photos = sorted((ASSETS / "cifar-cat" / "train").rglob("*.jpg"))
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="label"\r\n\r\ncat\r\n'.encode()]
    for p in photos:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{p.name}"\r\n'
                     f"Content-Type: image/jpeg\r\n\r\n".encode() + p.read_bytes() + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"POST /v1/datasets/pets/images HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
                 f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode())
    sock.sendall(body[: len(body) // 2])  # half the body, then the process dies
    time.sleep(0.5)
    proc.kill_group()
    sock.close()
    proc2, base2 = start_felis("api", tmp_path)
    try:
        assert httpx.get(f"{base2}/v1/datasets/pets").json()["image_count"] == 0
        r = httpx.post(f"{base2}/v1/datasets/pets/images", data={"label": "cat"},
                       files=[("files", (p.name, p.read_bytes())) for p in photos])
        assert r.status_code == 201 and r.json()["created"] == len(photos)
    finally:
        proc2.stop()
