"""service.domain.uploads: validation, deduplication and zip safety, on real images; uploads all or
nothing (staged, then published together); the collection of orphan blobs and features."""

from __future__ import annotations

import hashlib
import io
import stat
import threading
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.config import Settings
from service.domain import cleanup, datasets, images, uploads
from service.errors import InvalidRequest, NotFound, StorageFull, TooLarge, Unavailable
from service.store.blobs import LocalBlobStore, image_key
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


def test_label_is_validated_and_files_without_one_are_unlabeled():
    assert [c.label for c in uploads.files_candidates([("a.jpg", bytes)], None)] == [None]
    assert [c.label for c in uploads.files_candidates([("a.jpg", bytes)], "")] == [None]
    with pytest.raises(InvalidRequest) as e:
        uploads.files_candidates([], "../etc")
    assert e.value.code == "invalid_label"
    for reserved in ("unlabeled", "Unlabeled"):
        with pytest.raises(InvalidRequest) as e:
            uploads.files_candidates([], reserved)
        assert e.value.code == "reserved_label"


def test_unlabeled_uploads_are_stored_without_a_label(session, store, settings):
    """Loose files without a label, a zip's top-level images and its unlabeled/ folder: stored with
    no label, counted apart, and a duplicate of a labelled image stays labelled."""
    ds = datasets.create(session, "pets")
    cats, noncats = asset_images("train", "cat"), asset_images("train", "noncat")
    report = uploads.ingest(session, store, ds, uploads.files_candidates([(p.name, p.read_bytes) for p in cats[:2]], None), settings)
    assert report.count("created") == 2 and all(r["label"] is None for r in report.results)
    buf = _zip({"cat/a.jpg": cats[2].read_bytes(), "top.jpg": cats[3].read_bytes(), "unlabeled/b.jpg": noncats[0].read_bytes(),
                "UNLABELED/c.jpg": noncats[1].read_bytes(), "set/unlabeled/d.jpg": noncats[2].read_bytes()})
    report = uploads.ingest(session, store, ds, uploads.archive_candidates(buf, settings), settings)
    labels = {r["filename"]: r["label"] for r in report.results}
    assert labels == {"cat/a.jpg": "cat", "top.jpg": None, "unlabeled/b.jpg": None, "UNLABELED/c.jpg": None,
                      "set/unlabeled/d.jpg": "set"}  # a folder's first part is its label, as before
    assert report.count("created") == 5
    assert datasets.label_counts(session, ds) == {"cat": 1, "set": 1}
    assert datasets.describe(session, ds)["unlabeled_count"] == 5 and datasets.describe(session, ds)["image_count"] == 7
    again = uploads.ingest(session, store, ds, uploads.files_candidates([("x.jpg", cats[2].read_bytes)], None), settings)
    assert again.results[0]["status"] == "duplicate" and datasets.label_counts(session, ds)["cat"] == 1


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
        "loose.jpg": "duplicate_in_dataset",  # a top-level image would be stored unlabeled: these bytes are cat/good.jpg's
        "cat/bomb.bmp": "compression_ratio_too_high",
        "bad label!/x.jpg": "invalid_label",
    }
    assert session.query(Image).count() == 1


def test_a_duplicate_reports_the_label_it_is_stored_with(session, store, settings):
    """The same bytes sent again under another label stay as stored; the result says so. Before,
    it echoed the label sent (noncat) while the image stayed cat."""
    ds = datasets.create(session, "pets")
    cats, noncats = asset_images("train", "cat"), asset_images("train", "noncat")
    uploads.ingest(session, store, ds, uploads.files_candidates(_files(cats[:2]), "cat"), settings)
    again = uploads.ingest(session, store, ds, uploads.files_candidates(_files(cats[:3]), "noncat"), settings)
    assert [(r["status"], r["label"]) for r in again.results] == [("duplicate", "cat"), ("duplicate", "cat"),
                                                                   ("created", "noncat")]
    twice = _zip({"cat/a.jpg": noncats[0].read_bytes(), "noncat/same.jpg": noncats[0].read_bytes()})
    report = uploads.ingest(session, store, ds, uploads.archive_candidates(twice, settings), settings)
    assert [(r["status"], r["label"]) for r in report.results] == [("created", "cat"), ("duplicate", "cat")]
    assert datasets.label_counts(session, ds) == {"cat": 3, "noncat": 1}


def test_labels_that_differ_only_in_letter_case_are_one_label(session, store, settings):
    """In an upload, Cat/, cat/ and CAT/ folders (or label=Cat beside a stored cat) are one class:
    the spelling stored first. Before, a zip of the three made three labels, and a training three
    classes."""
    from service.domain import images

    ds = datasets.create(session, "pets")
    cats, noncats = asset_images("train", "cat"), asset_images("train", "noncat")
    uploads.ingest(session, store, ds, uploads.files_candidates(_files(cats[:1]), "cat"), settings)
    buf = _zip({"Cat/a.jpg": cats[1].read_bytes(), "CAT/b.jpg": cats[2].read_bytes(), "NonCat/c.jpg": noncats[0].read_bytes(),
                "noncat/d.jpg": noncats[1].read_bytes()})
    report = uploads.ingest(session, store, ds, uploads.archive_candidates(buf, settings), settings)
    assert [r["label"] for r in report.results] == ["cat", "cat", "NonCat", "NonCat"]
    assert datasets.label_counts(session, ds) == {"NonCat": 2, "cat": 3}
    # an image relabelled by hand takes the label as spelled: how a label's spelling is changed
    for image_id in [r["image_id"] for r in report.results[2:]]:
        images.relabel(session, ds, image_id, "noncat")
    assert datasets.label_counts(session, ds) == {"cat": 3, "noncat": 2}


def test_a_label_sent_as_a_stored_spelling_keeps_that_spelling(session, store, settings):
    """A dataset that holds Cat (3 images, relabelled by hand) and cat (1): label=cat was stored
    as Cat, the most used spelling, though the dataset holds cat as sent. A spelling the dataset
    holds is kept; one it does not hold still takes the most used spelling."""
    from service.domain import images

    ds = datasets.create(session, "pets")
    cats = asset_images("train", "cat")
    report = uploads.ingest(session, store, ds, uploads.files_candidates(_files(cats[:4]), "cat"), settings)
    for r in report.results[:3]:
        images.relabel(session, ds, r["image_id"], "Cat")
    assert datasets.label_counts(session, ds) == {"Cat": 3, "cat": 1}
    report = uploads.ingest(session, store, ds, uploads.files_candidates(_files(cats[4:5]), "cat"), settings)
    assert [r["label"] for r in report.results] == ["cat"]
    report = uploads.ingest(session, store, ds, uploads.files_candidates(_files(cats[5:6]), "CAT"), settings)
    assert [r["label"] for r in report.results] == ["Cat"]
    assert datasets.label_counts(session, ds) == {"Cat": 4, "cat": 2}


def test_a_windows_zips_backslashes_are_folders(session, store, settings):
    """PowerShell's Compress-Archive (before PowerShell 7) writes cat\\1.jpg: unzip and 7-Zip read
    folders there; before, every member was rejected absolute_path."""
    ds = datasets.create(session, "pets")
    cat, noncat = asset_images("train", "cat")[0].read_bytes(), asset_images("train", "noncat")[0].read_bytes()
    buf = _zip({"set\\cat\\a.jpg": cat, "set\\noncat\\b.jpg": noncat, "set\\..\\..\\evil.jpg": cat,
                "\\\\server\\share\\c.jpg": noncat})
    report = uploads.ingest(session, store, ds, uploads.archive_candidates(buf, settings), settings)
    assert [(r["filename"], r["label"], r["reason"]) for r in report.results] == [
        ("set/cat/a.jpg", "cat", None), ("set/noncat/b.jpg", "noncat", None),
        ("set/../../evil.jpg", None, "path_traversal"), ("//server/share/c.jpg", None, "absolute_path")]
    assert datasets.label_counts(session, ds) == {"cat": 1, "noncat": 1}


@pytest.mark.parametrize("names, labels", [
    # zip -r of a folder several levels up: every wrapping folder goes, not only the first
    (["export/2026/set/cat/a.jpg", "export/2026/set/noncat/b.png"], ["cat", "noncat"]),
    # a README (or any file that is not an image) beside the label folders does not decide
    (["set/README.txt", "set/cat/a.jpg", "set/noncat/b.png"], [None, "cat", "noncat"]),
    (["set/notes/info.md", "set/cat/a.jpg", "set/noncat/b.png"], ["notes", "cat", "noncat"]),
])
def test_wrapping_folders_are_told_by_the_images(session, store, settings, names, labels):
    """Before, only one wrapping folder went, and only when every member, README included, sat
    two folders below it: 'export' and 'set' became labels."""
    ds = datasets.create(session, "pets")
    images = [p.read_bytes() for p in asset_images("train", "cat")[:1] + asset_images("train", "noncat")[:1]]
    members = {name: images.pop(0) if name.endswith((".jpg", ".png")) else b"# a text file\n" for name in names}
    report = uploads.ingest(session, store, ds, uploads.archive_candidates(_zip(members), settings), settings)
    assert [r["label"] for r in report.results] == labels
    assert datasets.label_counts(session, ds) == {"cat": 1, "noncat": 1}


@pytest.mark.parametrize("names, labels", [
    # a stray image beside the label folders: before, 'set' did not wrap and was the label of all five
    (["set/cat/a.jpg", "set/cat/b.jpg", "set/noncat/c.jpg", "set/noncat/d.jpg", "set/preview.jpg"],
     ["cat", "cat", "noncat", "noncat", None]),
    # most images in the folder itself, a few in its subfolders: one label's folder, as before
    (["cat/a.jpg", "cat/b.jpg", "cat/c.jpg", "cat/kittens/d.jpg", "cat/old/e.jpg"], ["cat"] * 5),
    # one subfolder beside images: a label's folder with a folder inside, as before
    (["set/cat/a.jpg", "set/cat/b.jpg", "set/c.jpg", "set/d.jpg", "set/e.jpg"], ["set"] * 5),
])
def test_a_stray_image_beside_the_label_folders_does_not_make_the_wrapper_a_label(session, store, settings, names, labels):
    """zip -r set.zip set/ of set/cat/, set/noncat/ and one set/preview.jpg: every image was stored
    as label 'set' (201, no warning), one bogus class in place of two. The wrapper goes when most
    images sit in two or more folders below it; the images beside those folders are unlabeled."""
    ds = datasets.create(session, "pets")
    images = [p.read_bytes() for p in asset_images("train", "cat")[:5]]
    report = uploads.ingest(session, store, ds, uploads.archive_candidates(_zip(dict(zip(names, images))), settings), settings)
    assert [r["label"] for r in report.results] == labels and report.count("created") == 5


@pytest.mark.parametrize("names", [
    ["myset/train/cat/a.jpg", "myset/train/noncat/b.png", "myset/test/cat/c.jpg"],  # zip -r of a split dataset
    ["Train/cat/a.jpg", "Train/noncat/b.png", "Val/noncat/c.jpg"],  # without a wrapper, any case
    ["set/test/cat/a.jpg", "set/test/noncat/b.png", "set/dog/c.jpg"],  # a split folder beside a label folder
])
def test_a_zip_of_split_folders_is_refused_not_read_as_labels_train_and_test(session, store, settings, names):
    """train/cat/, test/cat/: before, the split folders became the labels ('train', 'test'), each
    holding cats and non-cats alike. Refused, with what to zip instead; nothing stored."""
    ds = datasets.create(session, "pets")
    images = [p.read_bytes() for p in asset_images("train", "cat")[:2] + asset_images("train", "noncat")[:1]]
    with pytest.raises(InvalidRequest) as e:
        uploads.ingest(session, store, ds, uploads.archive_candidates(_zip(dict(zip(names, images))), settings), settings)
    assert e.value.code == "split_folders"
    split = names[0].split("/")[-3]
    assert f"{split}/" in str(e.value) and "split folders with folders inside" in str(e.value) and "one folder per label" in str(e.value)
    assert session.query(Image).count() == 0


@pytest.mark.parametrize("names, labels", [
    (["set/train/a.jpg", "set/cat/b.jpg"], {"cat": 1, "train": 1}),  # pictures of trains: train/ holds images, it is a label
    (["export/set/validation/cat/a.jpg", "export/set/validation/noncat/b.png"], {"cat": 1, "noncat": 1}),  # one split alone wraps
])
def test_split_names_that_are_labels_or_wrappers_are_read_as_such(session, store, settings, names, labels):
    ds = datasets.create(session, "pets")
    images = [p.read_bytes() for p in asset_images("train", "cat")[:1] + asset_images("train", "noncat")[:1]]
    report = uploads.ingest(session, store, ds, uploads.archive_candidates(_zip(dict(zip(names, images))), settings), settings)
    assert datasets.label_counts(session, ds) == labels and report.count("created") == 2


def test_a_zip_of_utf8_names_without_the_utf8_flag_keeps_its_names(session, store, settings):
    """Some zip tools write UTF-8 names without setting the flag that says so; read as code page
    437 (zipfile's rule), Café.jpg came out Cafe\u2560\u00fc.jpg. Names that decode as UTF-8 are UTF-8."""
    ds = datasets.create(session, "pets")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("cat/Café.jpg", asset_images("train", "cat")[0].read_bytes())
    patched = bytearray(buf.getvalue())  # the same name bytes, with the UTF-8 flag (bit 11) cleared in both headers
    for sig, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = patched.find(sig)
        flags = int.from_bytes(patched[at + offset:at + offset + 2], "little") & ~0x800
        patched[at + offset:at + offset + 2] = flags.to_bytes(2, "little")
    assert zipfile.ZipFile(io.BytesIO(bytes(patched))).namelist() != ["cat/Café.jpg"]  # zipfile reads cp437
    report = uploads.ingest(session, store, ds, uploads.archive_candidates(io.BytesIO(bytes(patched)), settings), settings)
    assert [(r["filename"], r["label"], r["status"]) for r in report.results] == [("cat/Café.jpg", "cat", "created")]


def test_hidden_members_are_skipped_and_counted_as_ignored(session, store, settings):
    """A zip's dot files, dot folders and __MACOSX/ are not images to store, but the report says
    how many it skipped (before: they vanished, so created + duplicates + rejected fell short of
    the files the user zipped with no word why); a zip of nothing else says so."""
    ds = datasets.create(session, "pets")
    cat, noncat = asset_images("train", "cat")[0].read_bytes(), asset_images("train", "noncat")[0].read_bytes()
    buf = _zip({"cat/a.jpg": cat, "noncat/b.jpg": noncat, "cat/.c.jpg": cat, ".cats/d.jpg": noncat,
                "__MACOSX/cat/._a.jpg": b"\0" * 20, ".DS_Store": b"x"})
    report = uploads.ingest(session, store, ds, uploads.archive_candidates(buf, settings), settings)
    assert sorted(r["filename"] for r in report.results) == ["cat/a.jpg", "noncat/b.jpg"]
    assert report.as_dict()["ignored"] == 4 and report.as_dict()["created"] == 2
    with pytest.raises(InvalidRequest) as e:
        uploads.ingest(session, store, ds, uploads.archive_candidates(_zip({"__MACOSX/._a.jpg": cat, ".x/b.jpg": cat}), settings),
                       settings)
    assert e.value.code == "empty_upload" and "2 hidden files" in str(e.value)


def test_zip_without_label_folders_is_all_unlabeled(session, store, settings):
    ds = datasets.create(session, "pets")
    buf = _zip({"a.jpg": asset_images()[0].read_bytes()})
    report = uploads.ingest(session, store, ds, uploads.archive_candidates(buf, settings), settings)
    assert report.count("created") == 1 and session.query(Image).one().label is None


def test_not_a_zip_is_refused(settings):
    with pytest.raises(InvalidRequest) as e:
        uploads.archive_candidates(io.BytesIO(b"not a zip at all"), settings)
    assert e.value.code == "invalid_archive"


def test_zip_over_member_and_size_limits_is_refused(settings):
    """A zip's members are bounded by FELIS_MAX_ARCHIVE_MEMBERS (100,000), not by the loose files'
    FELIS_MAX_FILES_PER_REQUEST (5,000), which refused a 10,000-image zip before."""
    buf = _zip({f"cat/{i}.jpg": b"x" for i in range(5)})
    settings.max_files_per_request = 4
    assert len(uploads.archive_candidates(buf, settings)) == 5
    settings.max_archive_members = 4
    buf.seek(0)
    with pytest.raises(TooLarge) as e:
        uploads.archive_candidates(buf, settings)
    assert e.value.code == "too_many_archive_members"
    settings.max_archive_members = 100
    settings.max_archive_bytes = 4
    buf.seek(0)
    with pytest.raises(TooLarge) as e:
        uploads.archive_candidates(buf, settings)
    assert e.value.code == "archive_too_large"


# --- all or nothing: staged rows, published together ---------------------------------------------
# On SQLite and on the local PostgreSQL (`production` mark). The blob store is the real local one
# with hooks at its calls (a put that fails, something another client does meanwhile), never a mock.


class HookedStore(LocalBlobStore):
    """The local blob store, plus: every put after the first ``full_after`` raises StorageFull, as a
    full disk does, and ``on(call, key)`` runs after each put/exists (another client's move)."""

    def __init__(self, root, *, full_after: int | None = None, on=None):
        super().__init__(root)
        self.full_after, self.on, self.puts = full_after, on, 0

    def put(self, key: str, data: bytes) -> None:
        if self.full_after is not None and self.puts >= self.full_after:
            raise StorageFull("no space left in blob storage", code="storage_full")
        super().put(key, data)
        self.puts += 1
        if self.on:
            self.on("put", key)

    def put_many(self, items: list[tuple[str, bytes]]) -> None:  # one at a time here, so the hooks see each
        for key, data in items:
            self.put(key, data)

    def exists(self, key: str) -> bool:
        found = super().exists(key)
        if self.on:
            self.on("exists", key)
        return found


@dataclass
class Felis:
    session: Session
    settings: Settings
    root: Path  # the blob store's

    def store(self, **kw) -> HookedStore:
        return HookedStore(self.root, **kw)

    def new_session(self) -> Session:
        from service.store.db import new_session

        return new_session()

    def rows(self, dataset_id: int) -> list[Image]:
        """The images of a dataset, as any other client sees them (committed)."""
        with self.new_session() as s:
            return list(s.scalars(select(Image).where(Image.dataset_id == dataset_id).order_by(Image.filename)))

    def staged(self) -> int:
        from service.store.tables import ImageStage

        with self.new_session() as s:
            return s.scalar(select(func.count()).select_from(ImageStage))

    def blobs(self) -> set[str]:
        return {p.name for p in self.root.rglob("*") if p.is_file() and not p.name.startswith(".tmp-")}


@pytest.fixture
def felis(metadata_store) -> Iterator[Felis]:
    """A felis on SQLite, or on a PostgreSQL database of its own (conftest.metadata_store)."""
    from service.config import get_settings
    from service.store.db import new_session

    settings = get_settings()
    session = new_session()
    try:
        yield Felis(session, settings, settings.storage_path)
    finally:
        session.close()


def _upload(f: Felis, store, dataset, paths, label="cat") -> uploads.UploadReport:
    return uploads.ingest(f.session, store, dataset, uploads.files_candidates(_files(paths), label), f.settings)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_failure_midway_leaves_no_row_and_no_staged_row(felis, monkeypatch):
    """Before: on SQLite the rows of the files stored before the failing one were committed (each
    RELEASE SAVEPOINT committed), while the client got a 507."""
    monkeypatch.setattr(uploads, "_CHUNK", 4)  # the failure falls in the fourth chunk
    ds = datasets.create(felis.session, "pets")
    felis.session.commit()
    first = asset_images("train", "cat")[:3]
    assert _upload(felis, felis.store(), ds, first).count("created") == 3
    before = {i.id for i in felis.rows(ds.id)}
    rest = asset_images("train", "cat")[3:] + asset_images("train", "noncat")
    with pytest.raises(StorageFull):
        _upload(felis, felis.store(full_after=13), ds, rest, "mixed")
    assert {i.id for i in felis.rows(ds.id)} == before  # nothing of the failed request
    assert felis.staged() == 0
    assert len(felis.blobs()) == 3 + 13  # its blobs stay until the collection (unreferenced)...
    felis.settings.blob_grace_seconds = 0
    cleanup.collect(felis.session, felis.store(), felis.settings)
    assert felis.blobs() == {_sha(p) for p in first}  # ...which removes them, and only them
    for image in felis.rows(ds.id):
        assert images.content(felis.store(), image) == (ASSETS / "cifar-cat/train/cat" / image.filename).read_bytes()
    # and the same files go in whole once there is room
    again = _upload(felis, felis.store(), ds, rest, "mixed")
    assert again.count("created") == len(rest) and len(felis.rows(ds.id)) == 3 + len(rest)


def test_the_per_file_report_is_as_before(felis, monkeypatch):
    monkeypatch.setattr(uploads, "_CHUNK", 2)  # duplicates and rejections across chunk boundaries
    ds = datasets.create(felis.session, "pets")
    felis.session.commit()
    cats = asset_images("train", "cat")
    old = _upload(felis, felis.store(), ds, cats[:2]).results
    files = [("new.jpg", cats[2].read_bytes), ("old.jpg", cats[0].read_bytes), ("bad.jpg", lambda: b"not an image" * 9),
             ("again.jpg", cats[2].read_bytes), ("other.jpg", cats[3].read_bytes)]
    report = uploads.ingest(felis.session, felis.store(), ds, uploads.files_candidates(files, "cat"), felis.settings)
    got = [(r["filename"], r["status"], r["reason"]) for r in report.results]
    assert got == [("new.jpg", "created", None), ("old.jpg", "duplicate", "duplicate_in_dataset"),
                   ("bad.jpg", "rejected", "not_an_image"), ("again.jpg", "duplicate", "duplicate_in_dataset"),
                   ("other.jpg", "created", None)]
    ids = [r["image_id"] for r in report.results]
    assert ids[1] == old[0]["image_id"] and ids[2] is None and ids[3] == ids[0]
    assert report.as_dict() | {"results": None} == {"results": None, "created": 2, "duplicates": 2, "rejected": 1, "ignored": 0}
    rows = {i.id: i for i in felis.rows(ds.id)}
    assert len(rows) == 4 and rows[ids[0]].filename == "new.jpg" and rows[ids[4]].sha256 == _sha(cats[3])


@pytest.mark.parametrize("purged", [False, True], ids=["marked-deleted", "purged"])
def test_a_dataset_deleted_during_the_upload_is_404_and_stores_nothing(felis, monkeypatch, purged):
    """Before: the rows went into the deleted dataset (or, once purged, the upload ended in a 500)."""
    monkeypatch.setattr(uploads, "_CHUNK", 4)
    ds = datasets.create(felis.session, "pets")
    felis.session.commit()

    def delete_it(call, key):
        if call == "put" and not deleted:
            deleted.append(key)
            with felis.new_session() as s:
                cleanup.delete_dataset(s, "pets")
                if purged:
                    assert cleanup.purge(s, felis.store()) == 1

    deleted: list[str] = []
    dataset_id = ds.id
    with pytest.raises(NotFound) as e:
        _upload(felis, felis.store(on=delete_it), ds, asset_images("train", "cat"))
    assert e.value.code == "dataset_not_found"
    assert deleted and felis.rows(dataset_id) == [] and felis.staged() == 0


def _crash_at_put(n: int, monkeypatch) -> None:
    """The upload's process dies (SIGKILL) at its n-th blob write: nothing of it runs after."""
    import os
    import signal

    count = [0]
    real, real_many = LocalBlobStore.put, LocalBlobStore.put_many

    def put(self, key, data):
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        real(self, key, data)

    def put_many(self, items):  # a batch is durable only as a whole: killed within it, none of it is stored
        for _ in items:
            count[0] += 1
            if count[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
        real_many(self, items)

    monkeypatch.setattr(LocalBlobStore, "put", put)
    monkeypatch.setattr(LocalBlobStore, "put_many", put_many)


def test_the_stage_of_a_dead_upload_is_removed_by_the_sweep_after_its_ttl(felis, monkeypatch):
    import multiprocessing

    monkeypatch.setattr(uploads, "_CHUNK", 4)
    pets, other = datasets.create(felis.session, "pets"), datasets.create(felis.session, "other")
    felis.session.commit()
    cats = asset_images("train", "cat")
    shared = cats[5]  # in the crashed upload, and already in another dataset: its blob must stay
    _upload(felis, felis.store(), other, [shared])
    blobs_before = felis.blobs()

    def upload_and_die() -> None:  # in a child process, on a connection of its own
        from service.store import db

        db.get_engine.cache_clear()
        db._sessionmaker.cache_clear()
        _crash_at_put(10, monkeypatch)
        with db.new_session() as s:
            dataset = datasets.get(s, "pets")
            uploads.ingest(s, LocalBlobStore(felis.root), dataset,
                           uploads.files_candidates(_files(cats), "cat"), felis.settings)

    child = multiprocessing.get_context("fork").Process(target=upload_and_die)
    child.start()
    child.join(120)
    assert child.exitcode == -9
    assert felis.rows(pets.id) == []  # nothing visible...
    assert felis.staged() > 0 and len(felis.blobs()) > len(blobs_before)  # ...a stage and blobs left
    felis.settings.blob_grace_seconds = 0
    cleanup.collect(felis.session, felis.store(), felis.settings)
    assert felis.staged() > 0  # younger than FELIS_UPLOAD_STAGE_TTL_SECONDS: it may be a live upload
    felis.settings.upload_stage_ttl_seconds = 0
    cleanup.collect(felis.session, felis.store(), felis.settings)
    assert felis.staged() == 0 and felis.blobs() == blobs_before
    assert images.content(felis.store(), felis.rows(other.id)[0]) == shared.read_bytes()


def test_an_upload_that_outlives_its_stage_ttl_fails_whole(felis, monkeypatch):
    """The sweep took it for a dead upload's and dropped its first chunks: the rest is not published."""
    monkeypatch.setattr(uploads, "_CHUNK", 4)
    ds = datasets.create(felis.session, "pets")
    felis.session.commit()
    # every stage counts as dead, however recent: the blob writes run beside the next chunk's
    # stage, whose fresh rows would otherwise (rightly) show the upload alive to a TTL of 0
    settings = felis.settings.model_copy(update={"upload_stage_ttl_seconds": -3600})

    def sweep(call, key):
        if call == "put" and len(swept) < 1:
            swept.append(key)
            with felis.new_session() as s:
                cleanup.collect(s, felis.store(), settings)

    swept: list[str] = []
    with pytest.raises(Unavailable) as e:
        _upload(felis, felis.store(on=sweep), ds, asset_images("train", "cat"))
    assert e.value.code == "upload_expired" and swept
    assert felis.rows(ds.id) == [] and felis.staged() == 0


def test_two_concurrent_uploads_of_the_same_files_give_one_row_per_sha(felis, monkeypatch):
    monkeypatch.setattr(uploads, "_CHUNK", 4)
    ds = datasets.create(felis.session, "pets")
    felis.session.commit()
    cats = asset_images("train", "cat")
    both_past_dedup = threading.Barrier(2, timeout=60)

    def upload(paths) -> list[dict]:
        waited = []

        def wait(call, key):  # both requests have looked for existing rows before either stores one
            if not waited:
                waited.append(key)
                both_past_dedup.wait()

        with felis.new_session() as s:
            dataset = datasets.get(s, "pets")
            return uploads.ingest(s, felis.store(on=wait), dataset, uploads.files_candidates(_files(paths), "cat"),
                                  felis.settings).results

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(upload, [cats[:12], cats[6:]])
    rows = felis.rows(ds.id)
    assert len(rows) == len({r.sha256 for r in rows}) == len(cats)
    by_name = {r["filename"]: r for r in a}
    for r in b:
        if r["filename"] in by_name:  # the six files both sent: one created, one duplicate, one id
            pair = {r["status"], by_name[r["filename"]]["status"]}
            assert pair == {"created", "duplicate"} and r["image_id"] == by_name[r["filename"]]["image_id"]
    assert {r["image_id"] for r in a + b} == {i.id for i in rows}


@pytest.mark.parametrize("deleting", ["image", "dataset"])
def test_an_upload_racing_the_delete_and_collection_of_the_same_bytes_keeps_its_blob(felis, deleting):
    """Upload of bytes B into `two` (the blob is there: no write) while `one`'s only image of B is
    deleted and the collection runs. Before: the blob went with the delete, the new row had none."""
    one, two = datasets.create(felis.session, "one"), datasets.create(felis.session, "two")
    felis.session.commit()
    path = asset_images("train", "cat")[0]
    [first] = _upload(felis, felis.store(), one, [path]).results
    key = image_key(_sha(path))
    settings = felis.settings.model_copy(update={"blob_grace_seconds": 0})

    def delete_and_collect(call, k):
        if call == "exists" and k == key and not done:
            done.append(k)  # the upload has seen the blob, so it will not write it
            with felis.new_session() as s:
                if deleting == "image":
                    images.delete(s, felis.store(), datasets.get(s, "one"), first["image_id"])
                else:
                    cleanup.delete_dataset(s, "one")
                    assert cleanup.purge(s, felis.store()) == 1
                cleanup.collect(s, felis.store(), settings)

    done: list[str] = []
    report = _upload(felis, felis.store(on=delete_and_collect), two, [path])
    assert done and report.count("created") == 1
    assert felis.rows(one.id) == []
    [row] = felis.rows(two.id)
    assert images.content(felis.store(), row) == path.read_bytes()
    with felis.new_session() as s:  # and a later collection keeps it too
        cleanup.collect(s, felis.store(), settings)
    assert images.content(felis.store(), row) == path.read_bytes()


# --- the collection: orphan blobs and features ----------------------------------------------------


def test_the_collection_waits_for_the_grace_period_and_keeps_what_is_referenced(felis):
    a, b = datasets.create(felis.session, "a"), datasets.create(felis.session, "b")
    felis.session.commit()
    cats = asset_images("train", "cat")
    ra = _upload(felis, felis.store(), a, cats[:3]).results
    _upload(felis, felis.store(), b, cats[:1])  # cats[0] is in both datasets
    for r in ra:
        images.delete(felis.session, felis.store(), a, r["image_id"])
    assert felis.blobs() == {_sha(p) for p in cats[:3]}  # deletes leave the blobs to the collection
    cleanup.collect(felis.session, felis.store(), felis.settings)  # within the grace period: kept
    assert felis.blobs() == {_sha(p) for p in cats[:3]}
    felis.settings.blob_grace_seconds = 0
    cleanup.collect(felis.session, felis.store(), felis.settings)
    assert felis.blobs() == {_sha(cats[0])}  # b still uses it


def _feature_blobs(felis) -> set[tuple[str, str]]:
    """(extractor, sha256) of every cached feature blob in the store."""
    from service.store.blobs import parse_feature_key

    return {parse_feature_key(key) for key in felis.store().list("features/")}


def test_the_collection_removes_the_features_no_dataset_uses(felis):
    from service.store.features import BlobFeatureCache

    a, b = datasets.create(felis.session, "a"), datasets.create(felis.session, "b")
    felis.session.commit()
    cats = asset_images("train", "cat")
    _upload(felis, felis.store(), a, cats[:3])
    _upload(felis, felis.store(), b, cats[:1])
    shas = [_sha(p) for p in cats[:3]]
    cache = BlobFeatureCache(felis.store(), felis.settings)
    cache.put_many("lite0", {sha: np.ones(4, "<f4") for sha in shas})
    cache.put_many("other", {shas[1]: np.ones(4, "<f4")})
    cache.put_many("lite0", {"f" * 64: np.ones(4, "<f4")})  # an image deleted long ago
    cleanup.delete_dataset(felis.session, "a")
    assert cleanup.purge(felis.session, felis.store()) == 1
    felis.settings.blob_grace_seconds = 0
    cleanup.collect(felis.session, felis.store(), felis.settings)
    assert _feature_blobs(felis) == {("lite0", shas[0])}  # features are shared by sha: b's image keeps its own
    assert felis.blobs() == {shas[0], f"{shas[0]}.f16"}  # the image blob and its features, nothing else


def test_an_image_blob_collected_takes_its_features_of_every_extractor_along(felis):
    from service.store.features import BlobFeatureCache

    ds = datasets.create(felis.session, "a")
    felis.session.commit()
    [path] = asset_images("train", "cat")[:1]
    [r] = _upload(felis, felis.store(), ds, [path]).results
    for extractor in ("lite0", "resnet50-224px"):
        BlobFeatureCache(felis.store(), felis.settings).put_many(extractor, {_sha(path): np.ones(4, "<f4")})
    images.delete(felis.session, felis.store(), ds, r["image_id"])
    felis.settings.blob_grace_seconds = 0
    cleanup._features_scanned_to = None
    counts = cleanup.collect(felis.session, felis.store(), felis.settings)
    assert counts["blobs"] == 1 and counts["features"] == 0  # gone with the image blob, not found by the scan
    assert _feature_blobs(felis) == set() and felis.blobs() == set()


def test_model_blobs_of_a_purged_dataset_are_collected_after_a_crash_between_commit_and_delete(felis, monkeypatch):
    from service.store.tables import ModelVersion

    ds = datasets.create(felis.session, "pets")
    felis.session.commit()
    keys = [f"models/{ds.id}/{'t' * 32}/{'r' * 32}/model.pt", f"models/{ds.id}/{'t' * 32}/{'r' * 32}/model.onnx"]
    for key in keys:
        felis.store().put(key, b"weights")
    felis.session.add(ModelVersion(dataset_id=ds.id, version=1, training_id="t" * 32, architecture="simple_cnn",
                                   labels=["cat"], metrics={}, evaluation={}, config={}, snapshot={},
                                   checkpoint_key=keys[0], onnx_key=keys[1]))
    felis.session.commit()
    cleanup.delete_dataset(felis.session, "pets")

    class Crash(Exception):
        pass

    def crash(self, key):
        raise Crash(key)  # the process dies after purge's commit, before its blob deletes

    with monkeypatch.context() as m:
        m.setattr(LocalBlobStore, "delete", crash)
        with pytest.raises(Crash):
            cleanup.purge(felis.session, felis.store())
    felis.session.rollback()
    assert datasets.deleted_ids(felis.session) == [] and all(felis.store().exists(k) for k in keys)
    felis.settings.blob_grace_seconds = 0
    cleanup.collect(felis.session, felis.store(), felis.settings)
    assert not any(felis.store().exists(k) for k in keys)


def test_the_features_scan_covers_the_whole_store_a_window_a_round(felis):
    from service.store.features import BlobFeatureCache

    ds = datasets.create(felis.session, "pets")
    felis.session.commit()
    kept = [_sha(p) for p in asset_images("train", "cat")[:2]]
    _upload(felis, felis.store(), ds, asset_images("train", "cat")[:2])
    orphans = [f"{i:064x}" for i in range(10)]
    for extractor in ("a", "b"):
        BlobFeatureCache(felis.store(), felis.settings).put_many(extractor, {sha: np.ones(2, "<f4") for sha in kept + orphans})
    rounds = 0
    while True:
        left = _feature_blobs(felis)
        if left == {(e, sha) for e in ("a", "b") for sha in kept}:
            break
        rounds += 1
        assert rounds <= 8, f"still there after {rounds} rounds of 3 keys: {sorted(left)}"
        cleanup.collect(felis.session, felis.store(), felis.settings, limit=3)
