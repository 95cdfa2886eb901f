"""The metadata rows. Each table has one module that writes it: service.domain.datasets (Dataset),
service.domain.uploads and .images (Image), service.domain.trainings (Training, TrainingShard),
service.domain.versions (ModelVersion), service.domain.suggestions (Suggestion), service.domain.keys (ApiKey,
ApiKeyDataset), service.domain.uploads (ImageStage; BlobOrphan, which service.domain.cleanup empties as it collects), service.domain.customvision
(CvProject, CvTag, CvIteration, CvPublishAlias: the Custom Vision ids mapped onto datasets, labels, trainings)."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class Base(DeclarativeBase):
    pass


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """A timestamp that always comes back timezone-aware UTC (SQLite stores it without a zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        return value.astimezone(timezone.utc) if value is not None and value.tzinfo else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        return value.replace(tzinfo=timezone.utc) if value is not None and value.tzinfo is None else value


def new_id() -> str:
    return uuid.uuid4().hex


class Dataset(Base):
    __tablename__ = "datasets"
    # a deleted dataset frees its name at once (a new one gets a new id) while its rows are removed
    __table_args__ = (Index("uq_datasets_live_name", "name", unique=True,
                            sqlite_where=text("deleted_at IS NULL"), postgresql_where=text("deleted_at IS NULL")),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    default_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # numbers are never reused
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)  # set: being removed


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("dataset_id", "sha256", name="uq_image_dataset_sha"),
                      Index("ix_images_dataset_created", "dataset_id", "created_at", "id"),  # pages: service.domain.paging
                      Index("ix_images_dataset_label", "dataset_id", "label"))  # label counts, read from the index alone

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)  # blob key: the content's hash
    label: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)  # None: unlabeled (trainings skip it)
    filename: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(16))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    phash: Mapped[str] = mapped_column(String(16))  # perceptual hash, for near-duplicates
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Training(Base):
    __tablename__ = "trainings"
    __table_args__ = (Index("ix_trainings_dataset_created", "dataset_id", "created_at", "id"),)  # pages, newest first

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)  # service.domain.trainings.Status
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    model_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    claim_token: Mapped[str | None] = mapped_column(String(32), nullable=True)  # the running claim's owner
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)  # message confirmed sent
    request_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # the API key that requested it (api_keys.id; no foreign key: a training outlives its key's row),
    # for the cap on unfinished trainings per key; None: requested without a key, or imported
    key_id: Mapped[str | None] = mapped_column(String(16), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class TrainingShard(Base):
    """One range of a training's images whose features a worker computes (fan-out over the pool):
    the images of the training's dataset with lo <= sha256 < hi (hi None: no upper end). Written by
    service.domain.trainings only; removed with its training."""

    __tablename__ = "training_shards"
    __table_args__ = (UniqueConstraint("training_id", "index", name="uq_shard_training_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    training_id: Mapped[str] = mapped_column(ForeignKey("trainings.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    lo: Mapped[str] = mapped_column(String(64))
    hi: Mapped[str | None] = mapped_column(String(64), nullable=True)
    images: Mapped[int] = mapped_column(Integer)  # features missing in the range when it was planned
    done: Mapped[int] = mapped_column(Integer, default=0)  # of them, computed so far by the running attempt
    status: Mapped[str] = mapped_column(String(16), index=True)  # service.domain.trainings.ShardStatus
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    claim_token: Mapped[str | None] = mapped_column(String(32), nullable=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)  # message confirmed sent
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("dataset_id", "version", name="uq_version_dataset_number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    training_id: Mapped[str] = mapped_column(String(32), unique=True)  # one version per training, ever
    architecture: Mapped[str] = mapped_column(String(64))
    labels: Mapped[list[str]] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    evaluation: Mapped[dict[str, Any]] = mapped_column(JSON)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    snapshot: Mapped[dict[str, Any]] = mapped_column(JSON)  # image count, label counts, hash of (id, sha)
    thresholds: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)  # label -> decision threshold
    # the open-set calibration (pipeline.ood_calibration, from the checkpoint): method, threshold, flagged_fraction,
    # quantiles, index_vectors, n_train; NULL for versions without an index (made before issue 15)
    ood: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    checkpoint_key: Mapped[str] = mapped_column(String(255))
    onnx_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # the held-out predictions of the training's images and its label-error report (models/label_issues.py):
    # one blob (blobs.heldout_key); NULL for versions without one (fine-tuned, imported, made before issue 15)
    heldout_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    label_issue_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Suggestion(Base):
    """The label a version suggests for an unlabeled image (service.domain.suggestions; computed by
    the worker: service.domain.suggesting)."""

    __tablename__ = "suggestions"
    __table_args__ = (Index("ix_suggestions_dataset_version_probability", "dataset_id", "version", "probability"),)

    image_id: Mapped[str] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    label: Mapped[str] = mapped_column(String(64))
    probability: Mapped[float] = mapped_column(Float)
    ood_score: Mapped[float | None] = mapped_column(Float, nullable=True)  # ood when above the version's threshold as it is now
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    scopes: Mapped[list[str]] = mapped_column(JSON)
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    # true: the key sees only the datasets in api_key_datasets (none, once they are all removed)
    limited: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")


class ApiKeyDataset(Base):
    """The datasets a limited key may see, by id: a dataset made again under the same name is
    another one. Removing a dataset's row removes its entries."""

    __tablename__ = "api_key_datasets"

    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True,
                                            index=True)


class ImageStage(Base):
    """The accepted files of an upload in progress, staged chunk by chunk under its upload id:
    no reader sees them. One short transaction at the end publishes them into images (the id
    becomes the image's), or the request's failure drops them; the workers' sweep drops those of
    a dead upload (service.domain.cleanup.collect). A staged row keeps its blob from collection."""

    __tablename__ = "image_stage"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)  # the image id to be
    upload_id: Mapped[str] = mapped_column(String(32), index=True)
    dataset_id: Mapped[int] = mapped_column(Integer)  # no foreign key: a purged dataset leaves it to the sweep
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    label: Mapped[str | None] = mapped_column(String(64), nullable=True)
    filename: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(16))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    phash: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)  # staged at; the image's created_at


class BlobOrphan(Base):
    """Blobs that may have lost their last reference (an image or a version deleted, an upload
    dropped), recorded in the transaction that dropped it, and since when. The collection
    (service.domain.cleanup.collect) deletes each one still unreferenced after the grace period;
    staging a file of the same bytes takes its blob off this list."""

    __tablename__ = "blob_orphans"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)  # service.store.blobs key
    since: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


# --- Custom Vision compatibility (service.domain.customvision, service.api.customvision) --------------


class CvProject(Base):
    """A Custom Vision project: one dataset, under a dashed UUID, with the app's free-text name."""

    __tablename__ = "cv_projects"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # dashed UUID, as Custom Vision's
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), unique=True)
    name: Mapped[str] = mapped_column(String(255))  # free text ("Japanese Cherry"); the dataset's name is a slug of it
    description: Mapped[str] = mapped_column(String(1024), default="")
    domain_id: Mapped[str] = mapped_column(String(36))
    classification_type: Mapped[str] = mapped_column(String(16))  # Multiclass
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_modified: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class CvTag(Base):
    """A Custom Vision tag: a label of its project's dataset (a slug of the free-text name). It
    exists before any image carries it."""

    __tablename__ = "cv_tags"
    __table_args__ = (UniqueConstraint("project_id", "label", name="uq_cv_tag_label"),
                      UniqueConstraint("project_id", "name", name="uq_cv_tag_name"))

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("cv_projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    label: Mapped[str] = mapped_column(String(64))  # the felis label (uploads.LABEL_RE)
    description: Mapped[str] = mapped_column(String(1024), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class CvIteration(Base):
    """A Custom Vision iteration: one training of the project's dataset (and the version it made)."""

    __tablename__ = "cv_iterations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("cv_projects.id", ondelete="CASCADE"), index=True)
    training_id: Mapped[str] = mapped_column(String(32), unique=True)  # trainings.id (no foreign key: purged apart)
    name: Mapped[str] = mapped_column(String(255))  # "Iteration 1"
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_modified: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class CvPublishAlias(Base):
    """A publish name: a named alias of one model version of a dataset, set by publishing an
    iteration; /v1 predict takes it as ?alias=. One per iteration, one version per name."""

    __tablename__ = "cv_publish_aliases"

    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)  # model_versions.version of the dataset
    iteration_id: Mapped[str] = mapped_column(ForeignKey("cv_iterations.id", ondelete="CASCADE"), unique=True)
    prediction_id: Mapped[str] = mapped_column(String(1024), default="")  # the prediction resource id the app gave
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
