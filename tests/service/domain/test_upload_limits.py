"""Uploads stay bounded whatever they hold (security finding 5): a loose file is read no further
than the file limit, raw bytes do not accumulate across a request's files, the form keeps little
of its files in memory, and a zip's entries are counted from its end records and its directory's
headers before zipfile parses the directory (folders, __MACOSX and dot entries included)."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.domain import datasets, uploads
from service.errors import InvalidRequest, TooLarge
from tests.conftest import asset_images

MAX_FILE_BYTES = 10_000
MAX_MEMBERS = 50


@pytest.fixture
def client(felis_env, monkeypatch):
    monkeypatch.setenv("FELIS_MAX_FILE_BYTES", str(MAX_FILE_BYTES))
    monkeypatch.setenv("FELIS_MAX_ARCHIVE_MEMBERS", str(MAX_MEMBERS))
    from service.api.app import create_app
    from service.config import get_settings

    get_settings.cache_clear()
    with TestClient(create_app()) as c:
        c.post("/v1/datasets", json={"name": "pets"})
        yield c


# --- loose files ----------------------------------------------------------------------------------


def test_a_loose_file_over_the_limit_is_read_no_further_than_the_limit(client, monkeypatch):
    """Before: the route passed f.file.read as the reader, so a 400 MB part was read whole before
    its size was compared with FELIS_MAX_FILE_BYTES."""
    reads: list[int] = []
    ingest = uploads.ingest

    def spy(session, store, dataset, candidates, settings):
        candidates = list(candidates)
        reads.extend(len(c.read()) for c in candidates)  # a reader may be called again
        return ingest(session, store, dataset, candidates, settings)

    monkeypatch.setattr(uploads, "ingest", spy)
    good = asset_images()[0].read_bytes()
    r = client.post("/v1/datasets/pets/images", data={"label": "cat"},
                    files=[("files", ("big.jpg", good + b"\0" * 300_000)), ("files", ("ok.jpg", good))])
    assert reads == [MAX_FILE_BYTES + 1, len(good)]
    results = [(x["status"], x["reason"]) for x in r.json()["results"]]
    assert results == [("rejected", "file_too_large"), ("created", None)]


def test_the_upload_form_keeps_little_of_its_files_in_memory(client, monkeypatch):
    """Before: Starlette's parser kept every file part of up to 1 MiB in memory, so a 512 MiB body
    of 1 MiB parts sat in RAM."""
    from service.api.routes import images as route

    held: list[int] = []
    read_form = route.read_form

    async def spy(request, *args, **kwargs):
        form = await read_form(request, *args, **kwargs)
        held.append(sum(f.size for f in form.getlist("files") if not getattr(f.file, "_rolled", True)))
        return form

    monkeypatch.setattr(route, "read_form", spy)
    files = [("files", (f"{i}.jpg", bytes([i]) * 512 * 1024)) for i in range(40)]  # 20 MiB
    r = client.post("/v1/datasets/pets/images", data={"label": "cat"}, files=files)
    assert r.status_code == 422 and r.json()["rejected"] == 40
    assert held[0] <= 8 * 2**20, f"{held[0] / 2**20:.1f} MiB of the form's files in memory"


def _bmps(start: int, n: int, side: int = 512) -> list[tuple[str, object]]:
    """n distinct valid BMPs of side x side noise (768 KiB each), each read a fresh buffer."""
    noise = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "BMP")
    template = buf.getvalue()

    def reader(i: int):
        return lambda: template[:-8] + i.to_bytes(8, "big")  # the last pixels differ: no duplicates

    return [(f"{i}.bmp", reader(i)) for i in range(start, start + n)]


def test_raw_bytes_do_not_accumulate_across_a_requests_files(session, store, settings):
    """Before: every file of a chunk of 64 kept its bytes until the chunk's blobs were written
    (64 x 25 MiB = 1.6 GB at the default limits); here 64 x 768 KiB = 48 MiB."""
    settings.torch_threads = 2  # two decoding threads, whatever the machine
    ds = datasets.create(session, "pets")
    session.commit()
    # imports and a first decode, outside the measure
    uploads.ingest(session, store, ds, uploads.files_candidates(_bmps(1000, 1), "cat"), settings)
    peaks = []
    for start, n in ((0, 64), (64, 128)):
        files = _bmps(start, n)
        tracemalloc.start()
        try:
            report = uploads.ingest(session, store, ds, uploads.files_candidates(files, "cat"), settings)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert report.count("created") == n
    mib = [f"{p / 2**20:.1f} MiB" for p in peaks]
    assert peaks[0] < 12 * 2**20, mib  # about threads x a file, and the per-file results
    assert peaks[1] < peaks[0] + 4 * 2**20, mib  # twice the files: only the small results grow


# --- zip entries, counted before the directory is parsed ------------------------------------------


def _zip(names: list[str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name in names:
            zf.writestr(name, b"" if name.endswith("/") else b"x")
    return buf.getvalue()


def _members(n: int) -> list[str]:
    """n entries: label folders, images and the junk a Mac adds."""
    names = ["cat/", "noncat/", ".DS_Store", "__MACOSX/"]
    i = 0
    while len(names) < n:
        names += [f"cat/{i}.jpg", f"__MACOSX/cat/._{i}.jpg"]
        i += 1
    return names[:n]


def _end_record(data: bytes) -> tuple[int, int, int]:
    """(entries, directory size, directory offset) of a zip without comment."""
    sig, _, _, _, entries, size, offset, _ = struct.unpack("<4s4H2LH", data[-22:])
    assert sig == b"PK\x05\x06"
    return entries, size, offset


def _with_end_record(data: bytes, entries: int, size: int | None = None) -> bytes:
    """The zip with its end record claiming ``entries`` (and ``size``)."""
    _, real_size, offset = _end_record(data)
    size = real_size if size is None else size
    return data[:-22] + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, entries, entries, size, offset, 0)


def _zip64(data: bytes, entries: int) -> bytes:
    """The zip with a ZIP64 end record saying ``entries`` and a classic one saying 1."""
    _, size, offset = _end_record(data)
    record = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries, size, offset)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, len(data) - 22, 1)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return data[:-22] + record + locator + end


def _with_members(settings, max_members: int):
    return settings.model_copy(update={"max_archive_members": max_members})


@pytest.fixture
def unparsed(monkeypatch):
    """zipfile.ZipFile fails the test if anything builds one: the directory must not be parsed."""
    def parse(*args, **kwargs):
        raise AssertionError("zipfile parsed the central directory")

    return lambda: monkeypatch.setattr(zipfile, "ZipFile", parse)


def _refused(data: bytes, settings) -> TooLarge | InvalidRequest:
    with pytest.raises((TooLarge, InvalidRequest)) as e:
        uploads.archive_candidates(io.BytesIO(data), settings)
    return e.value


def test_a_zip_of_more_entries_than_the_limit_is_refused_before_its_directory_is_parsed(settings, unparsed):
    """Before: zipfile built a ZipInfo per entry first, and only non-junk files were counted."""
    settings.max_archive_members = MAX_MEMBERS
    data = _zip(_members(MAX_MEMBERS + 1))
    at_limit = _members(MAX_MEMBERS)
    images = [n for n in at_limit if n.startswith("cat/") and n != "cat/"]
    candidates = uploads.archive_candidates(io.BytesIO(_zip(at_limit)), settings)
    assert [c.filename for c in candidates if not c.hidden] == images  # the junk members are only counted
    unparsed()
    e = _refused(data, settings)
    assert (e.code, type(e)) == ("too_many_archive_members", TooLarge)
    assert "FELIS_MAX_ARCHIVE_MEMBERS" in str(e) and f"{MAX_MEMBERS + 1}" in str(e)


def test_junk_entries_count_towards_the_limit(settings):
    """Before: entries under __MACOSX/ or starting with a dot never counted: a zip of a million of
    them was parsed whole, then refused for having no label folders."""
    settings.max_archive_members = MAX_MEMBERS
    junk = [f"__MACOSX/cat/._{i}.jpg" for i in range(MAX_MEMBERS)] + [".DS_Store"]
    assert _refused(_zip(junk), settings).code == "too_many_archive_members"


def test_the_count_is_read_from_the_zip64_end_record(settings, unparsed):
    settings.max_archive_members = MAX_MEMBERS
    names = [f"cat/{i}.jpg" for i in range(MAX_MEMBERS + 1)]
    data = _zip64(_zip(names), MAX_MEMBERS + 1)
    assert [c.filename for c in uploads.archive_candidates(io.BytesIO(data), _with_members(settings, 100))] == names
    unparsed()
    assert _refused(data, settings).code == "too_many_archive_members"


def test_an_end_record_that_lies_about_the_count_does_not_get_past_the_limit(settings, unparsed):
    """zipfile parses a directory until its bytes run out, whatever count the end record gives."""
    settings.max_archive_members = MAX_MEMBERS
    data = _zip([f"cat/{i}.jpg" for i in range(MAX_MEMBERS + 1)])
    unparsed()
    assert _refused(_with_end_record(data, MAX_MEMBERS - 10), settings).code == "too_many_archive_members"
    # claiming 1 entry for a directory of 51: far more bytes than one entry needs
    assert _refused(_with_end_record(data, 1), settings).code == "invalid_archive"


def test_a_directory_larger_than_its_entries_need_or_than_the_body_is_refused(settings, unparsed):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i in range(2):
            info = zipfile.ZipInfo(f"cat/{i}.jpg")
            info.extra = struct.pack("<2H", 0xCAFE, 60_000) + b"\0" * 60_000  # 60 KB of extra field each
            zf.writestr(info, b"x")
    data, small = buf.getvalue(), _zip(["cat/a.jpg"])
    unparsed()
    e = _refused(data, settings)
    assert e.code == "invalid_archive" and "central directory" in str(e)
    e = _refused(_with_end_record(small, 1, size=len(small) + 1), settings)
    assert e.code == "invalid_archive" and "central directory" in str(e)


def test_the_api_refuses_a_zip_of_too_many_entries_with_413(client):
    junk = [f"__MACOSX/cat/._{i}.jpg" for i in range(MAX_MEMBERS + 1)]
    r = client.post("/v1/datasets/pets/images", files={"archive": ("mac.zip", _zip(junk), "application/zip")})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "too_many_archive_members"
    assert "FELIS_MAX_ARCHIVE_MEMBERS" in r.json()["error"]["message"]
