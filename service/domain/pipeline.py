"""Running one training: what the worker's task does, as a plain function tests can call.

claim -> snapshot the dataset -> models.train -> store checkpoint + ONNX -> version row.
Idempotent by training id: a finished training is left alone, and a redelivered message for a
training another worker is still running (fresh heartbeat) is dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from models.checkpoint import checkpoint_bytes, load_checkpoint
from models.train import Sample, TrainConfig, TrainingCancelled, train
from service.config import Settings, get_settings
from service.domain import trainings, versions
from service.domain.trainings import mark_failed
from service.store.blobs import BlobStore, get_store, image_key, model_keys
from service.store.db import new_session, session_scope
from service.store.features import DbFeatureCache
from service.store.tables import Dataset, Image, Training, utcnow

log = logging.getLogger("felis.trainer")


def run_training(training_id: str, *, settings: Settings | None = None, store: BlobStore | None = None,
                 device: str | None = None, worker_name: str | None = None) -> str:
    """Run the training to a final state and return that state."""
    settings = settings or get_settings()
    store = store or get_store()
    if not _claim(training_id, settings, worker_name or socket.gethostname()):
        with session_scope() as s:
            t = s.get(Training, training_id)
            return t.status if t else "missing"
    heartbeat = _Heartbeat(training_id, interval=max(1.0, settings.training_lease_seconds / 6))
    heartbeat.start()
    try:
        return _run(training_id, settings, store, device or settings.device)
    except TrainingCancelled:
        with session_scope() as s:
            s.execute(update(Training).where(Training.id == training_id)
                      .values(status="cancelled", finished_at=utcnow()))
        return "cancelled"
    except Exception as e:
        code = "time_limit" if type(e).__name__ == "SoftTimeLimitExceeded" else "training_error"
        log.exception("training %s failed", training_id)
        with session_scope() as s:
            mark_failed(s, training_id, code, f"{type(e).__name__}: {e}")
        return "failed"
    finally:
        heartbeat.stop()


def _claim(training_id: str, settings: Settings, worker_name: str) -> bool:
    """queued -> running, atomically; also takes over a 'running' one whose worker went silent."""
    stale_before = datetime.now(timezone.utc) - timedelta(seconds=settings.training_lease_seconds)
    with session_scope() as s:
        result = s.execute(
            update(Training)
            .where(Training.id == training_id)
            .where(or_(Training.status == "queued",
                       (Training.status == "running") & (Training.heartbeat_at < stale_before)))
            .where(Training.cancel_requested.is_(False))
            .values(status="running", started_at=utcnow(), heartbeat_at=utcnow(),
                    attempts=Training.attempts + 1, worker=worker_name[:255])
        )
        return result.rowcount == 1


def _run(training_id: str, settings: Settings, store: BlobStore, device: str) -> str:
    with session_scope() as s:
        training = s.get(Training, training_id)
        dataset = s.get(Dataset, training.dataset_id)
        # content order, not id order: the same images give the same splits whenever they were uploaded
        images = s.scalars(select(Image).where(Image.dataset_id == dataset.id).order_by(Image.sha256)).all()
        options, dataset_id, dataset_name = dict(training.options), dataset.id, dataset.name
        rows = [(i.id, i.sha256, i.label, i.phash) for i in images]
    snapshot = _snapshot(rows)
    samples = [
        Sample(image_id=i, sha256=sha, label=label, phash=phash, load=_loader(store, sha))
        for i, sha, label, phash in rows
    ]
    config = TrainConfig.from_stored(options)  # validated and resolved when it was requested
    reporter = _Progress(training_id)
    result = train(
        samples, config, device=device, feature_cache=DbFeatureCache(),
        progress=reporter.report, should_stop=reporter.should_stop,
        pretrained_weights=str(settings.pretrained_weights) if settings.pretrained_weights else None,
        dataset={"name": dataset_name, **snapshot},
    )
    reporter.report({"phase": "saving"}, force=True)
    ckpt = result.checkpoint
    checkpoint_key, onnx_key = model_keys(dataset_id, training_id)
    store.put(checkpoint_key, checkpoint_bytes(ckpt))
    if result.onnx:
        store.put(onnx_key, result.onnx)
    else:
        onnx_key = None
    session = new_session()
    try:
        training = session.get(Training, training_id)
        if training.cancel_requested:
            raise TrainingCancelled()
        versions.create(
            session, training, architecture=config.architecture, labels=list(ckpt["labels"]),
            metrics=result.metrics, evaluation=result.evaluation, config=dict(ckpt["training_config"]),
            snapshot={k: v for k, v in snapshot.items() if k != "images"},
            checkpoint_key=checkpoint_key, onnx_key=onnx_key,
        )
    finally:
        session.close()
    return "succeeded"


def import_checkpoint(session: Session, store: BlobStore, dataset: Dataset, checkpoint: bytes,
                      onnx: bytes | None = None) -> int:
    """Record a checkpoint trained elsewhere as the dataset's next version, the way a finished
    training records one (its blobs under model_keys, a training row, a version row); returns the
    version number. The ONNX graph is exported from the checkpoint when not given."""
    ckpt = load_checkpoint(checkpoint)
    if onnx is None:
        from models.export import export_onnx

        onnx = export_onnx(ckpt)
    config = dict(ckpt.get("training_config") or {})
    training = trainings.record_import(session, dataset, config)
    session.commit()
    checkpoint_key, onnx_key = model_keys(dataset.id, training.id)
    store.put(checkpoint_key, checkpoint)
    store.put(onnx_key, onnx)
    row = versions.create(session, training, architecture=ckpt["architecture"]["name"], labels=list(ckpt["labels"]),
                          metrics=dict(ckpt.get("metrics") or {}), evaluation={}, config=config,
                          snapshot={k: v for k, v in (ckpt.get("dataset") or {}).items() if k != "images"},
                          checkpoint_key=checkpoint_key, onnx_key=onnx_key)
    return row.version


def _loader(store: BlobStore, sha: str):
    return lambda: store.get(image_key(sha))


def _snapshot(rows: list[tuple[str, str, str, str]]) -> dict[str, Any]:
    """What the version saw: every (image id, sha256, label), and one hash over that list."""
    listing = [[i, sha, label] for i, sha, label, _ in rows]
    digest = hashlib.sha256(json.dumps(listing, separators=(",", ":")).encode()).hexdigest()
    counts: dict[str, int] = {}
    for _, _, label, _ in rows:
        counts[label] = counts.get(label, 0) + 1
    return {"image_count": len(rows), "label_counts": counts, "hash": digest, "images": listing}


class _Progress:
    """Writes progress to the training row (at most every half second) and reads cancellation."""

    def __init__(self, training_id: str):
        self.training_id = training_id
        self._last_write = 0.0
        self._last_check = 0.0
        self._cancelled = False
        self._state: dict[str, Any] = {}

    def report(self, progress: dict[str, Any], force: bool = False) -> None:
        self._state.update(progress)
        self._state["updated_at"] = time.time()
        now = time.monotonic()
        if force or now - self._last_write >= 0.5 or "epoch" in progress and progress.get("val_accuracy") is not None:
            self._last_write = now
            with session_scope() as s:
                s.execute(update(Training).where(Training.id == self.training_id)
                          .values(progress=dict(self._state), heartbeat_at=utcnow()))

    def should_stop(self) -> bool:
        now = time.monotonic()
        if not self._cancelled and now - self._last_check >= 1.0:
            self._last_check = now
            with session_scope() as s:
                self._cancelled = bool(s.scalar(select(Training.cancel_requested).where(Training.id == self.training_id)))
        return self._cancelled


class _Heartbeat:
    """Proves the worker alive while a long step (one batch of features) holds the main thread."""

    def __init__(self, training_id: str, interval: float):
        self.training_id, self.interval = training_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"heartbeat-{training_id[:8]}")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with session_scope() as s:
                    s.execute(update(Training).where(Training.id == self.training_id, Training.status == "running")
                              .values(heartbeat_at=utcnow()))
            except Exception:  # a missed beat is not fatal; the lease allows several
                log.warning("heartbeat for training %s failed", self.training_id, exc_info=True)
