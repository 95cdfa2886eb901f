"""Running one training: what the worker's task does, as a plain function tests can call.

claim -> snapshot the dataset -> [many features not cached: fan them out as shards over the
worker pool (extraction.py) and stop; the last shard queues the training again] -> models.train
-> store checkpoint + ONNX (+ the held-out predictions behind the label-error report) -> version row.
Every write to the Training row goes through service.domain.trainings (claim, progress,
heartbeat, succeed, fail, cancelled) with this run's claim token, so a run that lost its claim
(another worker took over after its lease ran out) stops and writes nothing more. Its blobs go
under keys of its own run, so the version always points at the weights it evaluated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import time
from collections import Counter
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from models.checkpoint import checkpoint_bytes, load_checkpoint, ood_index
from models.train import Sample, TrainConfig, TrainingCancelled, WeightsUnavailable, train
from service.config import Settings, get_settings
from service.domain import extraction, trainings, uploads, versions
from service.domain.heartbeat import Heartbeat, heartbeat_interval
from service.domain.trainings import LostOwnership, Status
from service.errors import InvalidRequest, NotFound
from models.label_issues import pack_heldout
from service.store.blobs import BlobStore, get_store, heldout_key, model_keys
from service.store.db import session_scope
from service.store.features import BlobFeatureCache
from service.store.tables import Dataset, Image, Training

log = logging.getLogger("felis.trainer")


def run_training(training_id: str, *, settings: Settings | None = None, store: BlobStore | None = None,
                 device: str | None = None, worker_name: str | None = None) -> str:
    """Run the training to a final state and return that state (or, when this worker does not
    get it, the state it is in)."""
    settings = settings or get_settings()
    store = store or get_store()
    token = trainings.retrying(lambda: trainings.claim(training_id, worker_name or socket.gethostname(),
                                                       settings.training_lease_seconds),
                               seconds=settings.db_retry_seconds, what=f"claiming training {training_id}")
    if token is None:
        return trainings.status_of(training_id)
    run = _Run(training_id, token, settings)
    run.heartbeat.start()
    try:
        return _run_reading_again(run, settings, store, device or settings.device)
    except TrainingCancelled:
        return Status.CANCELLED if run.write(lambda: trainings.cancelled(training_id, token), "recording the cancel") else trainings.status_of(training_id)
    except LostOwnership:
        log.warning("training %s: another worker took it over; this run stops", training_id)
        return trainings.status_of(training_id)
    except InvalidRequest as e:  # what the request would have been refused for, true by now (check_label_counts)
        code, message = e.code, e.message
        log.info("training %s: %s", training_id, message)
        run.write(lambda: trainings.fail(training_id, code, message, token=token), "recording the failure")
        return trainings.status_of(training_id)
    except WeightsUnavailable as e:  # an offline worker without the backbone's file: the message says which, and where
        message = str(e)
        log.warning("training %s: %s", training_id, message)
        run.write(lambda: trainings.fail(training_id, "weights_unavailable", message, token=token), "recording the failure")
        return trainings.status_of(training_id)
    except DBAPIError as e:
        if not trainings.is_transient(e):
            return _failed(run, e)
        # the database was away longer than FELIS_DB_RETRY_SECONDS: not the training's fault
        log.warning("training %s: the metadata store stayed unreachable (%s); the training goes back to the queue",
                    training_id, type(e.orig).__name__)
        try:
            if run.write(lambda: trainings.release(training_id, token), "giving the training back") == Status.QUEUED:
                from service.store.queue import enqueue_training

                trainings.send(training_id, enqueue_training)  # the sweep sends it when this fails
            return trainings.status_of(training_id)
        except DBAPIError:  # still away: the row stays running, and the sweep queues it again after its lease
            return Status.RUNNING
    except Exception as e:
        return _failed(run, e)
    finally:
        run.heartbeat.stop()


def _failed(run: "_Run", e: Exception) -> str:
    """An unexpected error: the training FAILED with its type and words (time_limit past Celery's)."""
    training_id, token = run.training_id, run.token
    code = "time_limit" if type(e).__name__ == "SoftTimeLimitExceeded" else "training_error"
    message = f"{type(e).__name__}: {e}"
    log.exception("training %s failed", training_id)
    run.write(lambda: trainings.fail(training_id, code, message, token=token), "recording the failure")
    return trainings.status_of(training_id)


READ_AGAIN = 3  # times a run lists the dataset again when images it listed went while it read them


def _run_reading_again(run: "_Run", settings: Settings, store: BlobStore, device: str) -> str:
    """_run; when an image's bytes are gone because the image was deleted after the run listed
    the dataset (its blob purged once FELIS_BLOB_GRACE_SECONDS passed: a long extraction or
    fine-tuning), the run lists the dataset again and goes on without it (what it computed is in
    the feature cache). Bytes missing for an image the dataset still holds end the run (NotFound
    blob_missing), as they would every time."""
    for attempt in range(READ_AGAIN + 1):
        try:
            return _run(run, settings, store, device)
        except NotFound as e:
            if e.code != "blob_missing" or attempt == READ_AGAIN or not _listed_images_went(run.training_id, run.listed):
                raise
            log.info("training %s: images were deleted while it read them (%s): listing the dataset again", run.training_id, e.message)
    raise AssertionError("unreachable")


def _listed_images_went(training_id: str, listed: set[str]) -> bool:
    """Whether some of the images a run listed are no longer in its dataset (labelled)."""
    with session_scope() as s:
        dataset_id = s.get(Training, training_id).dataset_id
        held = set(s.scalars(select(Image.id).where(Image.dataset_id == dataset_id, Image.label.is_not(None))))
    return bool(listed - held)


def _run(run: "_Run", settings: Settings, store: BlobStore, device: str) -> str:
    training_id = run.training_id
    with session_scope() as s:
        training = s.get(Training, training_id)
        dataset = s.get(Dataset, training.dataset_id)
        # content order, not id order: the same images give the same splits whenever they were uploaded
        images = s.scalars(select(Image).where(Image.dataset_id == dataset.id, Image.label.is_not(None))  # unlabeled: not trained on
                           .order_by(Image.sha256)).all()
        options, dataset_id, dataset_name = dict(training.options), dataset.id, dataset.name
        rows = [(i.id, i.sha256, i.label, i.phash) for i in images]
    run.listed = {i for i, _, _, _ in rows}
    # images may have gone while it waited
    trainings.check_label_counts(dict(Counter(label for _, _, label, _ in rows)), dataset_name, settings)
    snapshot = _snapshot(rows)
    samples = [
        Sample(image_id=i, sha256=sha, label=label, phash=phash, load=extraction.loader(store, sha))
        for i, sha, label, phash in rows
    ]
    config = TrainConfig.from_stored(options)  # validated and resolved when it was requested
    if extraction.fan_out(run.training_id, run.token, [sha for _, sha, _, _ in rows], config, settings, store, device,
                          write=run.write):
        return Status.EXTRACTING  # the shards compute the features; the last one queues the head fit
    result = train(
        samples, config, device=device, feature_cache=BlobFeatureCache(store, settings),
        progress=run.report, should_stop=run.should_stop,
        pretrained_weights=extraction.weights_path(settings),
        dataset={"name": dataset_name, **snapshot},
    )
    run.report({"phase": "saving"}, force=True)
    ckpt = result.checkpoint
    checkpoint_key, onnx_key = model_keys(dataset_id, training_id, run.token)
    onnx_key = onnx_key if result.onnx else None
    report = result.label_report
    report_key = heldout_key(dataset_id, training_id, run.token) if report is not None else None
    # listed as orphans before they exist: until a version refers to them, a run that is cancelled,
    # loses its claim or dies here leaves nothing behind (cleanup.collect, after the grace period)
    run.write(lambda: _list_as_orphans([checkpoint_key, onnx_key, report_key]), "listing the model blobs")
    store.put(checkpoint_key, checkpoint_bytes(ckpt))
    if onnx_key:
        store.put(onnx_key, result.onnx)
    if report_key:
        store.put(report_key, pack_heldout([s.image_id for s in samples], list(ckpt["labels"]),
                                           [ckpt["labels"].index(s.label) for s in samples],
                                           report.probabilities, report.issues))
    if run.should_stop(force=True):
        raise TrainingCancelled()
    run.write(lambda: versions.create(
        training_id, run.token, architecture=config.architecture, labels=list(ckpt["labels"]),
        metrics=result.metrics, evaluation=result.evaluation, config=dict(ckpt["training_config"]),
        snapshot={k: v for k, v in snapshot.items() if k != "images"},
        checkpoint_key=checkpoint_key, onnx_key=onnx_key, ood=ood_calibration(ckpt),
        heldout_key=report_key, label_issue_count=len(report.issues) if report is not None else None,
    ), "recording the version")
    if settings.keep_versions:
        _apply_retention(store, dataset_id, settings.keep_versions)
    _suggest(dataset_id, training_id, settings, store)
    return Status.SUCCEEDED


def _suggest(dataset_id: int, training_id: str, settings: Settings, store: BlobStore) -> None:
    """After the version is recorded: its suggestions for the dataset's unlabeled images (a
    failure here leaves them to the next request; the training has succeeded)."""
    from service.domain.suggesting import run_suggestions

    try:
        with session_scope() as s:
            version = s.scalar(select(Training.model_version).where(Training.id == training_id))
        if version:
            run_suggestions(dataset_id, version, settings=settings, store=store)
    except Exception:
        log.warning("suggestions after training %s failed; the next upload or training computes them", training_id,
                    exc_info=True)


def _apply_retention(store: BlobStore, dataset_id: int, keep: int) -> None:
    """After the version is recorded: a failure here leaves older versions for the next training."""
    try:
        with session_scope() as s:
            versions.apply_retention(s, store, dataset_id, keep)
    except Exception:
        log.warning("retention for dataset %s failed; older versions stay until the next training", dataset_id,
                    exc_info=True)


def _list_as_orphans(keys: list[str | None]) -> None:
    with session_scope() as s:
        uploads.orphan_blobs(s, [k for k in keys if k])


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
    checkpoint_key, onnx_key = model_keys(dataset.id, training.id, training.claim_token)
    store.put(checkpoint_key, checkpoint)
    store.put(onnx_key, onnx)
    row = versions.create(training.id, training.claim_token, architecture=ckpt["architecture"]["name"], labels=list(ckpt["labels"]),
                          metrics=dict(ckpt.get("metrics") or {}), evaluation={}, config=config,
                          snapshot={k: v for k, v in (ckpt.get("dataset") or {}).items() if k != "images"},
                          checkpoint_key=checkpoint_key, onnx_key=onnx_key, ood=ood_calibration(ckpt))
    return row.version


OOD_FIELDS = ("method", "threshold", "flagged_fraction", "quantiles", "index_vectors", "n_train")


def ood_calibration(ckpt: dict) -> dict | None:
    """The version's `ood` column from its checkpoint's open-set index (what the graph's metadata
    carries too), None for a checkpoint without one."""
    from models.export import ood_metadata

    index = ood_index(ckpt)
    return None if index is None else {k: v for k, v in ood_metadata(index).items() if k in OOD_FIELDS}


def _snapshot(rows: list[tuple[str, str, str, str]]) -> dict[str, Any]:
    """What the version saw: every (image id, sha256, label), and one hash over that list."""
    listing = [[i, sha, label] for i, sha, label, _ in rows]
    digest = hashlib.sha256(json.dumps(listing, separators=(",", ":")).encode()).hexdigest()
    counts: dict[str, int] = {}
    for _, _, label, _ in rows:
        counts[label] = counts.get(label, 0) + 1
    return {"image_count": len(rows), "label_counts": counts, "hash": digest, "images": listing}


class _Run:
    """One claimed run: progress at most every half second, cancellation read at most every
    second, a heartbeat thread for long steps; each write retried through database blips."""

    def __init__(self, training_id: str, token: str, settings: Settings):
        self.training_id, self.token, self.settings = training_id, token, settings
        self.listed: set[str] = set()  # the image ids its last listing of the dataset gave
        self._last_write = 0.0
        self._last_check = 0.0
        self._cancelled = False
        self._state: dict[str, Any] = {}
        self.heartbeat = Heartbeat(lambda: trainings.heartbeat(training_id, token), heartbeat_interval(settings),
                                   f"training {training_id}")

    def write(self, fn, what: str):
        return trainings.retrying(fn, seconds=self.settings.db_retry_seconds,
                                  what=f"training {self.training_id}: {what}")

    def report(self, progress: dict[str, Any], force: bool = False) -> None:
        force = force or progress.get("phase", self._state.get("phase")) != self._state.get("phase")  # a new phase shows at once
        self._state.update(progress)
        self._state["updated_at"] = time.time()
        now = time.monotonic()
        if force or now - self._last_write >= 0.5 or "epoch" in progress and progress.get("val_accuracy") is not None:
            self._last_write = now
            state = dict(self._state)
            self.write(lambda: trainings.report_progress(self.training_id, self.token, state), "progress")

    def should_stop(self, force: bool = False) -> bool:
        now = time.monotonic()
        if not self._cancelled and (force or now - self._last_check >= 1.0):
            self._last_check = now
            self._cancelled = self.write(lambda: trainings.cancel_requested(self.training_id, self.token), "cancel check")
        return self._cancelled
