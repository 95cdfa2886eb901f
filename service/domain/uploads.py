"""Uploads: validate, deduplicate and store images, from loose files or a zip with a folder per label.

All or nothing: a request's accepted files become visible together, or none of them. Chunk by
chunk, the new files' rows are staged (image_stage, under the request's upload id, each chunk in
a short transaction of its own) and then their blobs written (atomic, content-addressed); at the
end one short transaction publishes the staged rows into images, unless the dataset was deleted
meanwhile (404 dataset_not_found), and deletes the stage. No write lock is held across the
ingest, however many files it has. A failure midway (507, 503, any exception) drops the stage;
a crash leaves it to the workers' sweep (cleanup.collect, after FELIS_UPLOAD_STAGE_TTL_SECONDS).
Either way its blobs are left unreferenced, for the collection: never a row without its blob.

Memory: raw image bytes never accumulate; only the small per-file results grow with the file
count. A file is read (at most FELIS_MAX_FILE_BYTES + 1 bytes of it) where it is checked, and its
bytes are dropped once it is hashed and decoded; a new file is read again for its blob write,
after its row is staged. A zip's entries are counted (FELIS_MAX_ARCHIVE_MEMBERS) from its end
records and its directory's fixed-size headers before zipfile parses the directory.

A row is staged before its blob is looked for, and staging takes the blob off the orphan list
(blob_orphans) in the same transaction: the collection never deletes a blob an upload counts on
(cleanup.py says how). Deduplication: against the dataset's images and the request's earlier
files while staging, and again at publishing, for bytes a concurrent upload published meanwhile
(the unique constraint uq_image_dataset_sha settles two publishing at once).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import stat
import struct
import zipfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import PurePosixPath
from typing import IO, Any

from sqlalchemy import delete, exists, func, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from models.images import InvalidImage, inspect_and_hash
from service.config import Settings
from service.limits import cpu_budget
from service.domain import suggestions
from service.errors import InvalidRequest, NotFound, TooLarge, Unavailable
from service.store.blobs import BlobStore, image_key
from service.store.tables import BlobOrphan, Dataset, Image, ImageStage, new_id, utcnow

log = logging.getLogger("felis.uploads")

LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
UNLABELED = "unlabeled"  # reserved: a zip's `unlabeled/` folder holds images without a label; no image carries it
_CHUNK = 64  # files checked, then staged and stored, per step
_ENTRY_BYTES = 46 + 2048  # a central directory entry: its header, and room for name, extra and comment on average
_ARCHIVE_SUFFIXES = {".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar", ".zst"}


def validate_label(label: str) -> str:
    if not LABEL_RE.fullmatch(label or ""):
        raise InvalidRequest(
            "labels are 1-64 characters of ASCII letters, digits, '_', '.' and '-', starting with a letter or digit",
            code="invalid_label",
        )
    if label.lower() == UNLABELED:
        raise InvalidRequest(f"{label!r} is reserved: it means no label (send no label instead)", code="reserved_label")
    return label


class LabelSpelling:
    """A dataset's labels by their letter-case-folded form: a label that differs from one the
    dataset holds only in case (Cat beside cat) is that label, spelled as stored (its most used
    spelling, where a dataset holds several: relabelling by hand keeps the spelling given); a
    spelling the dataset holds stays as sent; new ones are kept as first spelled."""

    def __init__(self, session: Session, dataset_id: int):
        rows = session.execute(select(Image.label).where(Image.dataset_id == dataset_id, Image.label.is_not(None))
                               .group_by(Image.label).order_by(func.count(Image.id).desc(), Image.label)).scalars().all()
        self._held = set(rows)
        self._known: dict[str, str] = {}
        for label in rows:
            self._known.setdefault(label.casefold(), label)

    def __call__(self, label: str | None) -> str | None:
        if label is None or label in self._held:
            return label
        return self._known.setdefault(label.casefold(), label)


@dataclass
class Candidate:
    """One file offered for storage: its bytes are read lazily, or it is already rejected."""

    filename: str
    label: str | None  # None: stored unlabeled
    read: Callable[[], bytes] | None = None
    reason: str | None = None  # set when rejected before reading
    hidden: bool = False  # a zip's dot file, dot folder or __MACOSX/ member: skipped, counted as ignored


@dataclass
class UploadReport:
    results: list[dict[str, Any]] = field(default_factory=list)
    ignored: int = 0  # hidden members skipped (Candidate.hidden): in no result

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r["status"] == status)

    def as_dict(self) -> dict[str, Any]:
        return {
            "results": self.results,
            "created": self.count("created"),
            "duplicates": self.count("duplicate"),
            "rejected": self.count("rejected"),
            "ignored": self.ignored,
        }


def file_reader(fileobj: IO[bytes], settings: Settings) -> Callable[[], bytes]:
    """A loose file's reader: from its start, at most one byte past FELIS_MAX_FILE_BYTES (enough
    to tell it is over), so that a part over the limit is never read whole. It may be called again."""
    def read() -> bytes:
        fileobj.seek(0)
        return fileobj.read(settings.max_file_bytes + 1)

    return read


def files_candidates(files: list[tuple[str, Callable[[], bytes]]], label: str | None) -> list[Candidate]:
    """Loose files, all with `label`; without one (None or empty) they are stored unlabeled."""
    label = validate_label(label) if label else None
    return [Candidate(filename=name, label=label, read=read) for name, read in files]


def archive_candidates(fileobj: IO[bytes], settings: Settings) -> list[Candidate]:
    """Members of a zip with one top-level folder per label (an extra wrapping folder is allowed);
    images at its top level or in an `unlabeled/` folder are stored unlabeled; hidden members (dot
    files and folders, __MACOSX/: what macOS and editors add) are skipped, counted as ignored."""
    try:
        _count_entries(fileobj, settings)
        zf = zipfile.ZipFile(fileobj)
        infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise InvalidRequest(f"archive is not a readable zip file: {e}", code="invalid_archive") from e
    hidden = [Candidate(filename=i.filename, label=None, hidden=True) for i in infos if not i.is_dir() and _is_junk(i.filename)]
    infos = [i for i in infos if not i.is_dir() and not _is_junk(i.filename)]  # at most max_archive_members: counted above
    total = sum(i.file_size for i in infos)
    if total > settings.max_archive_bytes:
        raise TooLarge(
            f"archive expands to {total} bytes; the limit is {settings.max_archive_bytes}",
            code="archive_too_large",
        )
    names = [_member_name(i) for i in infos]
    problems = [_member_problem(info, name, settings) for info, name in zip(infos, names, strict=True)]
    good = [name for name, problem in zip(names, problems, strict=True) if problem is None]
    wrapper = _wrapper(good)
    _refuse_split_folders(good, wrapper)
    out: list[Candidate] = hidden
    for info, name, reason in zip(infos, names, problems, strict=True):
        parts = _unwrapped(name, wrapper)
        label = parts[0] if len(parts) >= 2 and parts[0].lower() != UNLABELED else None
        if reason in ("absolute_path", "path_traversal"):
            label = None  # its folders mean nothing
        if reason is None and label is not None and not LABEL_RE.fullmatch(label):
            reason = "invalid_label"
        if reason:
            out.append(Candidate(filename=name, label=label, reason=reason))
        else:
            out.append(Candidate(filename=name, label=label, read=_member_reader(zf, info)))
    return out


def _count_entries(fileobj: IO[bytes], settings: Settings) -> None:
    """Refuse a zip of more entries than FELIS_MAX_ARCHIVE_MEMBERS, or a central directory larger
    than the archive or than its entries need, before zipfile parses the directory (a ZipInfo per
    entry). The end record's count is the writer's word, and ZipFile parses the directory until its
    bytes run out whatever the count says: so the entries' fixed-size headers are counted too, one
    at a time and keeping nothing, in the directory ZipFile will read. zipfile's own end-record
    reader finds it (the ZIP64 one when present): the very record ZipFile uses."""
    end = zipfile._EndRecData(fileobj)
    if not end:
        return  # ZipFile says what is wrong with it
    entries, size = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]
    limit = settings.max_archive_members
    if entries > limit:
        raise _too_many_entries(entries, limit)
    start = end[zipfile._ECD_LOCATION] - size  # as ZipFile finds it (data may precede the zip)
    if end[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:
        start -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator
    if start < 0 or size > max(entries, 1) * _ENTRY_BYTES:
        need = "the archive" if start < 0 else f"its {entries} entries need"
        raise InvalidRequest(f"archive is not a readable zip file: its central directory of {size} bytes "
                             f"is larger than {need}", code="invalid_archive")
    fileobj.seek(start)
    counted = read = 0
    while read < size:
        header = fileobj.read(zipfile.sizeCentralDir)
        if len(header) != zipfile.sizeCentralDir or header[:4] != zipfile.stringCentralDir:
            return  # ZipFile says what is wrong with it
        name, extra, comment = struct.unpack_from("<3H", header, 28)  # their lengths
        fileobj.seek(name + extra + comment, 1)
        read += zipfile.sizeCentralDir + name + extra + comment
        counted += 1
        if counted > limit:
            raise _too_many_entries(counted, limit, f"although its end record says {entries}")


def _too_many_entries(n: int, limit: int, note: str = "") -> TooLarge:
    return TooLarge(f"the archive holds {n} entries{' ' + note if note else ''}; FELIS_MAX_ARCHIVE_MEMBERS is {limit} "
                    "(folders, __MACOSX and dot files included)", code="too_many_archive_members")


def _is_junk(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return any(p == "__MACOSX" or (p.startswith(".") and p not in (".", "..")) for p in parts)


def _member_name(info: zipfile.ZipInfo) -> str:
    """A member's path as the user's unzip reads it: backslashes are folders (PowerShell's
    Compress-Archive writes cat\\1.jpg), and a name without the UTF-8 flag that is valid UTF-8
    is UTF-8 (tools that write UTF-8 without the flag outnumber those that write code page 437)."""
    name = info.filename
    if not info.flag_bits & 0x800:
        try:
            name = name.encode("cp437").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            pass
    return name.replace("\\", "/")


_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def _wrapper(names: list[str]) -> tuple[str, ...]:
    """The folders that wrap the label folders (``zip -r set.zip set/``, or an export a few levels
    deep): while every image (a name with an image suffix; every member when none has one) is
    below one common folder, that folder wraps if its images sit in folders below it: all of
    them, or most of them in two or more folders (a stray set/preview.jpg beside set/cat/ and
    set/noncat/ is then stored unlabeled, not the whole set as label 'set'). Other files, a README
    beside the label folders, and members refused for their path or size do not decide; members
    outside the wrapper keep their whole path."""
    parts = [PurePosixPath(n).parts for n in names]
    images = [p for p in parts if PurePosixPath(p[-1]).suffix.lower() in _IMAGE_SUFFIXES] or parts
    depth = 0
    while images and all(len(p) >= depth + 2 for p in images) and len({p[depth] for p in images}) == 1:
        deep = [p for p in images if len(p) >= depth + 3]
        if len(deep) < len(images) and not (len({p[depth + 1] for p in deep}) >= 2 and 2 * len(deep) > len(images)):
            break
        depth += 1
    return images[0][:depth] if depth else ()


def _unwrapped(name: str, wrapper: tuple[str, ...]) -> tuple[str, ...]:
    """A member's path parts below the wrapping folders (all of them for a member outside them)."""
    parts = PurePosixPath(name).parts
    return parts[len(wrapper):] if parts[:len(wrapper)] == wrapper else parts


SPLIT_FOLDERS = frozenset({"train", "training", "test", "testing", "val", "valid", "validation", "dev", "eval", "holdout"})


def _refuse_split_folders(names: list[str], wrapper: tuple[str, ...]) -> None:
    """A dataset zipped with its splits (train/cat/, test/cat/) would have 'train' and 'test' as its
    labels, each holding every class: refused (InvalidRequest split_folders), naming the folders.
    A split folder that holds images itself is a label (pictures of trains); one split alone
    wraps its label folders (_wrapper) and is read as they are."""
    splits = set()
    for name in names:
        parts = _unwrapped(name, wrapper)
        if len(parts) >= 3 and parts[0].lower() in SPLIT_FOLDERS and PurePosixPath(parts[-1]).suffix.lower() in _IMAGE_SUFFIXES:
            splits.add(parts[0])
    if splits:
        listed = ", ".join(f"{s}/" for s in sorted(splits))
        raise InvalidRequest(
            f"the archive has split folders with folders inside ({listed}): felis would read {' and '.join(sorted(splits))} as labels. "
            "Zip one folder per label at the top (cat/, noncat/), the splits' images together or one split at a "
            "time: felis keeps its own validation split", code="split_folders")


def _member_problem(info: zipfile.ZipInfo, name: str, settings: Settings) -> str | None:
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "absolute_path"
    if ".." in PurePosixPath(name).parts:
        return "path_traversal"
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "symlink"
    if PurePosixPath(name).suffix.lower() in _ARCHIVE_SUFFIXES:
        return "nested_archive"
    if info.file_size > settings.max_file_bytes:
        return "file_too_large"
    if info.file_size == 0:
        return "empty_file"
    if info.compress_size and info.file_size / info.compress_size > settings.max_compression_ratio:
        return "compression_ratio_too_high"
    return None


def _member_reader(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Callable[[], bytes]:
    def read() -> bytes:
        with zf.open(info) as f:  # bounded read: never trust the header's size alone
            return f.read(info.file_size + 1)

    return read


@dataclass
class _Checked:
    """What is kept of a checked file: never its bytes (read again for the blob write)."""

    candidate: Candidate
    size: int = 0
    sha256: str | None = None
    info: Any = None
    phash: str | None = None
    reason: str | None = None


def _check(c: Candidate, settings: Settings) -> _Checked:
    if c.reason:
        return _Checked(c, reason=c.reason)
    assert c.read is not None
    try:
        data = c.read()
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError):
        return _Checked(c, reason="unreadable_archive_member")
    if len(data) > settings.max_file_bytes:
        return _Checked(c, reason="file_too_large")
    try:
        info, phash = inspect_and_hash(data, max_pixels=settings.max_image_pixels, min_side=settings.min_image_side)
    except InvalidImage as e:
        return _Checked(c, reason=e.code)
    return _Checked(c, size=len(data), sha256=hashlib.sha256(data).hexdigest(), info=info, phash=phash)


def _reread(c: _Checked) -> bytes:
    """A new file's bytes again, for its blob write: the very bytes that were checked."""
    assert c.candidate.read is not None
    data = c.candidate.read()
    if hashlib.sha256(data).hexdigest() != c.sha256:
        raise RuntimeError(f"{c.candidate.filename!r} changed while it was uploaded")
    return data


def ingest(
    session: Session,
    store: BlobStore,
    dataset: Dataset,
    candidates: Iterable[Candidate],
    settings: Settings,
) -> UploadReport:
    """Validate every candidate, store the new ones, and report one result per file, in order.
    The new ones become visible together when it returns; when it raises, none of them."""
    candidates = list(candidates)
    hidden = sum(c.hidden for c in candidates)
    candidates = [c for c in candidates if not c.hidden]
    if not candidates:
        why = f": the archive holds only {hidden} hidden files (dot files, dot folders, __MACOSX/)" if hidden else ""
        raise InvalidRequest(f"the upload holds no files{why}", code="empty_upload")
    limit = max(settings.max_files_per_request, settings.max_archive_members)  # loose files / a zip's members
    if len(candidates) > limit:
        raise TooLarge(f"{len(candidates)} files in one request; the limit is {limit}", code="too_many_files")
    spell = LabelSpelling(session, dataset.id)
    for c in candidates:
        if c.label is not None and c.reason is None:
            c.label = spell(c.label)
    report = UploadReport(ignored=hidden)
    upload_id = new_id()
    staged: dict[str, str] = {}  # sha256 -> the id of its staged row, the image's id once published
    pending: list[tuple[int, str, bool]] = []  # (result, sha256, first file of those bytes): known at publish
    first_labels: dict[str, str | None] = {}  # sha256 -> the label of the first file of those bytes: what is stored
    session.commit()  # end what the caller's reads began: each step below is a short transaction of its own
    try:
        # Decoding dominates; Pillow releases the GIL, so threads use every core. A file's bytes
        # are held only while a thread checks it, and while it is written: one file per thread.
        # A chunk's blobs are written on a thread of their own while the next chunk is checked
        # (one write batch in flight); every write has finished before the upload is published.
        with ThreadPoolExecutor(max_workers=cpu_budget()) as pool, ThreadPoolExecutor(max_workers=1) as writer:
            writing = None
            for start in range(0, len(candidates), _CHUNK):
                chunk = candidates[start : start + _CHUNK]
                checked = list(pool.map(lambda c: _check(c, settings), chunk))
                existing = _existing(session, dataset.id, {c.sha256 for c in checked if c.sha256})
                new: list[_Checked] = []
                for c in checked:
                    result: dict[str, Any] = {"filename": c.candidate.filename, "label": c.candidate.label}
                    if c.reason:
                        result |= {"status": "rejected", "image_id": None, "reason": c.reason}
                    elif c.sha256 in existing:
                        result |= _duplicate(*existing[c.sha256])
                    else:
                        assert c.sha256
                        first = c.sha256 not in staged
                        if first:
                            staged[c.sha256] = new_id()
                            first_labels[c.sha256] = c.candidate.label
                            new.append(c)
                        pending.append((len(report.results), c.sha256, first))
                    report.results.append(result)
                if new:
                    _stage(session, upload_id, dataset.id, new, staged)
                    if writing is not None:
                        writing.result()  # raises what the last write raised (a full store, say)
                    writing = writer.submit(_write_blobs, store, new)  # after the stage is committed: from now on the blobs are the upload's
                session.commit()
            if writing is not None:
                writing.result()
        published = _publish(session, upload_id, dataset, staged)
    except BaseException:
        _drop_after_failure(session, upload_id)
        raise
    for index, sha, first in pending:
        image_id, created, winners_label = published[sha]
        if created and first:
            report.results[index] |= {"status": "created", "image_id": image_id, "reason": None}
        else:
            report.results[index] |= _duplicate(image_id, first_labels[sha] if created else winners_label)
    if dataset.default_version is not None and any(r["status"] == "created" and r["label"] is None for r in report.results):
        suggestions.request(dataset.id)  # committed: the worker suggests labels for the new unlabeled images
    return report


_WRITE_BATCH_BYTES = 4 * 1024 * 1024  # file bytes held at once for one durable batch write (a chunk of CIFAR-size images: one batch)


def _write_blobs(store: BlobStore, new: list[_Checked]) -> None:
    """The blobs of a chunk's new files that are not stored yet, in batches of at most
    _WRITE_BATCH_BYTES (each durable when put_many returns: one filesystem sync per batch)."""
    batch: list[tuple[str, bytes]] = []
    held = 0
    for c in new:
        key = image_key(c.sha256)
        if store.exists(key):
            continue
        if batch and held + c.size > _WRITE_BATCH_BYTES:
            store.put_many(batch)
            batch, held = [], 0
        batch.append((key, _reread(c)))
        held += c.size
    if batch:
        store.put_many(batch)


def _duplicate(image_id: str, stored_label: str | None) -> dict[str, Any]:
    """A file whose bytes the dataset holds: the result carries the label they are stored with, not
    the one it was sent with (sending bytes again under another label changes nothing)."""
    return {"status": "duplicate", "image_id": image_id, "label": stored_label, "reason": "duplicate_in_dataset"}


def _existing(session: Session, dataset_id: int, shas: set[str]) -> dict[str, tuple[str, str | None]]:
    """sha256 -> (id, label) of the dataset's images that hold those bytes."""
    found: dict[str, tuple[str, str | None]] = {}
    shas_list = list(shas)
    for i in range(0, len(shas_list), 500):
        chunk = shas_list[i : i + 500]
        rows = session.execute(
            select(Image.sha256, Image.id, Image.label).where(Image.dataset_id == dataset_id, Image.sha256.in_(chunk))
        ).all()
        found.update({sha: (image_id, label) for sha, image_id, label in rows})
    return found


def _stage(session: Session, upload_id: str, dataset_id: int, new: list[_Checked], staged: dict[str, str]) -> None:
    """One chunk's new rows, in a transaction of their own; their blobs leave the orphan list."""
    rows = []
    for c in new:
        assert c.sha256
        rows.append({
            "id": staged[c.sha256], "upload_id": upload_id, "dataset_id": dataset_id, "sha256": c.sha256,
            "label": c.candidate.label, "filename": PurePosixPath(c.candidate.filename).name[:255] or "upload",
            "format": c.info.format, "width": c.info.width, "height": c.info.height, "size_bytes": c.size,
            "phash": c.phash, "created_at": utcnow(),
        })
    session.execute(insert(ImageStage), rows)
    session.execute(delete(BlobOrphan).where(BlobOrphan.key.in_(sorted(image_key(c.sha256) for c in new)))
                    .execution_options(synchronize_session=False))
    session.commit()


_PUBLISHED = ("id", "dataset_id", "sha256", "label", "filename", "format", "width", "height", "size_bytes",
              "phash", "created_at")


def _publish(session: Session, upload_id: str, dataset: Dataset,
             staged: dict[str, str]) -> dict[str, tuple[str, bool, str | None]]:
    """The staged rows into images and the stage deleted, in one short transaction, under the
    dataset's lock (a row lock on PostgreSQL, the write lock on SQLite), so that a delete of the
    dataset comes wholly before (404, nothing published) or after. Returns, per sha256, the
    image's id, whether this upload created it, and else the label of the concurrent upload's
    image that was published first (None when this upload created it)."""
    if not staged:
        return {}
    live = session.scalar(select(Dataset.id).where(
        Dataset.id == dataset.id, Dataset.deleted_at.is_(None),
        Dataset.created_at == dataset.created_at,  # SQLite may give a purged dataset's id to a new one
    ).with_for_update())
    if live is None:
        raise NotFound(f"dataset {dataset.name!r} does not exist", code="dataset_not_found")
    still_staged = select(func.count()).select_from(ImageStage).where(ImageStage.upload_id == upload_id)
    if session.scalar(still_staged) != len(staged):
        raise Unavailable("the upload took longer than FELIS_UPLOAD_STAGE_TTL_SECONDS, and the sweep dropped part of "
                          "it as a dead upload's; nothing of it was stored: send it again", code="upload_expired")
    rows = select(*(getattr(ImageStage, c) for c in _PUBLISHED)).where(
        ImageStage.upload_id == upload_id,
        ~exists().where(Image.dataset_id == ImageStage.dataset_id, Image.sha256 == ImageStage.sha256))
    publish = (dialect_insert(session)(Image.__table__).from_select(list(_PUBLISHED), rows)
               .on_conflict_do_nothing(index_elements=["dataset_id", "sha256"]).returning(Image.__table__.c.id))
    created = set(session.scalars(publish))
    winners = _existing(session, dataset.id, {sha for sha, image_id in staged.items() if image_id not in created})
    session.execute(delete(ImageStage).where(ImageStage.upload_id == upload_id)
                    .execution_options(synchronize_session=False))
    session.commit()
    return {sha: (image_id, True, None) if image_id in created else (winners[sha][0], False, winners[sha][1])
            for sha, image_id in staged.items()}


def _drop_after_failure(session: Session, upload_id: str) -> None:
    """Best effort: what is left (a database down, say) the sweep drops after the stage's TTL."""
    try:
        session.rollback()
        drop_stage(session, upload_id)
    except Exception:
        log.warning("could not drop the stage of failed upload %s; the sweep will", upload_id, exc_info=True)
        with contextlib.suppress(SQLAlchemyError):
            session.rollback()


def drop_stage(session: Session, upload_id: str, *, staged_before: datetime | None = None) -> int:
    """Delete an upload's staged rows (only those staged before ``staged_before`` if given) and
    list their blobs as orphans; returns how many rows. Commits, a thousand rows at a time."""
    where = [ImageStage.upload_id == upload_id]
    if staged_before is not None:
        where.append(ImageStage.created_at < staged_before)
    total = 0
    while True:
        batch = select(ImageStage.id).where(*where).limit(1000)
        shas = session.scalars(delete(ImageStage).where(ImageStage.id.in_(batch)).returning(ImageStage.sha256)
                               .execution_options(synchronize_session=False)).all()
        if not shas:
            session.rollback()
            return total
        orphan_blobs(session, (image_key(sha) for sha in shas))
        session.commit()
        total += len(shas)


def orphan_blobs(session: Session, keys: Iterable[str]) -> None:
    """List blobs that may have lost their last reference, as of now; the caller commits, in the
    transaction that dropped the reference (so a crash cannot lose the entry). cleanup.collect
    deletes each one still unreferenced FELIS_BLOB_GRACE_SECONDS later."""
    rows = [{"key": key, "since": utcnow()} for key in sorted(set(keys))]
    upsert = dialect_insert(session)(BlobOrphan.__table__)
    upsert = upsert.on_conflict_do_update(index_elements=["key"], set_={"since": upsert.excluded.since})
    for i in range(0, len(rows), 500):
        session.execute(upsert, rows[i : i + 500])


def dialect_insert(session: Session):
    """INSERT with ON CONFLICT, as the database's dialect writes it (PostgreSQL or SQLite)."""
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
