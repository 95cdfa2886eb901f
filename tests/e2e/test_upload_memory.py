"""Upload memory, against a real `felis api` process (security finding 5).

Before: a request's files were checked 64 at a time and each kept its raw bytes until the chunk's
blobs were written, so 64 files of 8 MB held 512 MB at once (and Starlette's form parser kept up to
1 MiB of every part in memory). Now a file's bytes are held only while a thread checks it and while
its blob is written, and the form keeps at most 8 MiB of its files in memory: the API's peak stays
about decoding threads x (file + decoded image) above its baseline, whatever the number of files.

The files are distinct, valid PNGs of about 8 MB: a real photo with noise over it, each with a text
chunk of its own (no two alike, so none is deduplicated); the loose ones are streamed from one copy
of those bytes, so that the test process stays small too."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import DATASETS, needs_datasets
from tests.utils.processes import api_pid, start_felis

pytestmark = [pytest.mark.timeout(400), needs_datasets()]

THREADS = 2  # FELIS_TORCH_THREADS: the upload's decoding threads, whatever the machine
SIDE = 1632  # pixels: 1632 x 1632 x 3 = 8 MB decoded, about as much as PNG
GROWTH_CAP_MB = 300  # the API's peak RSS over its warm baseline; before: 64 x 8 MB of raw bytes alone is 512 MB
REPEAT_CAP_MB = 64  # what a second upload with twice the files may add to that peak
BOUNDARY = "felis-upload-memory"


def _vm_hwm_mb(pid: int) -> float:
    """The process's peak resident memory so far."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def _noisy_photo() -> tuple[bytes, bytes]:
    """A real photo at SIDE x SIDE with noise over it, as PNG: (its bytes up to IEND, the IEND chunk)."""
    photo = sorted((DATASETS / "photos" / "train" / "cat").iterdir())[0]
    rgb = np.asarray(Image.open(photo).convert("RGB").resize((SIDE, SIDE)), dtype=np.int16)
    noisy = np.clip(rgb + np.random.default_rng(0).integers(-64, 64, rgb.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, "PNG", compress_level=1)
    png = buf.getvalue()
    assert png[-12:-8] == b"\0\0\0\0" and png[-8:-4] == b"IEND"
    return png[:-12], png[-12:]


def _text_chunk(i: int) -> bytes:
    data = b"felis\0" + str(i).encode()
    return struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data))


def _form(indices: range, head: bytes, tail: bytes) -> Iterator[bytes]:
    """A multipart body of files (label cat), streamed: the photo's bytes are never copied."""
    yield f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="label"\r\n\r\ncat\r\n'.encode()
    for i in indices:
        yield (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{i}.png"\r\n'
               "Content-Type: image/png\r\n\r\n").encode()
        yield from (head, _text_chunk(i), tail, b"\r\n")
    yield f"--{BOUNDARY}--\r\n".encode()


def _upload_files(c: httpx.Client, indices: range, head: bytes, tail: bytes) -> dict:
    r = c.post("/v1/datasets/pets/images", content=_form(indices, head, tail),
               headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert r.status_code == 201, r.text[:500]
    return r.json()


def test_many_large_files_and_zip_members_keep_the_api_small(tmp_path):
    head, tail = _noisy_photo()
    size_mb = (len(head) + len(tail)) / 1e6
    assert size_mb > 6, size_mb
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:  # PNG does not deflate
        for i in range(1000, 1128):
            zf.writestr(f"cat/{i}.png", head + _text_chunk(i) + tail)
    proc, base = start_felis("api", tmp_path, FELIS_TORCH_THREADS=str(THREADS),
                             FELIS_MAX_REQUEST_BYTES=str(2 * 1024**3))  # 128 files of 8 MB: over the 512 MiB default
    pid = api_pid([proc])  # `felis api` with one uvicorn worker: the process itself (no Celery worker here)
    try:
        with httpx.Client(base_url=base, timeout=300) as c:
            assert c.post("/v1/datasets", json={"name": "pets"}).status_code == 201
            _upload_files(c, range(1), head, tail)  # warm: imports, a decoding thread's arena, the database
            warm = _vm_hwm_mb(pid)
            peaks = []
            for indices in (range(100, 164), range(200, 328)):
                assert _upload_files(c, indices, head, tail)["created"] == len(indices)
                peaks.append(_vm_hwm_mb(pid))
            with archive.open("rb") as f:
                r = c.post("/v1/datasets/pets/images", files={"archive": ("set.zip", f, "application/zip")})
            assert r.status_code == 201 and r.json()["created"] == 128, r.text[:500]
            peaks.append(_vm_hwm_mb(pid))
            assert c.get("/v1/datasets/pets").json()["image_count"] == 1 + 64 + 128 + 128
        assert proc.popen.poll() is None, proc.tail()
        growth = [round(p - warm) for p in peaks]
        print(f"\nAPI peak RSS {warm:.0f} MB warm; growth over it after 64 loose files of {size_mb:.1f} MB, "
              f"then 128 loose, then a zip of 128: {growth} MB")
        assert growth[0] < GROWTH_CAP_MB, f"64 files: the API's peak grew by {growth[0]} MB over {warm:.0f} MB"
        assert growth[1] - growth[0] < REPEAT_CAP_MB, f"128 files raised the peak: {growth} MB"
        assert growth[2] - growth[0] < REPEAT_CAP_MB, f"a zip of 128 raised the peak: {growth} MB"
    finally:
        proc.stop()
