"""Datasets: named collections of labeled images. The only writer of Dataset rows.

A deleted dataset is marked at once (its name is free for a new dataset, under a new id) and
removed in the background: see cleanup.py."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import delete as sa_delete
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.errors import AlreadyExists, InvalidRequest, NotFound
from service.store.tables import Dataset, Image, ModelVersion, utcnow

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def validate_name(name: str) -> str:
    if not NAME_RE.fullmatch(name or ""):
        raise InvalidRequest(
            "dataset names are 1-64 characters of a-z, 0-9, '_' and '-', starting with a letter or digit",
            code="invalid_dataset_name",
        )
    return name


LIVE = Dataset.deleted_at.is_(None)


def create(session: Session, name: str) -> Dataset:
    validate_name(name)
    if session.scalar(select(Dataset).where(Dataset.name == name, LIVE)):
        raise AlreadyExists(f"dataset {name!r} already exists", code="dataset_exists")
    dataset = Dataset(name=name)
    session.add(dataset)
    try:
        session.flush()
    except IntegrityError as e:  # a concurrent create won the race
        session.rollback()
        raise AlreadyExists(f"dataset {name!r} already exists", code="dataset_exists") from e
    return dataset


def get(session: Session, name: str, *, for_update: bool = False) -> Dataset:
    query = select(Dataset).where(Dataset.name == name, LIVE)
    if for_update:  # locked, and read afresh (not what this session saw before)
        query = query.with_for_update().execution_options(populate_existing=True)
    dataset = session.scalar(query)
    if dataset is None:
        raise NotFound(f"dataset {name!r} does not exist", code="dataset_not_found")
    return dataset


def list_all(session: Session, *, limit: int = 100, offset: int = 0) -> tuple[list[Dataset], int]:
    total = session.scalar(select(func.count(Dataset.id)).where(LIVE)) or 0
    rows = session.scalars(select(Dataset).where(LIVE).order_by(Dataset.name).limit(limit).offset(offset)).all()
    return list(rows), total


def label_counts(session: Session, dataset: Dataset) -> dict[str, int]:
    """Images per label, the unlabeled ones aside (unlabeled_count)."""
    rows = session.execute(
        select(Image.label, func.count(Image.id))
        .where(Image.dataset_id == dataset.id, Image.label.is_not(None))
        .group_by(Image.label)
        .order_by(Image.label)
    ).all()
    return {label: count for label, count in rows}


def unlabeled_count(session: Session, dataset: Dataset) -> int:
    return session.scalar(select(func.count(Image.id)).where(Image.dataset_id == dataset.id, Image.label.is_(None))) or 0


def describe(session: Session, dataset: Dataset) -> dict[str, Any]:
    return describe_many(session, [dataset])[0]


def describe_many(session: Session, rows: list[Dataset]) -> list[dict[str, Any]]:
    """Each dataset as the API shows it; every dataset's label counts in one grouped query (a page
    of 1,000 datasets costs one query, not two per dataset)."""
    counts: dict[int, dict[str | None, int]] = {d.id: {} for d in rows}
    if rows:
        for dataset_id, label, n in session.execute(
            select(Image.dataset_id, Image.label, func.count(Image.id))
            .where(Image.dataset_id.in_(list(counts)))
            .group_by(Image.dataset_id, Image.label)
        ):
            counts[dataset_id][label] = n
    out = []
    for d in rows:
        labelled = dict(sorted((k, v) for k, v in counts[d.id].items() if k is not None))  # as training orders them
        unlabeled = counts[d.id].get(None, 0)
        out.append({
            "name": d.name,
            "labels": list(labelled),
            "image_count": sum(labelled.values()) + unlabeled,
            "label_counts": labelled,
            "unlabeled_count": unlabeled,
            "default_version": d.default_version,
            "created_at": d.created_at,
        })
    return out


def mark_deleted(session: Session, name: str) -> Dataset:
    """Deleted from every listing and lookup, and its name free; the caller commits (cleanup.py
    cancels its trainings in the same commit and removes its rows later)."""
    dataset = get(session, name, for_update=True)
    dataset.deleted_at = utcnow()
    return dataset


def deleted_ids(session: Session) -> list[int]:
    return list(session.scalars(select(Dataset.id).where(Dataset.deleted_at.is_not(None))))


def remove(session: Session, dataset_id: int) -> None:
    """The row of a deleted dataset whose images, trainings and versions are gone."""
    session.execute(sa_delete(Dataset).where(Dataset.id == dataset_id, Dataset.deleted_at.is_not(None)))


def why_no_default(session: Session, dataset: Dataset) -> str:
    """The no_model message: no version trained yet, or the default was deleted (then how to pick one)."""
    if session.scalar(select(ModelVersion.version).where(ModelVersion.dataset_id == dataset.id).limit(1)) is None:
        return f"dataset {dataset.name!r} has no trained model yet"
    return (f"dataset {dataset.name!r} has no default version (it was deleted): promote one "
            f"(POST /v1/datasets/{dataset.name}/models/{{version}}/promote) or ask for ?version=; "
            "the next training that succeeds becomes the default otherwise")
