"""Training runs: requested by the API, run by a worker (pipeline.py), watched by users.
The only writer of Training rows."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models.config import InvalidTrainConfig, TrainConfig
from service.config import Settings
from service.domain import datasets
from service.errors import Conflict, InvalidRequest, NotFound
from service.store.tables import Dataset, Training, utcnow

ACTIVE = ("queued", "running")
FINAL = ("succeeded", "failed", "cancelled")


def resolve_options(options: dict[str, Any], settings: Settings) -> TrainConfig:
    """The request's options validated and resolved, once: every default filled in with what the
    worker will use (int8 only with the pretrained weights its range table was measured on)."""
    try:
        config = TrainConfig.from_dict(options).resolved(int8_available=settings.pretrained_weights is None)
    except InvalidTrainConfig as e:
        raise InvalidRequest(str(e), code="invalid_training_option", details={"field": e.field}) from e
    except (TypeError, ValueError) as e:
        raise InvalidRequest(str(e), code="invalid_training_option") from e
    return config


def request(
    session: Session, dataset_name: str, options: dict[str, Any], settings: Settings, request_id: str | None = None
) -> Training:
    """Validate and record a training request. The caller commits, then enqueues."""
    dataset = datasets.get(session, dataset_name)
    config = resolve_options(options, settings)
    counts = datasets.label_counts(session, dataset)
    if len(counts) < 2:
        raise InvalidRequest(
            f"training needs at least 2 labels; dataset {dataset.name!r} has {len(counts)}",
            code="too_few_labels",
            details={"label_counts": counts},
        )
    small = {label: n for label, n in counts.items() if n < settings.min_images_per_label}
    if small:
        raise InvalidRequest(
            f"every label needs at least {settings.min_images_per_label} images; too few: {small}",
            code="too_few_images",
            details={"label_counts": counts},
        )
    training = Training(dataset_id=dataset.id, options=config.to_dict(), request_id=request_id)
    session.add(training)
    session.flush()
    return training


def record_import(session: Session, dataset: Dataset, config: dict[str, Any]) -> Training:
    """A training that ran elsewhere and whose checkpoint is being imported (pipeline.import_checkpoint):
    recorded as running, so that recording its version marks it succeeded. The caller commits."""
    training = Training(dataset_id=dataset.id, status="running", options=dict(config), started_at=utcnow(),
                        heartbeat_at=utcnow(), worker="import")
    session.add(training)
    session.flush()
    return training


def get(session: Session, training_id: str) -> Training:
    training = session.get(Training, training_id)
    if training is None:
        raise NotFound(f"training {training_id!r} does not exist", code="training_not_found")
    return training


def describe(session: Session, training: Training) -> dict[str, Any]:
    dataset = session.get(Dataset, training.dataset_id)
    return {
        "id": training.id,
        "dataset": dataset.name if dataset else None,
        "status": training.status,
        "options": training.options,
        "progress": training.progress or {},
        "model_version": training.model_version,
        "error": training.error,
        "attempts": training.attempts,
        "worker": training.worker,
        "created_at": training.created_at,
        "started_at": training.started_at,
        "finished_at": training.finished_at,
    }


def list_for(session: Session, dataset: Dataset, limit: int = 50) -> list[Training]:
    return list(
        session.scalars(
            select(Training).where(Training.dataset_id == dataset.id).order_by(Training.created_at.desc()).limit(limit)
        )
    )


def cancel(session: Session, training_id: str) -> Training:
    training = get(session, training_id)
    if training.status in FINAL:
        raise Conflict(f"training {training_id} has already {training.status}", code="training_finished")
    if training.status == "queued":
        # Not started: cancel at once. A worker that picks the message up later sees this.
        session.execute(
            update(Training).where(Training.id == training_id, Training.status == "queued")
            .values(status="cancelled", cancel_requested=True, finished_at=utcnow())
        )
    else:
        training.cancel_requested = True  # the worker checks between steps
    session.commit()
    session.refresh(training)
    return training


def mark_failed(session: Session, training_id: str, code: str, message: str) -> None:
    session.execute(
        update(Training)
        .where(Training.id == training_id, Training.status.in_(ACTIVE))
        .values(status="failed", error={"code": code, "message": message}, finished_at=utcnow())
    )
    session.commit()


def stale(session: Session, lease_seconds: int) -> list[Training]:
    """Running trainings whose worker stopped beating: it died, or lost its connection."""
    cutoff = datetime.now(timezone.utc) - timedelta(seconds=lease_seconds)
    rows = session.scalars(select(Training).where(Training.status == "running")).all()
    return [t for t in rows if t.heartbeat_at is None or t.heartbeat_at < cutoff]
