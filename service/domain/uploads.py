"""Uploads: validate, deduplicate and store images, from loose files or a zip with a folder per label.

Order of writes: blob first (atomic, content-addressed), row after, all rows committed at the
end. A crash at any point leaves at most an unreferenced blob, never a row without its blob.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import zipfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import IO, Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models.images import InvalidImage, inspect_image, perceptual_hash
from service.config import Settings
from service.errors import InvalidRequest, TooLarge
from service.store.blobs import BlobStore, image_key
from service.store.tables import Dataset, Image

LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_CHUNK = 64  # files decoded and stored per step
_ARCHIVE_SUFFIXES = {".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar", ".zst"}


def validate_label(label: str) -> str:
    if not LABEL_RE.fullmatch(label or ""):
        raise InvalidRequest(
            "labels are 1-64 characters of letters, digits, '_', '.' and '-', starting with a letter or digit",
            code="invalid_label",
        )
    return label


@dataclass
class Candidate:
    """One file offered for storage: its bytes are read lazily, or it is already rejected."""

    filename: str
    label: str | None
    read: Callable[[], bytes] | None = None
    reason: str | None = None  # set when rejected before reading


@dataclass
class UploadReport:
    results: list[dict[str, Any]] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r["status"] == status)

    def as_dict(self) -> dict[str, Any]:
        return {
            "results": self.results,
            "created": self.count("created"),
            "duplicates": self.count("duplicate"),
            "rejected": self.count("rejected"),
        }


def files_candidates(files: list[tuple[str, Callable[[], bytes]]], label: str | None) -> list[Candidate]:
    if not label:
        raise InvalidRequest("a 'label' form field is required with 'files'", code="label_required")
    validate_label(label)
    return [Candidate(filename=name, label=label, read=read) for name, read in files]


def archive_candidates(fileobj: IO[bytes], settings: Settings) -> list[Candidate]:
    """Members of a zip with one top-level folder per label (an extra wrapping folder is allowed)."""
    try:
        zf = zipfile.ZipFile(fileobj)
        infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise InvalidRequest(f"archive is not a readable zip file: {e}", code="invalid_archive") from e
    infos = [i for i in infos if not i.is_dir() and not _is_junk(i.filename)]
    if len(infos) > settings.max_files_per_request:
        raise TooLarge(
            f"archive holds {len(infos)} files; the limit is {settings.max_files_per_request}",
            code="too_many_files",
        )
    total = sum(i.file_size for i in infos)
    if total > settings.max_archive_bytes:
        raise TooLarge(
            f"archive expands to {total} bytes; the limit is {settings.max_archive_bytes}",
            code="archive_too_large",
        )
    strip = _wrapper_depth(infos)
    out: list[Candidate] = []
    for info in infos:
        parts = PurePosixPath(info.filename).parts[strip:]
        name = info.filename
        reason = _member_problem(info, parts, settings)
        label = parts[0] if len(parts) >= 2 else None
        if reason is None and not LABEL_RE.fullmatch(label or ""):
            reason = "invalid_label"
        if reason:
            out.append(Candidate(filename=name, label=label, reason=reason))
        else:
            out.append(Candidate(filename=name, label=label, read=_member_reader(zf, info)))
    if not any(c.label and c.reason != "no_label_folder" for c in out):
        raise InvalidRequest(
            "the archive has no label folders: put each label's images in a top-level folder named after it",
            code="no_label_folders",
        )
    return out


def _is_junk(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return any(p == "__MACOSX" or (p.startswith(".") and p not in (".", "..")) for p in parts)


def _wrapper_depth(infos: list[zipfile.ZipInfo]) -> int:
    """1 when every member sits under one common folder that holds label folders (zip -r set.zip set/)."""
    parts = [PurePosixPath(i.filename).parts for i in infos]
    if parts and all(len(p) >= 3 for p in parts) and len({p[0] for p in parts}) == 1:
        return 1
    return 0


def _member_problem(info: zipfile.ZipInfo, parts: tuple[str, ...], settings: Settings) -> str | None:
    raw = info.filename
    if raw.startswith("/") or "\\" in raw or re.match(r"^[A-Za-z]:", raw):
        return "absolute_path"
    if ".." in PurePosixPath(raw).parts:
        return "path_traversal"
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "symlink"
    if len(parts) < 2:
        return "no_label_folder"
    if PurePosixPath(raw).suffix.lower() in _ARCHIVE_SUFFIXES:
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
    candidate: Candidate
    data: bytes | None = None
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
        info = inspect_image(data, max_pixels=settings.max_image_pixels, min_side=settings.min_image_side)
        phash = perceptual_hash(data)
    except InvalidImage as e:
        return _Checked(c, reason=e.code)
    return _Checked(c, data=data, sha256=hashlib.sha256(data).hexdigest(), info=info, phash=phash)


def ingest(
    session: Session,
    store: BlobStore,
    dataset: Dataset,
    candidates: Iterable[Candidate],
    settings: Settings,
) -> UploadReport:
    """Validate every candidate, store the new ones, and report one result per file, in order."""
    candidates = list(candidates)
    if not candidates:
        raise InvalidRequest("the upload holds no files", code="empty_upload")
    if len(candidates) > settings.max_files_per_request:
        raise TooLarge(
            f"{len(candidates)} files in one request; the limit is {settings.max_files_per_request}",
            code="too_many_files",
        )
    report = UploadReport()
    seen: dict[str, str] = {}
    # Decoding dominates; Pillow releases the GIL, so threads use every core. Chunks bound the
    # memory held at once to a few dozen files whatever the upload's size.
    with ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:
        for start in range(0, len(candidates), _CHUNK):
            chunk = candidates[start : start + _CHUNK]
            checked = list(pool.map(lambda c: _check(c, settings), chunk))
            existing = _existing(session, dataset.id, {c.sha256 for c in checked if c.sha256})
            for c in checked:
                report.results.append(_record(session, store, dataset, c, existing, seen))
    session.commit()
    return report


def _record(
    session: Session,
    store: BlobStore,
    dataset: Dataset,
    c: _Checked,
    existing: dict[str, str],
    seen: dict[str, str],
) -> dict[str, Any]:
    result: dict[str, Any] = {"filename": c.candidate.filename, "label": c.candidate.label}
    if c.reason:
        return result | {"status": "rejected", "image_id": None, "reason": c.reason}
    assert c.sha256
    image_id = existing.get(c.sha256) or seen.get(c.sha256)
    if image_id is None:
        image_id = _store_one(session, store, dataset, c)
        if image_id is not None:
            seen[c.sha256] = image_id
            return result | {"status": "created", "image_id": image_id, "reason": None}
        # a concurrent upload of the same bytes committed first
        image_id = _existing(session, dataset.id, {c.sha256})[c.sha256]
    return result | {"status": "duplicate", "image_id": image_id, "reason": "duplicate_in_dataset"}


def _existing(session: Session, dataset_id: int, shas: set[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    shas_list = list(shas)
    for i in range(0, len(shas_list), 500):
        chunk = shas_list[i : i + 500]
        rows = session.execute(
            select(Image.sha256, Image.id).where(Image.dataset_id == dataset_id, Image.sha256.in_(chunk))
        ).all()
        found.update({sha: image_id for sha, image_id in rows})
    return found


def _store_one(session: Session, store: BlobStore, dataset: Dataset, c: _Checked) -> str | None:
    assert c.sha256 and c.data is not None
    key = image_key(c.sha256)
    if not store.exists(key):
        store.put(key, c.data)
    image = Image(
        dataset_id=dataset.id,
        sha256=c.sha256,
        label=c.candidate.label,
        filename=PurePosixPath(c.candidate.filename).name[:255] or "upload",
        format=c.info.format,
        width=c.info.width,
        height=c.info.height,
        size_bytes=len(c.data),
        phash=c.phash,
    )
    try:
        with session.begin_nested():
            session.add(image)
    except IntegrityError:
        return None
    return image.id
