"""service.domain.uploads: validation, deduplication and zip safety, on real images."""

from __future__ import annotations

import io
import stat
import zipfile

import pytest

from service.domain import datasets, uploads
from service.errors import InvalidRequest, TooLarge
from service.store.blobs import image_key
from service.store.tables import Image
from tests.conftest import ASSETS, asset_images, zip_folder


def _files(paths):
    return [(p.name, (lambda p=p: p.read_bytes())) for p in paths]


def _zip(members: dict[str, bytes], symlinks: tuple[str, ...] = ()) -> io.BytesIO:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            if name in symlinks:
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    buf.seek(0)
    return buf


def test_files_are_stored_once_and_duplicates_reported(session, store, settings):
    ds = datasets.create(session, "pets")
    cats = asset_images("train", "cat")[:5]
    report = uploads.ingest(session, store, ds, uploads.files_candidates(_files(cats), "cat"), settings)
    assert report.count("created") == 5
    for r in report.results:
        img = session.get(Image, r["image_id"])
        assert img.label == "cat" and img.format == "JPEG" and (img.width, img.height) == (32, 32)
        assert store.get(image_key(img.sha256)) == (ASSETS / "cifar-cat/train/cat" / r["filename"]).read_bytes()
    again = uploads.ingest(session, store, ds, uploads.files_candidates(_files(cats[:2] + cats[:1]), "cat"), settings)
    assert [r["status"] for r in again.results] == ["duplicate"] * 3
    assert again.results[0]["image_id"] == report.results[0]["image_id"]
    assert session.query(Image).count() == 5


def test_bad_files_are_rejected_with_a_reason_and_good_ones_kept(session, store, settings):
    ds = datasets.create(session, "pets")
    good = asset_images("train", "cat")[0].read_bytes()
    files = [("ok.jpg", lambda: good), ("empty.jpg", lambda: b""), ("text.jpg", lambda: b"hello world" * 10),
             ("cut.jpg", lambda: good[: len(good) - 60])]
    report = uploads.ingest(session, store, ds, uploads.files_candidates(files, "cat"), settings)
    statuses = {r["filename"]: (r["status"], r["reason"]) for r in report.results}
    assert statuses["ok.jpg"] == ("created", None)
    assert statuses["empty.jpg"] == ("rejected", "empty_file")
    assert statuses["text.jpg"] == ("rejected", "not_an_image")
    assert statuses["cut.jpg"] == ("rejected", "truncated_image")


def test_file_over_the_size_limit_is_rejected(session, store, settings):
    ds = datasets.create(session, "pets")
    settings.max_file_bytes = 100
    data = asset_images("train", "cat")[0].read_bytes()
    assert len(data) > 100
    report = uploads.ingest(session, store, ds, uploads.files_candidates([("a.jpg", lambda: data)], "cat"), settings)
    assert report.results[0]["reason"] == "file_too_large"


def test_label_is_required_and_validated():
    with pytest.raises(InvalidRequest) as e:
        uploads.files_candidates([], None)
    assert e.value.code == "label_required"
    with pytest.raises(InvalidRequest) as e:
        uploads.files_candidates([], "../etc")
    assert e.value.code == "invalid_label"


@pytest.mark.parametrize("wrapper", [None, "train"])
def test_zip_with_a_folder_per_label(session, store, settings, wrapper):
    ds = datasets.create(session, "pets")
    data = zip_folder(ASSETS / "cifar-cat" / "train", wrapper=wrapper)
    candidates = uploads.archive_candidates(io.BytesIO(data), settings)
    report = uploads.ingest(session, store, ds, candidates, settings)
    assert report.count("created") == 32
    assert datasets.label_counts(session, ds) == {"cat": 16, "noncat": 16}


def test_zip_members_that_are_unsafe_are_rejected_each_with_its_reason(session, store, settings):
    ds = datasets.create(session, "pets")
    good = asset_images("train", "cat")[0].read_bytes()
    buf = _zip({
        "cat/good.jpg": good,
        "../evil.jpg": good,
        "/abs/cat.jpg": good,
        "cat/link.jpg": b"/etc/passwd",
        "cat/inner.zip": b"PK\x03\x04",
        "loose.jpg": good,
        "cat/bomb.bmp": b"\0" * 2_000_000,
        "bad label!/x.jpg": asset_images("train", "noncat")[0].read_bytes(),
    }, symlinks=("cat/link.jpg",))
    report = uploads.ingest(session, store, ds, uploads.archive_candidates(buf, settings), settings)
    reasons = {r["filename"]: r["reason"] for r in report.results}
    assert reasons == {
        "cat/good.jpg": None,
        "../evil.jpg": "path_traversal",
        "/abs/cat.jpg": "absolute_path",
        "cat/link.jpg": "symlink",
        "cat/inner.zip": "nested_archive",
        "loose.jpg": "no_label_folder",
        "cat/bomb.bmp": "compression_ratio_too_high",
        "bad label!/x.jpg": "invalid_label",
    }
    assert session.query(Image).count() == 1


def test_zip_without_label_folders_is_refused(settings):
    buf = _zip({"a.jpg": asset_images()[0].read_bytes()})
    with pytest.raises(InvalidRequest) as e:
        uploads.archive_candidates(buf, settings)
    assert e.value.code == "no_label_folders"


def test_not_a_zip_is_refused(settings):
    with pytest.raises(InvalidRequest) as e:
        uploads.archive_candidates(io.BytesIO(b"not a zip at all"), settings)
    assert e.value.code == "invalid_archive"


def test_zip_over_member_and_size_limits_is_refused(settings):
    buf = _zip({f"cat/{i}.jpg": b"x" for i in range(5)})
    settings.max_files_per_request = 4
    with pytest.raises(TooLarge) as e:
        uploads.archive_candidates(buf, settings)
    assert e.value.code == "too_many_files"
    settings.max_files_per_request = 100
    settings.max_archive_bytes = 4
    buf.seek(0)
    with pytest.raises(TooLarge) as e:
        uploads.archive_candidates(buf, settings)
    assert e.value.code == "archive_too_large"
