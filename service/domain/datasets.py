"""Datasets: named collections of labeled images. The only writer of Dataset rows."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import delete as sa_delete
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.errors import AlreadyExists, InvalidRequest, NotFound
from service.store.blobs import BlobStore, image_key
from service.store.tables import Dataset, Image, ModelVersion, Training

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def validate_name(name: str) -> str:
    if not NAME_RE.fullmatch(name or ""):
        raise InvalidRequest(
            "dataset names are 1-64 characters of a-z, 0-9, '_' and '-', starting with a letter or digit",
            code="invalid_dataset_name",
        )
    return name


def create(session: Session, name: str) -> Dataset:
    validate_name(name)
    if session.scalar(select(Dataset).where(Dataset.name == name)):
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
    query = select(Dataset).where(Dataset.name == name)
    if for_update:
        query = query.with_for_update()
    dataset = session.scalar(query)
    if dataset is None:
        raise NotFound(f"dataset {name!r} does not exist", code="dataset_not_found")
    return dataset


def list_all(session: Session, *, limit: int = 100, offset: int = 0) -> tuple[list[Dataset], int]:
    total = session.scalar(select(func.count(Dataset.id))) or 0
    rows = session.scalars(select(Dataset).order_by(Dataset.name).limit(limit).offset(offset)).all()
    return list(rows), total


def label_counts(session: Session, dataset: Dataset) -> dict[str, int]:
    rows = session.execute(
        select(Image.label, func.count(Image.id))
        .where(Image.dataset_id == dataset.id)
        .group_by(Image.label)
        .order_by(Image.label)
    ).all()
    return {label: count for label, count in rows}


def describe(session: Session, dataset: Dataset) -> dict[str, Any]:
    counts = label_counts(session, dataset)
    return {
        "name": dataset.name,
        "labels": list(counts),
        "image_count": sum(counts.values()),
        "label_counts": counts,
        "default_version": dataset.default_version,
        "created_at": dataset.created_at,
    }


def delete(session: Session, store: BlobStore, name: str) -> None:
    """Delete a dataset with its images, trainings and versions; blobs no other dataset uses go too.

    Rows are deleted (and committed by the caller) first; blobs after, so a crash in between
    leaves unreferenced blobs at worst, never rows pointing at missing blobs."""
    dataset = get(session, name)
    shas = set(session.scalars(select(Image.sha256).where(Image.dataset_id == dataset.id)))
    model_keys = [k for row in session.execute(select(ModelVersion.checkpoint_key, ModelVersion.onnx_key)
                                               .where(ModelVersion.dataset_id == dataset.id)) for k in row if k]
    for table in (ModelVersion, Training, Image):
        session.execute(sa_delete(table).where(table.dataset_id == dataset.id))
    session.execute(sa_delete(Dataset).where(Dataset.id == dataset.id))
    still_used = set(session.scalars(select(Image.sha256).where(Image.sha256.in_(shas)))) if shas else set()
    session.commit()
    for sha in shas - still_used:
        store.delete(image_key(sha))
    for key in model_keys:
        store.delete(key)
