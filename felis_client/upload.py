"""Turning what a user points at (a folder per label, a zip, image files) into upload requests.

A folder is zipped into a temporary file (stored, not deflated: photos are compressed already)
and sent as one ``archive``; a big folder or many files go as several requests, each under the
server's per-request limits, and the reports are merged.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

MAX_FILES_PER_REQUEST = 1000  # the server allows 5000 by default; smaller requests fail smaller
MAX_BYTES_PER_REQUEST = 200 * 1024 * 1024  # the server allows 512 MiB by default
IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
               ".gif": "image/gif", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff"}

Progress = Callable[[int, int], None]  # (bytes sent so far, bytes to send in all)


@dataclass
class Batch:
    """One upload request: an archive (a zip on disk) or loose files with one label."""

    archive: Path | None = None
    files: list[Path] = field(default_factory=list)
    label: str | None = None
    temporary: bool = False  # the archive is ours to delete

    @property
    def size(self) -> int:
        if self.archive is not None:
            return self.archive.stat().st_size
        return sum(p.stat().st_size for p in self.files)

    def cleanup(self) -> None:
        if self.temporary and self.archive is not None:
            self.archive.unlink(missing_ok=True)


def _visible_files(folder: Path) -> list[Path]:
    """Every regular file below folder, in a stable order, without hidden files (.DS_Store, ._x)."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__MACOSX")
        out.extend(Path(root) / f for f in sorted(files) if not f.startswith("."))
    return out


def one_label_hint(folder: Path) -> str | None:
    """A folder whose images all lie below its one subfolder, itself a folder of folders
    (PetImages/Cat/, PetImages/Dog/, as Kaggle's cats-and-dogs zip unpacks): a note that every
    image gets that subfolder's name as its label, and how to make its folders the labels instead.
    (Which is meant cannot be told from the folders: cat/indoor/ beside cat/outdoor/ is one label.)"""
    parts = [p.relative_to(folder).parts for p in _visible_files(folder)]
    if not parts or len({p[0] for p in parts}) != 1 or any(len(p) < 3 for p in parts):
        return None
    inner = sorted({p[1] for p in parts})
    if len(inner) < 2:
        return None
    shown = ", ".join(f"{name}/" for name in inner[:3]) + (", ..." if len(inner) > 3 else "")
    return (f"every image gets the label '{parts[0][0]}' (its folders {shown} become part of the file names); "
            f"if those folders are the labels, upload {folder / parts[0][0]} instead")


def _chunks(paths: list[Path], max_files: int, max_bytes: int) -> Iterator[list[Path]]:
    chunk: list[Path] = []
    size = 0
    for p in paths:
        n = p.stat().st_size
        if chunk and (len(chunk) >= max_files or size + n > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(p)
        size += n
    if chunk:
        yield chunk


def _zip(members: list[tuple[Path, str]]) -> Path:
    fd, name = tempfile.mkstemp(prefix="felis-upload-", suffix=".zip")
    os.close(fd)
    try:
        with zipfile.ZipFile(name, "w", zipfile.ZIP_STORED) as zf:
            for path, arcname in members:
                zf.write(path, arcname)
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


def plan(source: str | os.PathLike | Iterable[str | os.PathLike], label: str | None = None, *,
         unlabeled: bool = False, max_files: int = MAX_FILES_PER_REQUEST,
         max_bytes: int = MAX_BYTES_PER_REQUEST, skip: Callable[[list[Path]], set[Path]] | None = None) -> Iterator[Batch]:
    """The requests that upload ``source``; zips are built lazily, one batch at a time.

    - a folder with one subfolder per label (``cat/1.jpg``, ``dog/2.jpg``): archives;
    - a folder of images with ``label``: archives with every image under that label;
    - a ``.zip`` file: sent as it is (its top-level folders are the labels, its top-level images
      and its ``unlabeled/`` folder unlabeled);
    - one or more image files: sent as ``files`` with ``label``.
    ``unlabeled``: a folder's images (every one, whatever its subfolder) or the image files are
    stored without a label, for the service to suggest one; not with ``label``.
    ``skip(paths)``: the files of a folder or the image files to leave out (those the dataset
    holds already, when an upload resumes); a zip is sent as it is.
    """
    if unlabeled and label:
        raise ValueError("pass a label or unlabeled, not both")
    paths = [Path(source)] if isinstance(source, (str, os.PathLike)) else [Path(p) for p in source]
    if not paths:
        raise ValueError("nothing to upload")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"no such file or folder: {', '.join(missing)}")
    if len(paths) == 1 and paths[0].is_dir():
        yield from _plan_folder(paths[0], "unlabeled" if unlabeled else label, max_files, max_bytes, skip)
        return
    if len(paths) == 1 and paths[0].suffix.lower() == ".zip":
        if label:
            raise ValueError("a zip carries its labels as folders; do not pass a label with it")
        if unlabeled:
            raise ValueError("a zip carries its labels as folders, and is sent as it is: put the images to store "
                             "unlabeled in its unlabeled/ folder (or at its top level), or unzip it and upload the "
                             "folder with unlabeled (--unlabeled)")
        yield Batch(archive=paths[0])
        return
    if any(p.is_dir() or p.suffix.lower() == ".zip" for p in paths):
        raise ValueError("upload one folder, one zip, or image files (not a mix)")
    if not label and not unlabeled:
        raise ValueError("image files need a label (--label / label=), or --unlabeled / unlabeled=True")
    if skip is not None:
        left = skip(paths)
        paths = [p for p in paths if p not in left]
    for chunk in _chunks(paths, max_files, max_bytes):
        yield Batch(files=chunk, label=label or None)


def _plan_folder(folder: Path, label: str | None, max_files: int, max_bytes: int,
                 skip: Callable[[list[Path]], set[Path]] | None = None) -> Iterator[Batch]:
    files = _visible_files(folder)
    if not files:
        raise ValueError(f"{folder} holds no files")
    # Each image goes one folder deep in the zip, its label's (the subfolders below it flattened
    # into its name): the service would read cat/2023/1.jpg alone as a wrapper folder and a label 2023.
    if label:
        members = [(p, f"{label}/{_flat(p.relative_to(folder).parts)}") for p in files]
    else:
        if all(p.parent == folder for p in files):
            raise ValueError(f"{folder} has no label folders: put each label's images in a folder named after "
                             "the label, pass a label for all of them, or upload them unlabeled")
        splits = sorted({parts[0] for parts in (p.relative_to(folder).parts for p in files)
                         if len(parts) >= 3 and parts[0].lower() in SPLIT_FOLDERS})
        if splits:  # the service could not tell once the subfolders are flattened into names
            listed = ", ".join(f"{s}/" for s in splits)
            raise ValueError(f"{folder} has split folders with folders inside ({listed}): felis would read "
                             f"{' and '.join(splits)} as labels. Upload a folder that holds one folder per label "
                             f"({folder / splits[0]}, say), one split at a time: felis keeps its own validation split")
        members = []
        for p in files:
            parts = p.relative_to(folder).parts
            members.append((p, parts[0] if len(parts) == 1 else f"{parts[0]}/{_flat(parts[1:])}"))
    if skip is not None:
        left = skip([p for p, _ in members])
        members = [(p, name) for p, name in members if p not in left]
    by_path = dict(members)
    for chunk in _chunks([p for p, _ in members], max_files, max_bytes):
        yield Batch(archive=_zip([(p, by_path[p]) for p in chunk]), temporary=True)


# folder names of a dataset's splits (as service.domain.uploads.SPLIT_FOLDERS: the client imports no service code)
SPLIT_FOLDERS = frozenset({"train", "training", "test", "testing", "val", "valid", "validation", "dev", "eval", "holdout"})


def _flat(parts: tuple[str, ...]) -> str:
    """2023/1.jpg as 2023_1.jpg."""
    return "_".join(parts)


class ProgressFile:
    """A file httpx streams from: opened on first read, closed at the end, reporting bytes read.

    Seekable without opening (httpx asks for the length of every file before it sends), so a
    request with a thousand files keeps one open at a time."""

    def __init__(self, path: Path, on_read: Callable[[int], None] | None = None):
        self.path, self.on_read = path, on_read
        self._size = path.stat().st_size
        self._pos = 0
        self._fh: IO[bytes] | None = None

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        if self._fh is not None:
            self._fh.seek(self._pos)
        return self._pos

    def read(self, n: int = -1) -> bytes:
        if self._fh is None:
            self._fh = open(self.path, "rb")
            self._fh.seek(self._pos)
        data = self._fh.read(n)
        self._pos += len(data)
        if self.on_read and data:
            self.on_read(len(data))
        if not data or self._pos >= self._size:
            self.close()
        return data

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def sha256_of(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def merge_reports(reports: list[dict]) -> dict:
    """One report for several upload requests, in the server's shape."""
    results = [r for rep in reports for r in rep.get("results", [])]
    return {
        "results": results,
        "skipped": sum(rep.get("skipped", 0) for rep in reports),  # already in the dataset: not sent
        "created": sum(1 for r in results if r.get("status") == "created"),
        "duplicates": sum(1 for r in results if r.get("status") == "duplicate"),
        "rejected": sum(1 for r in results if r.get("status") == "rejected"),
        "ignored": sum(rep.get("ignored", 0) for rep in reports),  # a zip's hidden members, skipped by the server
    }
