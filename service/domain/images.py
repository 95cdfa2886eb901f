"""Stored images of a dataset: list, read, thumbnails, relabel, delete. Uploads live in uploads.py."""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import delete as sa_delete
from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from models.images import decode_rgb
from models.split import NEAR_DUPLICATE_BITS, near_duplicate_components
from service.domain import paging, suggestions
from service.domain.uploads import UNLABELED, orphan_blobs, validate_label
from service.errors import InvalidRequest, NotFound, StorageFull
from service.store.blobs import BlobStore, image_key, thumbnail_key
from service.store.tables import Dataset, Image

log = logging.getLogger("felis.images")


def describe(image: Image) -> dict[str, Any]:
    return {
        "id": image.id,
        "filename": image.filename,
        "label": image.label,
        "sha256": image.sha256,
        "format": image.format,
        "width": image.width,
        "height": image.height,
        "size_bytes": image.size_bytes,
        "phash": image.phash,
        "created_at": image.created_at,
    }


def list_images(
    session: Session, dataset: Dataset, *, label: str | None = None, labeled: bool | None = None, limit: int = 100,
    offset: int = 0, cursor: str | None = None,
) -> tuple[list[Image], int, str | None]:
    """A page of the dataset's images, oldest first: those with `label`, or (labeled) only the
    labelled or only the unlabeled ones; after `cursor` (paging.py) or `offset`. Returns the
    rows, how many match, and the cursor of the next page (None after the last). The reserved
    label `unlabeled` (a zip's folder of images without one) is `labeled=False`."""
    where = [Image.dataset_id == dataset.id]
    if label is not None and label.lower() == UNLABELED:
        label, labeled = None, False if labeled is None else labeled
        if labeled:
            raise InvalidRequest("label 'unlabeled' and labeled=true match no image: leave one out", code="invalid_label")
    if label is not None:
        where.append(Image.label == label)
    if labeled is not None:
        where.append(Image.label.is_not(None) if labeled else Image.label.is_(None))
    total = session.scalar(select(func.count(Image.id)).where(*where)) or 0
    page = select(Image).where(*where)
    if cursor is not None:
        at, last = paging.decode("images", cursor)
        page = page.where(or_(Image.created_at > at, and_(Image.created_at == at, Image.id > last)))
    rows = list(session.scalars(page.order_by(Image.created_at, Image.id).limit(limit + 1).offset(offset)))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, total, paging.encode("images", rows[-1].created_at, rows[-1].id) if more else None


def near_duplicates(session: Session, dataset: Dataset, max_distance: int = NEAR_DUPLICATE_BITS, *,
                    limit: int = 50, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Groups of images whose perceptual hashes are within max_distance bits (at most
    MAX_NEAR_DUPLICATE_BITS): copies, re-encodes, resized versions, burst shots, label conflicts
    first, then the largest; one page of them and the number of groups. Training keeps each group
    on one side of every split; a group whose images carry different labels is probably mislabeled."""
    rows = session.execute(select(Image.id, Image.phash, Image.label, Image.filename)
                           .where(Image.dataset_id == dataset.id).order_by(Image.id)).all()
    roots, closest = near_duplicate_components([r.phash for r in rows], max_distance)
    members = np.flatnonzero(closest <= max_distance)  # the images with a near-duplicate
    groups: dict[int, list[int]] = {}
    for i in members.tolist():
        groups.setdefault(int(roots[i]), []).append(i)
    summary = []
    for idx in groups.values():
        labels = sorted({rows[i].label for i in idx if rows[i].label is not None})  # an unlabeled copy conflicts with none
        summary.append((len(labels) > 1, len(idx), idx, labels))
    summary.sort(key=lambda g: (not g[0], -g[1], g[2][0]))
    page = [{"images": [{"id": rows[i].id, "filename": rows[i].filename, "label": rows[i].label,
                         "closest_distance": int(closest[i])} for i in idx],
             "labels": labels, "conflicting_labels": conflict}
            for conflict, _, idx, labels in summary[offset:offset + limit]]
    return page, len(summary)


MAX_KNOWN_PER_REQUEST = 10_000


def known(session: Session, dataset: Dataset, sha256s: list[str]) -> list[str]:
    """Which of these content hashes the dataset holds already (an upload that resumes skips
    them), in the order asked, each once; at most MAX_KNOWN_PER_REQUEST a call."""
    if len(sha256s) > MAX_KNOWN_PER_REQUEST:
        raise InvalidRequest(f"{len(sha256s)} hashes; at most {MAX_KNOWN_PER_REQUEST} a request", code="too_many_items")
    wanted = list(dict.fromkeys(s.lower() for s in sha256s))
    if any(len(s) != 64 or s.strip("0123456789abcdef") for s in wanted):
        raise InvalidRequest("sha256 values are 64 hex digits", code="invalid_sha256")
    found: set[str] = set()
    for start in range(0, len(wanted), 500):
        found.update(session.scalars(select(Image.sha256).where(Image.dataset_id == dataset.id,
                                                                Image.sha256.in_(wanted[start:start + 500]))))
    return [s for s in wanted if s in found]


def get(session: Session, dataset: Dataset, image_id: str) -> Image:
    image = session.scalar(select(Image).where(Image.dataset_id == dataset.id, Image.id == image_id))
    if image is None:
        raise NotFound(f"image {image_id!r} is not in dataset {dataset.name!r}", code="image_not_found")
    return image


def content(store: BlobStore, image: Image) -> bytes:
    return store.get(image_key(image.sha256))


# The longest sides (pixels) a thumbnail may have: a fixed few, so the cache holds at most this many
# per image and cleanup.collect knows every key to remove with the image blob. Removing a size
# here would leave its cached files behind: keep it listed, or remove them first.
THUMBNAIL_SIZES = (96, 160, 320)
THUMBNAIL_SIZE = 160  # the default
_THUMBNAIL_QUALITY = 85  # JPEG quality


def thumbnail_keys(sha256: str) -> list[str]:
    """Every cached thumbnail an image blob may have."""
    return [thumbnail_key(sha256, size) for size in THUMBNAIL_SIZES]


def thumbnail(store: BlobStore, image: Image, size: int = THUMBNAIL_SIZE) -> bytes:
    """A small JPEG of the image: upright (EXIF orientation applied), RGB (transparency on white),
    longest side ``size`` (never enlarged). Made on the first request and kept in the blob store
    beside the image, content-addressed like it; concurrent first requests each write the same
    bytes atomically. Memory is bounded as for training: the stored image passed
    FELIS_MAX_IMAGE_PIXELS at upload, and a JPEG is decoded at the smallest DCT scale that still
    covers ``size``."""
    _check_thumbnail_size(size)
    key = thumbnail_key(image.sha256, size)
    try:
        return store.get(key)
    except NotFound:
        pass
    data = _make_thumbnail(content(store, image), size)
    try:
        store.put(key, data)
    except StorageFull:  # a read must not fail for want of room to cache: made again next time
        log.warning("no room to cache thumbnail %s", key)
    return data


def _check_thumbnail_size(size: int) -> int:
    if size not in THUMBNAIL_SIZES:
        raise InvalidRequest(f"size must be one of {', '.join(map(str, THUMBNAIL_SIZES))}, not {size}",
                             code="invalid_thumbnail_size", details={"sizes": list(THUMBNAIL_SIZES)})
    return size


def _make_thumbnail(data: bytes, size: int) -> bytes:
    img = decode_rgb(data, size_hint=size)
    img.thumbnail((size, size), PILImage.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=_THUMBNAIL_QUALITY, optimize=True)
    return out.getvalue()


def relabel(session: Session, dataset: Dataset, image_id: str, label: str | None) -> Image:
    """A new label, or None: unlabeled again (trainings skip it; it gets a suggestion)."""
    image = get(session, dataset, image_id)
    image.label = validate_label(label) if label is not None else None
    session.commit()
    if label is None:
        _ask_for_suggestions(dataset)
    return image


def _ask_for_suggestions(dataset: Dataset) -> None:
    """After the commit that made images unlabeled: those labelled when the default version trained
    have no suggestion from it yet."""
    if dataset.default_version is not None:
        suggestions.request(dataset.id)


MAX_LABELS_PER_REQUEST = 1000


def label_many(session: Session, dataset: Dataset, items: list[tuple[str, str | None]]) -> list[dict[str, Any]]:
    """Label (or, with None, unlabel) many images in one commit: one result per item, in order,
    {"image_id", "label", "status": "labeled" | "unlabeled" | "rejected", "error": {code, message} | None}.
    An item that fails (unknown image, invalid or reserved label) changes nothing; the others apply."""
    if len(items) > MAX_LABELS_PER_REQUEST:
        raise InvalidRequest(f"{len(items)} items; at most {MAX_LABELS_PER_REQUEST} a request", code="too_many_items")
    ids = sorted({image_id for image_id, _ in items})
    found: dict[str, Image] = {}
    for start in range(0, len(ids), 500):
        found.update((i.id, i) for i in session.scalars(
            select(Image).where(Image.dataset_id == dataset.id, Image.id.in_(ids[start:start + 500]))))
    results = []
    for image_id, label in items:
        result: dict[str, Any] = {"image_id": image_id, "label": label, "status": "rejected", "error": None}
        try:
            if image_id not in found:
                raise NotFound(f"image {image_id!r} is not in dataset {dataset.name!r}", code="image_not_found")
            found[image_id].label = validate_label(label) if label is not None else None
            result["status"] = "labeled" if label is not None else "unlabeled"
        except (InvalidRequest, NotFound) as e:
            result["error"] = {"code": e.code, "message": e.message}
        results.append(result)
    session.commit()
    if any(r["status"] == "unlabeled" for r in results):
        _ask_for_suggestions(dataset)
    return results


def delete(session: Session, store: BlobStore, dataset: Dataset, image_id: str) -> None:
    """Delete the row. Its blob is listed as an orphan in the same commit and left to the
    collection (cleanup.collect), which deletes it once no image and no upload has used the bytes
    for the grace period: deleting it here would race an upload of the same bytes. Model
    versions keep working: their checkpoints hold weights, not images."""
    image = get(session, dataset, image_id)
    session.delete(image)
    orphan_blobs(session, [image_key(image.sha256)])
    session.commit()


def delete_batch(session: Session, dataset_id: int, limit: int) -> list[str]:
    """Up to `limit` image rows of a (deleted) dataset; returns their sha256s (none: no row was
    left). The caller lists their blobs as orphans and commits, a batch a transaction."""
    rows = session.execute(select(Image.id, Image.sha256).where(Image.dataset_id == dataset_id).limit(limit)).all()
    if rows:
        session.execute(sa_delete(Image).where(Image.id.in_([r.id for r in rows])).execution_options(synchronize_session=False))
    return [r.sha256 for r in rows]
