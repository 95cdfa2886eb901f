"""The life of a training, in one module: the only writer of Training rows.

    request ─► QUEUED ──(send: the message is confirmed sent; the outbox)──► claim ─► RUNNING
    RUNNING ──heartbeat / progress──► RUNNING ──► succeed ─► SUCCEEDED
                                              ──► fail ─► FAILED (always with a reason)
                                              ──► cancelled ─► CANCELLED
    RUNNING ──start_extraction (many features to compute)──► EXTRACTING: shards fan the features
            out over the worker pool; no worker is held; the last shard to finish ─► QUEUED again,
            and the run that claims it finds every feature cached and fits the head
    shard: QUEUED ──claim_shard──► RUNNING ──finish_shard──► DONE  (fail_shard: the training FAILED)
           QUEUED | RUNNING ──its training cancelled or failed──► STOPPED
    QUEUED | EXTRACTING ──cancel──► CANCELLED;  RUNNING ──cancel──► cancel_requested, the worker stops
    RUNNING ──release (the database away longer than the run's retries)──► QUEUED, sent again
    sweep: RUNNING with no heartbeat for a lease ─► QUEUED again (attempts < MAX_ATTEMPTS),
           FAILED worker_lost, or CANCELLED when cancel was requested; QUEUED whose message was
           never confirmed sent (broker down, or the API died between commit and send) is sent;
           QUEUED sent long ago and never claimed is sent again; shards likewise (a RUNNING shard
           whose worker went silent is QUEUED again: only that shard's images are computed again).

Every transition is one conditional UPDATE on the status it expects and, for a running
training, on the claim token of the worker that owns it: a worker that lost its training (its
lease ran out and another took it over) can no longer write progress, a version or a final
state. Times come from the database's clock on PostgreSQL (workers' clocks may differ); on SQLite
(one machine) the local clock is the database's. Duplicated messages are harmless: only a QUEUED
(or stale RUNNING) training can be claimed.

The pipeline that runs a training (pipeline.py) writes no Training row itself; it calls these.
"""

from __future__ import annotations

import enum
import logging
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import BigInteger, ColumnElement, Select, and_, cast, func, or_, select, update
from sqlalchemy import delete as sa_delete
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from models import memory
from models.config import InvalidTrainConfig, TrainConfig
from service import limits
from service.config import Settings
from service.domain import datasets, paging
from service.errors import Conflict, InvalidRequest, NotFound, TooMany
from service.store.db import is_unreachable, session_scope
from service.store.tables import ApiKey, Dataset, Image, Training, TrainingShard, utcnow

log = logging.getLogger("felis.trainings")

MAX_ATTEMPTS = 3  # claims of one training before a dying worker fails it for good
T = TypeVar("T")


class Status(enum.StrEnum):
    """The words the HTTP API and the console show."""

    QUEUED = "queued"
    RUNNING = "running"
    EXTRACTING = "extracting"  # its features are computed by shards on the worker pool; no worker held
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE = (Status.QUEUED, Status.RUNNING, Status.EXTRACTING)
FINAL = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)


class ShardStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    STOPPED = "stopped"  # its training ended (cancelled, or failed by another shard) before it did


class LostOwnership(Exception):
    """This worker's claim on the training is gone (its lease ran out and another worker took it,
    or it reached a final state): stop, and write nothing more."""


def _now(session: Session) -> ColumnElement[datetime] | datetime:
    """The clock of leases and timestamps: PostgreSQL's in production, the local one on SQLite."""
    return func.now() if session.get_bind().dialect.name == "postgresql" else utcnow()


def _ago(session: Session, seconds: float) -> ColumnElement[datetime] | datetime:
    return _now(session) - timedelta(seconds=seconds)


# --- requests (the API) -----------------------------------------------------------------------


def resolve_options(options: dict[str, Any], settings: Settings) -> TrainConfig:
    """The request's options validated and resolved, once: every default filled in with what the
    worker will use (int8 only with the pretrained weights its range table was measured on)."""
    try:
        config = TrainConfig.from_dict(options).resolved(int8_available=settings.pretrained_weights is None)
        config.check_given(options)
    except InvalidTrainConfig as e:
        raise InvalidRequest(str(e), code="invalid_training_option", details={"field": e.field}) from e
    except (TypeError, ValueError) as e:
        raise InvalidRequest(str(e), code="invalid_training_option") from e
    return config


def request(
    session: Session, dataset_name: str, options: dict[str, Any], settings: Settings, request_id: str | None = None,
    key_id: str | None = None,
) -> Training:
    """Validate and record a training request: queued, its message not sent yet. The caller
    commits, then calls ``send`` (the outbox: if the broker is down, the sweep sends it later).

    Refused: options whose estimated memory exceeds the worker's (422 training_memory_exceeded,
    naming the option to lower), and past the caps on unfinished trainings of the dataset or of
    the requesting key (``key_id``, api_keys.id; 429 too_many_trainings)."""
    dataset = datasets.get(session, dataset_name)
    config = resolve_options(options, settings)
    counts = datasets.label_counts(session, dataset)
    check_label_counts(counts, dataset.name, settings)
    _check_memory(session, dataset, config, sum(counts.values()), settings)
    dataset = datasets.get(session, dataset_name, for_update=True)  # requests of one dataset, one at a time
    _check_caps(session, dataset, key_id, settings)
    training = Training(dataset_id=dataset.id, status=Status.QUEUED, options=config.to_dict(), request_id=request_id,
                        key_id=key_id)
    session.add(training)
    session.flush()
    return training


def check_label_counts(counts: dict[str, int], dataset_name: str, settings: Settings) -> None:
    """At least 2 labels of FELIS_MIN_IMAGES_PER_LABEL images each, else InvalidRequest
    (too_few_labels, too_few_images): at the request, and again when the run reads the dataset
    (images deleted or relabelled while it waited)."""
    if len(counts) < 2:
        raise InvalidRequest(
            f"training needs at least 2 labels; dataset {dataset_name!r} has {len(counts)}",
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


def _check_memory(session: Session, dataset: Dataset, config: TrainConfig, n_images: int, settings: Settings) -> None:
    """422 training_memory_exceeded when the training's estimated peak (models.memory) exceeds the
    worker's memory: FELIS_WORKER_MEMORY_BYTES, else this machine's (service.limits.memory_budget)."""
    budget = settings.worker_memory_bytes if settings.worker_memory_bytes > 0 else limits.memory_budget()
    pixels = cast(Image.width, BigInteger) * Image.height  # the largest image is decoded whole, once
    largest = session.scalar(select(func.max(pixels)).where(Image.dataset_id == dataset.id)) or 0
    estimate = memory.estimate_training_memory(config, n_images, largest_image_pixels=largest).total
    if budget <= 0 or estimate <= budget:  # 0: the machine's memory is unknown
        return
    field, value = memory.what_to_lower(config, n_images, budget, largest_image_pixels=largest)
    fix = f"lower {field} to {value} or less" if value is not None else f"lower {field}"
    gib = 1 << 30
    raise InvalidRequest(
        f"this training would need about {estimate / gib:.1f} GiB on a worker, which has {budget / gib:.1f} GiB "
        f"(FELIS_WORKER_MEMORY_BYTES): {fix}",
        code="training_memory_exceeded",
        details={"field": field, "max_value": value, "estimated_bytes": estimate, "budget_bytes": budget},
    )


def _check_caps(session: Session, dataset: Dataset, key_id: str | None, settings: Settings) -> None:
    """429 too_many_trainings past the caps on unfinished trainings. Called with the dataset's row
    locked (PostgreSQL: FOR UPDATE; SQLite: the write lock, BEGIN IMMEDIATE), and the key's locked
    here, so that requests racing each other count each other's rows and never pass a cap together."""
    unfinished = select(func.count()).select_from(Training).where(Training.status.in_(ACTIVE))
    cap = settings.max_queued_trainings_per_dataset
    if cap > 0:
        n = session.scalar(unfinished.where(Training.dataset_id == dataset.id)) or 0
        if n >= cap:
            raise TooMany(
                f"dataset {dataset.name!r} already has {n} unfinished trainings (at most {cap} queued or running): "
                "wait for one to finish, or cancel one",
                code="too_many_trainings", details={"cap": "per_dataset", "count": n, "limit": cap})
    cap = settings.max_queued_trainings_per_key
    if key_id is not None and cap > 0:
        # the key's row, locked: one key's requests on different datasets, one at a time (always
        # after the dataset's, one of each per request: no two requests wait on each other in a circle)
        session.execute(select(ApiKey.id).where(ApiKey.id == key_id).with_for_update())
        n = session.scalar(unfinished.where(Training.key_id == key_id)) or 0
        if n >= cap:
            raise TooMany(
                f"this API key already has {n} unfinished trainings (at most {cap} queued or running): "
                "wait for one to finish, or cancel one",
                code="too_many_trainings", details={"cap": "per_key", "count": n, "limit": cap})


def send(training_id: str, enqueue: Callable[[str], None]) -> bool:
    """Send the training's message and record that the broker took it (the outbox's confirmation).
    False when the broker is unreachable: the training stays queued and the sweep sends it later."""
    return _send(Training, training_id, Status.QUEUED, enqueue, f"training {training_id}")


def _send(table: type[Training] | type[TrainingShard], row_id: str | int, queued: str, enqueue: Callable[[Any], None],
          what: str) -> bool:
    try:
        enqueue(row_id)
    except Exception as e:  # kombu raises OperationalError and friends when the broker is down
        log.warning("%s: message not sent (%s); the sweep sends it when the broker is back", what, e)
        return False
    with session_scope() as s:
        s.execute(update(table).where(table.id == row_id, table.status == queued).values(enqueued_at=_now(s)))
    return True


def record_import(session: Session, dataset: Dataset, config: dict[str, Any]) -> Training:
    """A training that ran elsewhere and whose checkpoint is being imported (pipeline.import_checkpoint):
    recorded as running with a claim token, so that recording its version marks it succeeded.
    The caller commits."""
    training = Training(dataset_id=dataset.id, status=Status.RUNNING, options=dict(config), started_at=utcnow(),
                        heartbeat_at=utcnow(), worker="import", claim_token=uuid.uuid4().hex, attempts=1)
    session.add(training)
    session.flush()
    return training


def get(session: Session, training_id: str) -> Training:
    """The training as the API shows it: NotFound once its dataset is deleted (its row stays, and
    a running one goes on until its worker sees the cancel, until the dataset is purged)."""
    training = session.get(Training, training_id)
    if training is None:
        raise NotFound(f"training {training_id!r} does not exist", code="training_not_found")
    if session.scalar(select(Dataset.deleted_at).where(Dataset.id == training.dataset_id)) is not None:
        raise NotFound(f"training {training_id!r} does not exist: its dataset was deleted", code="training_not_found")
    return training


def describe(session: Session, training: Training) -> dict[str, Any]:
    dataset = session.get(Dataset, training.dataset_id)
    return {
        "id": training.id,
        "dataset": dataset.name if dataset else None,
        "status": str(training.status),
        "options": training.options,
        "progress": _progress(session, training),
        "model_version": training.model_version,
        "error": training.error,
        "attempts": training.attempts,
        "cancel_requested": bool(training.cancel_requested),  # a running one stops at its next step
        "worker": training.worker,
        "heartbeat_at": training.heartbeat_at,  # its worker's last sign of life: older than a lease, it is queued again
        "created_at": training.created_at,
        "started_at": training.started_at,
        "finished_at": training.finished_at,
    }


def _progress(session: Session, training: Training) -> dict[str, Any]:
    """The training's progress; while its features are computed by shards, their sum and each
    shard's state (which worker, how far, how many attempts)."""
    progress = dict(training.progress or {})
    if training.status != Status.EXTRACTING:
        return progress
    shards = shards_of(session, training.id)
    progress.update(phase="features", done=sum(sh.images if sh.status == ShardStatus.DONE else sh.done for sh in shards),
                    total=sum(sh.images for sh in shards), shards_done=sum(sh.status == ShardStatus.DONE for sh in shards),
                    shards=[{"index": sh.index, "status": str(sh.status), "images": sh.images, "done": sh.done,
                             "worker": sh.worker, "attempts": sh.attempts} for sh in shards])
    return progress


def shards_of(session: Session, training_id: str) -> list[TrainingShard]:
    return list(session.scalars(select(TrainingShard).where(TrainingShard.training_id == training_id)
                                .order_by(TrainingShard.index)))


def list_for(session: Session, dataset: Dataset, limit: int = 50, offset: int = 0,
             cursor: str | None = None) -> tuple[list[Training], int, str | None]:
    """A page of the dataset's trainings, newest first, after `cursor` (service.domain.paging) or
    `offset`: the rows, how many there are, the next page's cursor (None after the last)."""
    where = [Training.dataset_id == dataset.id]
    total = session.scalar(select(func.count(Training.id)).where(*where)) or 0
    page = select(Training).where(*where)
    if cursor is not None:
        at, last = paging.decode("trainings", cursor)
        page = page.where(or_(Training.created_at < at, and_(Training.created_at == at, Training.id < last)))
    rows = list(session.scalars(page.order_by(Training.created_at.desc(), Training.id.desc()).limit(limit + 1).offset(offset)))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, total, paging.encode("trainings", rows[-1].created_at, rows[-1].id) if more else None


def is_final(status: str) -> bool:
    return status in FINAL


def cancel(session: Session, training_id: str) -> Training:
    """A user's cancel: a queued training is cancelled at once; a running one is asked to stop."""
    training = get(session, training_id)
    if training.status in FINAL:
        raise Conflict(f"training {training_id} has already ended ({training.status})", code="training_finished")
    _cancel(session, Training.id == training_id, "cancelled before it started", "cancelled while its features were computed")
    session.commit()
    session.refresh(training)
    return training


def cancel_all(session: Session, dataset_id: int, reason: str) -> None:
    """Cancel every active training of a dataset, in the caller's transaction: queued ones at
    once, running ones at their next step."""
    _cancel(session, Training.dataset_id == dataset_id, reason)


def _cancel(session: Session, which: ColumnElement[bool], reason: str, extracting_reason: str | None = None) -> None:
    """Queued or extracting -> CANCELLED at once (a running shard sees it at its next batch), the
    reason (an extracting one's own when given); running -> cancel_requested (the worker checks
    between steps)."""
    for status, why in ((Status.QUEUED, reason), (Status.EXTRACTING, extracting_reason or reason)):
        session.execute(update(Training).where(which, Training.status == status)
                        .values(status=Status.CANCELLED, cancel_requested=True, finished_at=_now(session),
                                error={"code": "cancelled", "message": why}))
    _stop_shards(session, select(Training.id).where(which, Training.status == Status.CANCELLED))
    session.execute(update(Training).where(which, Training.status == Status.RUNNING).values(cancel_requested=True))


def delete_all(session: Session, dataset_id: int) -> None:
    """The rows of a deleted dataset's trainings, once none is active. The caller commits."""
    if any_active(session, dataset_id):
        raise Conflict("the dataset still has an active training", code="training_active")
    ids = select(Training.id).where(Training.dataset_id == dataset_id).scalar_subquery()
    session.execute(sa_delete(TrainingShard).where(TrainingShard.training_id.in_(ids)))
    session.execute(sa_delete(Training).where(Training.dataset_id == dataset_id))


def any_active(session: Session, dataset_id: int) -> bool:
    return session.scalar(select(Training.id).where(Training.dataset_id == dataset_id,
                                                    Training.status.in_(ACTIVE)).limit(1)) is not None


# --- running (the worker) -----------------------------------------------------------------------


def claim(training_id: str, worker_name: str, lease_seconds: float) -> str | None:
    """QUEUED -> RUNNING for this worker, or take over a RUNNING one whose worker went silent for a
    lease; returns the claim token every later write of this run must show, or None (another
    worker has it, it is final or cancelled, or it does not exist)."""
    token = uuid.uuid4().hex
    with session_scope() as s:
        now = _now(s)
        done = s.execute(
            update(Training)
            .where(Training.id == training_id, Training.cancel_requested.is_(False))
            .where(or_(Training.status == Status.QUEUED,
                       and_(Training.status == Status.RUNNING, Training.heartbeat_at < _ago(s, lease_seconds))))
            .values(status=Status.RUNNING, claim_token=token, started_at=now, heartbeat_at=now,
                    attempts=Training.attempts + 1, worker=worker_name[:255])
        ).rowcount
    return token if done == 1 else None


def status_of(training_id: str) -> str:
    with session_scope() as s:
        t = s.get(Training, training_id)
        return str(t.status) if t else "missing"


def _owned(training_id: str, token: str):
    return and_(Training.id == training_id, Training.status == Status.RUNNING, Training.claim_token == token)


def heartbeat(training_id: str, token: str) -> bool:
    """Prove the worker alive; False when it no longer owns the training."""
    with session_scope() as s:
        return s.execute(update(Training).where(_owned(training_id, token)).values(heartbeat_at=_now(s))).rowcount == 1


def report_progress(training_id: str, token: str, progress: dict[str, Any]) -> None:
    """Progress (and a heartbeat); raises LostOwnership when another worker has the training."""
    with session_scope() as s:
        done = s.execute(update(Training).where(_owned(training_id, token))
                         .values(progress=dict(progress), heartbeat_at=_now(s))).rowcount
    if done != 1:
        raise LostOwnership(training_id)


def cancel_requested(training_id: str, token: str) -> bool:
    """Whether the user asked this run to stop; raises LostOwnership when it is no longer ours."""
    with session_scope() as s:
        row = s.execute(select(Training.cancel_requested, Training.status, Training.claim_token)
                        .where(Training.id == training_id)).first()
    if row is None or row.status != Status.RUNNING or row.claim_token != token:
        raise LostOwnership(training_id)
    return bool(row.cancel_requested)


def succeed(session: Session, training_id: str, token: str | None, version: int) -> None:
    """RUNNING -> SUCCEEDED with its version, in the caller's transaction (versions.create commits
    the version row and this together). Raises LostOwnership when the run is no longer the owner."""
    owned = _owned(training_id, token) if token else and_(Training.id == training_id, Training.status == Status.RUNNING)
    t = session.get(Training, training_id)
    progress = {**((t.progress if t else None) or {}), "phase": "done"}
    done = session.execute(update(Training).where(owned).values(
        status=Status.SUCCEEDED, model_version=version, finished_at=_now(session), error=None, progress=progress,
    )).rowcount
    if done != 1:
        raise LostOwnership(training_id)


def release(training_id: str, token: str) -> Status | None:
    """RUNNING (this run's claim) -> QUEUED, its message to be sent again (send): the run lost
    the database for longer than FELIS_DB_RETRY_SECONDS, which is no fault of the training (its
    next run starts over, on the features cached so far); the attempt does not count. A run asked
    to stop meanwhile is CANCELLED instead. Returns the new status; None when the run no longer
    owns the training."""
    with session_scope() as s:
        if s.execute(update(Training).where(_owned(training_id, token), Training.cancel_requested.is_not(True)).values(
                status=Status.QUEUED, claim_token=None, worker=None, attempts=Training.attempts - 1, enqueued_at=None,
                heartbeat_at=None, progress={"phase": "queued"})).rowcount == 1:
            return Status.QUEUED
    return Status.CANCELLED if cancelled(training_id, token) else None


def cancelled(training_id: str, token: str) -> bool:
    """RUNNING -> CANCELLED, when the worker stopped at the user's request."""
    with session_scope() as s:
        return s.execute(update(Training).where(_owned(training_id, token)).values(
            status=Status.CANCELLED, finished_at=_now(s),
            error={"code": "cancelled", "message": "cancelled while running"})).rowcount == 1


def fail(training_id: str, code: str, message: str, token: str | None = None) -> bool:
    """An active training -> FAILED with a reason. With a token, only if this run still owns it."""
    with session_scope() as s:
        where = _owned(training_id, token) if token else and_(Training.id == training_id, Training.status.in_(ACTIVE))
        return s.execute(update(Training).where(where).values(
            status=Status.FAILED, error={"code": code, "message": message}, finished_at=_now(s))).rowcount == 1


def retrying(fn: Callable[[], T], *, seconds: float, what: str) -> T:
    """Run a database write, retrying with backoff through a connection loss (a PostgreSQL
    failover, a restart) for up to ``seconds``, the last try at its end; then the error stands."""
    deadline = time.monotonic() + seconds
    delay = 0.2
    while True:
        try:
            return fn()
        except DBAPIError as e:
            left = deadline - time.monotonic()
            if not is_transient(e) or left <= 0:
                raise
            wait = min(delay, left)
            log.warning("%s: the database is unreachable (%s); retrying in %.1f s", what, type(e.orig).__name__, wait)
            time.sleep(wait)
            delay = min(delay * 2, 5.0)


def is_transient(e: DBAPIError) -> bool:
    """A lost or refused connection (the database restarting, failing over), not a bad statement."""
    return is_unreachable(e)


# --- shards: a training's features computed on the whole worker pool ----------------------------


def has_shards(training_id: str) -> bool:
    """Whether this training has fanned its features out before (it does so at most once)."""
    with session_scope() as s:
        return s.scalar(select(TrainingShard.id).where(TrainingShard.training_id == training_id).limit(1)) is not None


def start_extraction(training_id: str, token: str, ranges: list[tuple[str, str | None, int]]) -> list[int] | None:
    """RUNNING (this run's claim) -> EXTRACTING with one QUEUED shard per (lo, hi, images) range;
    returns the shard ids, whose messages the caller sends after this commit (send_shard), or
    None when the user asked it to stop (cancel_requested: the run records the cancel). The
    claim is released: this run's attempt does not count against MAX_ATTEMPTS. Raises
    LostOwnership when the run no longer owns the training."""
    with session_scope() as s:
        done = s.execute(update(Training).where(_owned(training_id, token), Training.cancel_requested.is_not(True)).values(
            status=Status.EXTRACTING, claim_token=None, worker=None, attempts=Training.attempts - 1,
            progress={"phase": "features"}, heartbeat_at=_now(s))).rowcount
        if done != 1:
            if s.scalar(select(Training.id).where(_owned(training_id, token))) is not None:
                return None  # still this run's, so the update missed for cancel_requested (checked in the same statement)
            raise LostOwnership(training_id)
        shards = [TrainingShard(training_id=training_id, index=i, lo=lo, hi=hi, images=n, done=0, status=ShardStatus.QUEUED,
                                attempts=0) for i, (lo, hi, n) in enumerate(ranges)]
        s.add_all(shards)
        s.flush()
        return [sh.id for sh in shards]


def send_shard(shard_id: int, enqueue: Callable[[int], None]) -> bool:
    """The shard's message, and the broker's confirmation recorded (the outbox, as for trainings)."""
    return _send(TrainingShard, shard_id, ShardStatus.QUEUED, enqueue, f"shard {shard_id}")


def _extracting():
    """The shard's training is still waiting for its features (not cancelled, failed or deleted)."""
    return TrainingShard.training_id.in_(select(Training.id).where(Training.status == Status.EXTRACTING,
                                                                   Training.cancel_requested.is_(False)))


def claim_shard(shard_id: int, worker_name: str, lease_seconds: float) -> tuple[str, TrainingShard] | None:
    """QUEUED (or RUNNING with a silent worker) -> RUNNING for this worker, while its training is
    extracting; returns (claim token, a detached copy of the row), or None (done, taken, or its
    training is no longer waiting)."""
    token = uuid.uuid4().hex
    with session_scope() as s:
        now = _now(s)
        done = s.execute(
            update(TrainingShard)
            .where(TrainingShard.id == shard_id, _extracting())
            .where(or_(TrainingShard.status == ShardStatus.QUEUED,
                       and_(TrainingShard.status == ShardStatus.RUNNING, TrainingShard.heartbeat_at < _ago(s, lease_seconds))))
            .values(status=ShardStatus.RUNNING, claim_token=token, heartbeat_at=now, done=0,
                    attempts=TrainingShard.attempts + 1, worker=worker_name[:255])
            .execution_options(synchronize_session=False)
        ).rowcount
        if done != 1:
            return None
        row = s.get(TrainingShard, shard_id)
        s.expunge(row)
    return token, row


def _shard_owned(shard_id: int, token: str):
    return and_(TrainingShard.id == shard_id, TrainingShard.status == ShardStatus.RUNNING, TrainingShard.claim_token == token)


def shard_progress(shard_id: int, token: str, done: int) -> bool:
    """Progress and a heartbeat. False when the shard should stop: another worker has it, or its
    training is no longer extracting (cancelled, failed, deleted)."""
    with session_scope() as s:
        return s.execute(update(TrainingShard).where(_shard_owned(shard_id, token), _extracting())
                         .values(done=done, heartbeat_at=_now(s)).execution_options(synchronize_session=False)).rowcount == 1


def finish_shard(shard_id: int, token: str) -> str | None:
    """RUNNING -> DONE. When it was the training's last shard, the training goes EXTRACTING ->
    QUEUED in the same transaction and its id is returned: the caller sends its message (send;
    the sweep does it if the caller dies). The training's row is locked first, so two last shards
    finishing together see each other's DONE and exactly one of them queues it."""
    with session_scope() as s:
        training_id = s.scalar(select(TrainingShard.training_id).where(TrainingShard.id == shard_id))
        if training_id is None:
            return None
        s.execute(select(Training.id).where(Training.id == training_id).with_for_update())
        if s.execute(update(TrainingShard).where(_shard_owned(shard_id, token))
                     .values(status=ShardStatus.DONE, done=TrainingShard.images, finished_at=_now(s), claim_token=None)).rowcount != 1:
            return None
        return training_id if _queue_if_extracted(s, training_id) else None


def _queue_if_extracted(s: Session, training_id: str) -> bool:
    """EXTRACTING -> QUEUED (its message to be sent) when every shard of the training is DONE."""
    left = s.scalar(select(func.count()).select_from(TrainingShard).where(
        TrainingShard.training_id == training_id, TrainingShard.status != ShardStatus.DONE)) or 0
    if left:
        return False
    return s.execute(update(Training).where(Training.id == training_id, Training.status == Status.EXTRACTING)
                     .values(status=Status.QUEUED, enqueued_at=None, progress={"phase": "queued", "features": "done"})).rowcount == 1


def fail_shard(shard_id: int, token: str, code: str, message: str) -> None:
    """The shard could not compute its features (an error, not a lost worker): it and its
    training FAILED with the reason."""
    with session_scope() as s:
        training_id = s.scalar(select(TrainingShard.training_id).where(_shard_owned(shard_id, token)))
        if training_id is None:
            return
        s.execute(update(TrainingShard).where(_shard_owned(shard_id, token)).values(
            status=ShardStatus.FAILED, finished_at=_now(s), error={"code": code, "message": message}))
        if s.execute(update(Training).where(Training.id == training_id, Training.status == Status.EXTRACTING).values(
                status=Status.FAILED, finished_at=_now(s), error={"code": code, "message": message})).rowcount:
            _stop_shards(s, [training_id])


def _stop_shards(s: Session, training_ids: list[str] | Select) -> None:
    """The unfinished shards of trainings that ended (cancelled, failed): STOPPED, their claims
    dropped. A worker still computing one sees it at its next check and stops."""
    s.execute(update(TrainingShard).where(TrainingShard.training_id.in_(training_ids),
                                          TrainingShard.status.in_((ShardStatus.QUEUED, ShardStatus.RUNNING)))
              .values(status=ShardStatus.STOPPED, claim_token=None, finished_at=_now(s))
              .execution_options(synchronize_session=False))


def _sweep_shards(s: Session, settings: Settings, unsent_grace_s: float, redeliver_s: float) -> tuple[dict[str, int], list[int], list[str]]:
    """Shards of extracting trainings: a silent RUNNING one QUEUED again (or, past MAX_ATTEMPTS,
    its training FAILED worker_lost); QUEUED ones never confirmed sent, or sent long ago, to send;
    trainings whose shards are all DONE but still EXTRACTING (a safety net) QUEUED."""
    counts = {"shards_requeued": 0, "shards_failed": 0}
    lease = settings.training_lease_seconds
    waiting = select(Training.id).where(Training.status == Status.EXTRACTING)
    silent = and_(TrainingShard.status == ShardStatus.RUNNING, TrainingShard.training_id.in_(waiting),
                  or_(TrainingShard.heartbeat_at.is_(None), TrainingShard.heartbeat_at < _ago(s, lease)))
    for sh in s.execute(select(TrainingShard.id, TrainingShard.training_id, TrainingShard.attempts, TrainingShard.claim_token)
                        .where(silent)).all():
        guard = and_(TrainingShard.id == sh.id, silent, TrainingShard.claim_token.is_not_distinct_from(sh.claim_token))
        if sh.attempts >= MAX_ATTEMPTS:
            message = f"the worker computing shard {sh.id}'s features stopped responding {sh.attempts} times"
            if s.execute(update(TrainingShard).where(guard).values(status=ShardStatus.FAILED, finished_at=_now(s),
                         error={"code": "worker_lost", "message": message}).execution_options(synchronize_session=False)).rowcount:
                if s.execute(update(Training).where(Training.id == sh.training_id, Training.status == Status.EXTRACTING)
                             .values(status=Status.FAILED, finished_at=_now(s), error={"code": "worker_lost", "message": message})).rowcount:
                    _stop_shards(s, [sh.training_id])
                counts["shards_failed"] += 1
        else:
            counts["shards_requeued"] += s.execute(update(TrainingShard).where(guard).values(
                status=ShardStatus.QUEUED, claim_token=None, enqueued_at=None).execution_options(synchronize_session=False)).rowcount
    unsent = list(s.scalars(select(TrainingShard.id).where(
        TrainingShard.status == ShardStatus.QUEUED, TrainingShard.training_id.in_(waiting),
        or_(and_(TrainingShard.enqueued_at.is_(None), TrainingShard.created_at < _ago(s, unsent_grace_s)),
            and_(TrainingShard.enqueued_at.is_(None), TrainingShard.attempts > 0),
            TrainingShard.enqueued_at < _ago(s, redeliver_s)))))
    extracted = []
    for training_id in s.scalars(waiting.where(~Training.id.in_(
            select(TrainingShard.training_id).where(TrainingShard.status != ShardStatus.DONE)))).all():
        if _queue_if_extracted(s, training_id):
            extracted.append(training_id)
    return counts, unsent, extracted


# --- the sweep (every worker runs it periodically) -----------------------------------------------


def sweep(settings: Settings, enqueue: Callable[[str], None], *, unsent_grace_s: float = 5.0,
          enqueue_shard: Callable[[int], None] | None = None, queue_empty: Callable[[], bool] | None = None) -> dict[str, int]:
    """Settle what a dead worker, a dead API or a down broker left behind; returns counts.
    enqueue_shard: how shard messages are sent (None: shards are not swept). queue_empty: whether
    the broker's queue holds no message now (None: unknown); when it does not, whatever was sent
    more than training_lost_after_seconds ago and is still unclaimed lost its message and is sent
    again (a message delivered meanwhile finds its training claimed and does nothing)."""
    counts = {"requeued": 0, "failed": 0, "cancelled": 0, "sent": 0}
    redeliver = settings.training_redeliver_after_seconds
    if queue_empty is not None and settings.training_lost_after_seconds < redeliver:
        try:
            if queue_empty():
                redeliver = settings.training_lost_after_seconds
        except Exception:  # noqa: BLE001 -- the broker unreachable: the next sweep looks again
            log.debug("sweep: the queue's depth is unknown", exc_info=True)
    lease = settings.training_lease_seconds
    requeued: list[str] = []
    with session_scope() as s:
        silent = and_(Training.status == Status.RUNNING,
                      or_(Training.heartbeat_at.is_(None), Training.heartbeat_at < _ago(s, lease)))
        stale = s.execute(select(Training.id, Training.attempts, Training.cancel_requested, Training.claim_token)
                          .where(silent)).all()
        for t in stale:
            if t.cancel_requested:
                values = {"status": Status.CANCELLED, "finished_at": _now(s),
                          "error": {"code": "cancelled", "message": "cancelled; its worker stopped responding"}}
                key = "cancelled"
            elif t.attempts >= MAX_ATTEMPTS:
                values = {"status": Status.FAILED, "finished_at": _now(s),
                          "error": {"code": "worker_lost", "message": f"the worker stopped responding {t.attempts} times"}}
                key = "failed"
            else:
                values = {"status": Status.QUEUED, "claim_token": None, "enqueued_at": None, "worker": None,
                          "progress": {"phase": "queued", "requeued": "its worker stopped responding"}}
                key = "requeued"
            # guarded by the token the dead run held, so two sweepers never both act on one training
            done = s.execute(update(Training).where(Training.id == t.id, silent,
                                                    Training.claim_token.is_not_distinct_from(t.claim_token))
                             .values(**values)).rowcount
            counts[key] += done
            if done and key == "requeued":
                requeued.append(t.id)
        # the outbox: queued, never confirmed sent (after a short grace for the API's own send), or
        # sent long ago and never claimed (a message the broker lost)
        unsent = s.scalars(select(Training.id).where(
            Training.status == Status.QUEUED, Training.cancel_requested.is_(False),
            or_(and_(Training.enqueued_at.is_(None), Training.created_at < _ago(s, unsent_grace_s)),
                Training.enqueued_at < _ago(s, redeliver)),
        )).all()
        shard_counts, shards, extracted = _sweep_shards(s, settings, unsent_grace_s, redeliver) if enqueue_shard else ({}, [], [])
    counts.update(shard_counts)
    for training_id in dict.fromkeys([*requeued, *extracted, *unsent]):
        if send(training_id, enqueue):
            counts["sent"] += 1
        else:
            break  # the broker is down: the next sweep tries again
    for shard_id in shards:
        if send_shard(shard_id, enqueue_shard):
            counts["shards_sent"] = counts.get("shards_sent", 0) + 1
        else:
            break
    if any(counts.values()):
        log.info("training sweep: %s", counts)
    return counts
