"""Model versions: immutable, numbered 1, 2, 3... per dataset. The only writer of ModelVersion rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import Connection, bindparam, func, select
from sqlalchemy import delete as sa_delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models.evaluate import threshold_for_precision
from models.ood import MAX_DISTANCE, QUANTILE_GRID
from service.domain import datasets, publish_names, suggestions, trainings, uploads
from service.errors import Conflict, InvalidRequest, NotFound
from service.store.blobs import BlobStore
from service.store.db import session_scope
from service.store.tables import Dataset, ModelVersion, Training


def create(training_id: str, token: str | None, *, architecture: str, labels: list[str], metrics: dict,
           evaluation: dict, config: dict, snapshot: dict, checkpoint_key: str, onnx_key: str | None,
           ood: dict | None = None, heldout_key: str | None = None, label_issue_count: int | None = None) -> ModelVersion:
    """Record the version a training produced and mark the training succeeded, in one commit.
    ood: its open-set calibration ({method, threshold, flagged_fraction, quantiles, index_vectors,
    n_train}), None for a checkpoint without an index. heldout_key: the blob of its training images'
    held-out predictions and label-error report (service.domain.label_issues), label_issue_count
    how many that report flags; None for a version without one.

    Idempotent by training id: a redelivered task finds the version it made before. Only the run
    that owns the training (its claim token) can record it: trainings.succeed raises LostOwnership
    otherwise, and nothing is written; so does a deleted dataset. The number is the dataset's
    last_version + 1 under its row lock (never a deleted version's number); a concurrent insert
    that takes the same number fails on the unique constraint and is retried."""
    with session_scope() as session:
        for _ in range(10):
            existing = session.scalar(select(ModelVersion).where(ModelVersion.training_id == training_id))
            if existing:
                return existing
            training = session.get(Training, training_id)
            if training is None:
                raise trainings.LostOwnership(training_id)  # its dataset was deleted meanwhile
            dataset = session.scalar(select(Dataset).where(Dataset.id == training.dataset_id).with_for_update())
            if dataset.deleted_at is not None:
                raise trainings.LostOwnership(training_id)
            highest = session.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.dataset_id == dataset.id)) or 0
            number = max(dataset.last_version or 0, highest) + 1
            dataset.last_version = number
            version = ModelVersion(
                dataset_id=dataset.id, version=number, training_id=training_id, architecture=architecture,
                labels=labels, metrics=metrics, evaluation=evaluation, config=config, snapshot=snapshot,
                checkpoint_key=checkpoint_key, onnx_key=onnx_key, thresholds={}, ood=ood,
                heldout_key=heldout_key, label_issue_count=label_issue_count,
            )
            session.add(version)
            if dataset.default_version is None:
                dataset.default_version = number  # the first successful version serves at once
            try:
                session.flush()
                trainings.succeed(session, training_id, token, number)
                session.commit()
                return version
            except IntegrityError:
                session.rollback()
    raise RuntimeError("could not allocate a version number")


def delete(session: Session, store: BlobStore, dataset_name: str, version: int, *, force: bool = False) -> None:
    """Delete one version and its blobs. The default version, or one a Custom Vision publish name
    serves, only with force, which leaves the dataset without a default (predict then answers
    no_model until a promotion, or until the next training succeeds: a dataset without a default
    takes its next version as the default, as it does its first) and unpublishes the names. Its number is never given again. The
    row goes first, its blobs listed as orphans in the same commit, then the blobs; after a crash
    in between, cleanup.collect deletes them."""
    dataset = datasets.get(session, dataset_name, for_update=True)
    row = get(session, dataset, version)
    if dataset.default_version == row.version:
        if not force:
            raise Conflict(f"version {version} is the default of {dataset_name!r}; promote another first, "
                           "or delete with ?force=true", code="version_is_default")
        dataset.default_version = None
    names = publish_names.for_version(session, dataset.id, row.version)
    if names and not force:
        raise Conflict(f"version {version} of {dataset_name!r} is published as {', '.join(map(repr, names))} "
                       "(Custom Vision): unpublish it first, or delete with ?force=true", code="version_published")
    if names:
        publish_names.drop_for_version(session, dataset.id, row.version)
    keys = blob_keys(row)
    suggestions.delete_for_version(session, dataset.id, row.version)
    session.delete(row)
    uploads.orphan_blobs(session, keys)  # listed in the same commit: a crash before the deletes below is repaired by the sweep
    session.commit()
    for key in keys:
        store.delete(key)


BLOB_COLUMNS = (ModelVersion.checkpoint_key, ModelVersion.onnx_key, ModelVersion.heldout_key)  # every blob a version names


def blob_keys(row: ModelVersion) -> list[str]:
    return [k for k in (row.checkpoint_key, row.onnx_key, row.heldout_key) if k]


def delete_all(session: Session, dataset_id: int) -> list[str]:
    """Every version row of a (deleted) dataset; returns their blob keys. The caller commits."""
    keys = [k for row in session.execute(select(*BLOB_COLUMNS).where(ModelVersion.dataset_id == dataset_id)) for k in row if k]
    session.execute(sa_delete(ModelVersion).where(ModelVersion.dataset_id == dataset_id))
    return keys


def apply_retention(session: Session, store: BlobStore, dataset_id: int, keep: int) -> list[int]:
    """Keep the newest ``keep`` versions (FELIS_KEEP_VERSIONS) and the default; delete the rest.
    Returns the numbers deleted. Their blobs go with them."""
    dataset = session.get(Dataset, dataset_id, populate_existing=True)  # its default as it is now
    numbers = list(session.scalars(select(ModelVersion.version).where(ModelVersion.dataset_id == dataset_id)
                                   .order_by(ModelVersion.version.desc())))
    doomed = [n for n in numbers[keep:] if n != dataset.default_version]
    for number in doomed:
        delete(session, store, dataset.name, number, force=False)
    return doomed


def list_for(session: Session, dataset: Dataset) -> list[ModelVersion]:
    return list(session.scalars(select(ModelVersion).where(ModelVersion.dataset_id == dataset.id).order_by(ModelVersion.version)))


def get(session: Session, dataset: Dataset, version: int) -> ModelVersion:
    row = session.scalar(select(ModelVersion).where(ModelVersion.dataset_id == dataset.id, ModelVersion.version == version))
    if row is None:
        raise NotFound(f"dataset {dataset.name!r} has no model version {version}", code="version_not_found")
    return row


def resolve(session: Session, dataset: Dataset, version: int | None) -> ModelVersion:
    """The version to predict with: the one asked for, else the dataset's default."""
    if version is None:
        if dataset.default_version is None:
            raise NotFound(datasets.why_no_default(session, dataset), code="no_model")
        version = dataset.default_version
    return get(session, dataset, version)


@dataclass(frozen=True)
class Serving:
    """What predict needs of a version (not its evaluation, which can be large JSON)."""

    version: int
    checkpoint_key: str
    onnx_key: str | None
    thresholds: dict[str, float]
    ood_threshold: float | None = None  # an image whose ood_score passes it is flagged; None: no index


def _serving_query(version):
    return (select(ModelVersion.version, ModelVersion.checkpoint_key, ModelVersion.onnx_key, ModelVersion.thresholds,
                   ModelVersion.ood["threshold"].as_float().label("ood_threshold"))
            .join(Dataset, Dataset.id == ModelVersion.dataset_id)
            .where(Dataset.name == bindparam("name"), Dataset.deleted_at.is_(None), ModelVersion.version == version))


# built once: building the statement on each call cost 5x its execution (440 against 90 us, SQLite,
# AMD EPYC), on every predict request
_SERVING_DEFAULT = _serving_query(Dataset.default_version)
_SERVING_VERSION = _serving_query(bindparam("version"))


def for_serving(conn: Connection, dataset_name: str, version: int | None) -> Serving:
    """The version to predict with (asked for, else the default), in one small Core query per
    request on a plain connection (a third of an ORM session's cost): a promotion takes effect
    on the next request, in every API process; so does a moved threshold (only the open-set
    threshold is read of the `ood` JSON, not its quantiles)."""
    if version is None:
        row = conn.execute(_SERVING_DEFAULT, {"name": dataset_name}).first()
    else:
        row = conn.execute(_SERVING_VERSION, {"name": dataset_name, "version": version}).first()
    if row is None:  # say precisely what is missing: the dataset, any model, or that version
        with Session(bind=conn) as session:
            resolve(session, datasets.get(session, dataset_name), version)
        raise NotFound(f"dataset {dataset_name!r} has no model version {version}", code="version_not_found")
    return Serving(row.version, row.checkpoint_key, row.onnx_key, dict(row.thresholds or {}), row.ood_threshold)


def promote(session: Session, dataset_name: str, version: int) -> ModelVersion:
    dataset = datasets.get(session, dataset_name, for_update=True)
    row = get(session, dataset, version)
    dataset.default_version = row.version
    session.commit()
    if datasets.unlabeled_count(session, dataset):  # the new default's suggestions, where it has none yet
        suggestions.request(dataset.id)
    return row


def set_threshold(session: Session, dataset_name: str, version: int, label: str, *,
                  threshold: float | None = None, min_precision: float | None = None) -> ModelVersion:
    """A decision threshold for one label: given directly, or the lowest threshold whose validation
    precision reaches min_precision. The version's weights never change; this is serving config."""
    dataset = datasets.get(session, dataset_name)
    row = get(session, dataset, version)
    if label not in row.labels:
        raise InvalidRequest(f"label {label!r} is not one of {row.labels}", code="unknown_label")
    if (threshold is None) == (min_precision is None):
        raise InvalidRequest("give exactly one of 'threshold' and 'min_precision'", code="invalid_threshold")
    if min_precision is not None:
        threshold = threshold_for_precision(row.evaluation, label, min_precision)
        if threshold is None:
            raise InvalidRequest(f"no threshold reaches precision {min_precision} for {label!r} on validation",
                                 code="precision_unreachable")
    assert threshold is not None
    if not 0.0 <= threshold <= 1.0:
        raise InvalidRequest("threshold must be within [0, 1]", code="invalid_threshold")
    row.thresholds = {**(row.thresholds or {}), label: float(threshold)}
    session.commit()
    return row


def clear_threshold(session: Session, dataset_name: str, version: int, label: str) -> ModelVersion:
    """The label's decision threshold removed (its decision is again the likeliest label's, among
    the labels without one); a label without one is left as it is."""
    dataset = datasets.get(session, dataset_name)
    row = get(session, dataset, version)
    if label not in row.labels:
        raise InvalidRequest(f"label {label!r} is not one of {row.labels}", code="unknown_label")
    if label in (row.thresholds or {}):
        row.thresholds = {k: v for k, v in row.thresholds.items() if k != label}
        session.commit()
    return row


def set_ood_threshold(session: Session, dataset_name: str, version: int, *,
                      threshold: float | None = None, flagged_fraction: float | None = None) -> ModelVersion:
    """Move the open-set threshold: given directly (a cosine distance, 0..2), or as the share of
    the training images it would flag, read off the quantiles of their scores kept at training.
    Applies from the next prediction on; the version's graph and checkpoint never change."""
    dataset = datasets.get(session, dataset_name)
    row = get(session, dataset, version)
    if not row.ood:
        raise Conflict(f"version {version} of {dataset_name!r} has no open-set index (trained before it); retrain to get one",
                       code="ood_unavailable")
    if (threshold is None) == (flagged_fraction is None):
        raise InvalidRequest("give exactly one of 'threshold' and 'flagged_fraction'", code="invalid_ood_threshold")
    quantiles = np.asarray(row.ood["quantiles"], dtype=np.float64)
    if flagged_fraction is not None:
        if not 0.0 < flagged_fraction < 1.0:
            raise InvalidRequest("flagged_fraction must be between 0 and 1 (exclusive)", code="invalid_ood_threshold")
        threshold = float(np.interp(1.0 - flagged_fraction, QUANTILE_GRID, quantiles))  # as OodIndex.threshold_for
    else:
        assert threshold is not None
        if not 0.0 <= threshold <= MAX_DISTANCE:
            raise InvalidRequest(f"threshold must be within [0, {MAX_DISTANCE:g}]", code="invalid_ood_threshold")
        flagged_fraction = _share_above(quantiles, threshold)
    row.ood = {**row.ood, "threshold": float(threshold), "flagged_fraction": float(flagged_fraction)}
    session.commit()
    return row


def _share_above(quantiles: np.ndarray, threshold: float) -> float:
    """The share of the training scores above `threshold`: the inverse of threshold_for's
    interpolation (quantiles rise with QUANTILE_GRID; equal ones, from duplicates, count once)."""
    hi = int(np.searchsorted(quantiles, threshold, side="right"))  # quantiles <= threshold
    if hi == 0:
        return 1.0
    if hi == len(quantiles):
        return 0.0
    lo_q, hi_q, lo_g, hi_g = quantiles[hi - 1], quantiles[hi], QUANTILE_GRID[hi - 1], QUANTILE_GRID[hi]
    return float(1.0 - (lo_g + (threshold - lo_q) / (hi_q - lo_q) * (hi_g - lo_g)))


def ood_public(ood: dict | None) -> dict | None:
    """A version's open-set calibration as the API shows it (without the 1,001 quantiles)."""
    return None if not ood else {k: v for k, v in ood.items() if k != "quantiles"}


def describe(row: ModelVersion, dataset: Dataset) -> dict[str, Any]:
    return {
        "version": row.version,
        "default": dataset.default_version == row.version,
        "architecture": row.architecture,
        "labels": row.labels,
        "metrics": row.metrics,
        "config": row.config,
        "snapshot": row.snapshot,
        "thresholds": row.thresholds or {},
        "ood": ood_public(row.ood),
        "label_issue_count": row.label_issue_count,
        "training_id": row.training_id,
        "created_at": row.created_at,
    }
