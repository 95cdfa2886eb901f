"""Suggested labels for a dataset's unlabeled images: the only writer of Suggestion rows (issue 15).

One row per (image, version): the label that version finds most probable for the image, its
probability and its open-set score. The worker computes them (service.domain.suggesting) after
each training, for the version it made, and for unlabeled images uploaded later or a newly
promoted default (the `felis.suggest` task, asked for by `request` after the commit that made
them). `page` only reads: the default version's rows, `ood` judged against that version's
open-set threshold as it is now (PUT .../ood-threshold applies at once). Rows go with their image
(foreign key, ON DELETE CASCADE) and with their version (versions.delete calls delete_for_version).
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import case, delete, false, func, insert, select
from sqlalchemy.orm import Session

from service.domain import datasets
from service.errors import InvalidRequest, NotFound, Unavailable
from service.store.tables import Dataset, Image, ModelVersion, Suggestion, utcnow

log = logging.getLogger("felis.suggestions")

ORDERS = ("uncertain", "certain")


def page(session: Session, dataset: Dataset, *, order: str = "uncertain", limit: int = 100, offset: int = 0) -> dict[str, Any]:
    """The unlabeled images with the default version's suggestion, most useful to label next first.
    uncertain: open-set images first (like none of the training images), then the lowest
    probability; certain: the others first, highest probability first (what to accept in bulk).
    `pending`: unlabeled images the default version has not suggested a label for yet."""
    if order not in ORDERS:
        raise InvalidRequest(f"order must be one of {ORDERS}", code="invalid_order")
    if dataset.default_version is None:
        raise NotFound(datasets.why_no_default(session, dataset), code="no_model")
    version = dataset.default_version
    ood = session.scalar(select(ModelVersion.ood).where(ModelVersion.dataset_id == dataset.id, ModelVersion.version == version))
    threshold = (ood or {}).get("threshold")
    flagged = (Suggestion.ood_score > threshold) if threshold is not None else false()
    joined = (select(Image.id, Image.filename, Suggestion.label, Suggestion.probability, Suggestion.ood_score,
                     case((flagged, 1), else_=0).label("flagged"))
              .join(Suggestion, (Suggestion.image_id == Image.id) & (Suggestion.version == version))
              .where(Image.dataset_id == dataset.id, Image.label.is_(None)))
    sub = joined.subquery()
    rank = (sub.c.flagged.desc(), sub.c.probability.asc()) if order == "uncertain" else (sub.c.flagged.asc(), sub.c.probability.desc())
    rows = session.execute(select(sub).order_by(*rank, sub.c.id).limit(limit).offset(offset)).all()
    count = session.scalar(select(func.count()).select_from(sub)) or 0
    unlabeled = session.scalar(select(func.count(Image.id)).where(Image.dataset_id == dataset.id, Image.label.is_(None))) or 0
    return {"version": version, "order": order, "count": count, "pending": unlabeled - count,
            "data": [{"image_id": r.id, "filename": r.filename, "suggested_label": r.label,
                      "probability": round(float(r.probability), 6), "ood": bool(r.flagged),
                      "ood_score": None if r.ood_score is None else round(float(r.ood_score), 6)} for r in rows]}


def pending(session: Session, dataset_id: int, version: int, *, after: str = "", limit: int = 256) -> list[tuple[str, str]]:
    """(image id, sha256) of unlabeled images without a suggestion from `version`, in id order after `after`."""
    has = select(Suggestion.image_id).where(Suggestion.image_id == Image.id, Suggestion.version == version).exists()
    return [(r.id, r.sha256) for r in session.execute(
        select(Image.id, Image.sha256).where(Image.dataset_id == dataset_id, Image.label.is_(None), Image.id > after, ~has)
        .order_by(Image.id).limit(limit))]


def record(session: Session, dataset_id: int, version: int, rows: list[tuple[str, str, float, float | None]]) -> None:
    """(image id, label, probability, ood score) from `version`, replacing any it made before; the
    caller commits. Images deleted meanwhile are skipped (their rows would violate the foreign key)."""
    if not rows:
        return
    ids = [r[0] for r in rows]
    live = set(session.scalars(select(Image.id).where(Image.id.in_(ids), Image.dataset_id == dataset_id)))
    session.execute(delete(Suggestion).where(Suggestion.version == version, Suggestion.image_id.in_(ids))
                    .execution_options(synchronize_session=False))
    now = utcnow()
    values = [{"image_id": i, "version": version, "dataset_id": dataset_id, "label": label, "probability": float(p),
               "ood_score": None if s is None else float(s), "created_at": now} for i, label, p, s in rows if i in live]
    if values:
        session.execute(insert(Suggestion), values)


def delete_for_version(session: Session, dataset_id: int, version: int) -> None:
    """A deleted version's suggestions; the caller commits."""
    session.execute(delete(Suggestion).where(Suggestion.dataset_id == dataset_id, Suggestion.version == version)
                    .execution_options(synchronize_session=False))


def request(dataset_id: int) -> None:
    """Ask the worker for the default version's missing suggestions (after the commit that made
    them missing). Best effort: when the job queue is down it is asked again by the next upload,
    promotion or training, each of which computes every missing one."""
    from service.store.queue import enqueue_suggestions

    try:
        enqueue_suggestions(dataset_id)
    except Unavailable:
        log.warning("suggestions for dataset %s not requested: the job queue is down", dataset_id)
