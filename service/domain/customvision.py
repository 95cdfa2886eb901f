"""Custom Vision's nouns on felis's: the one writer of the cv_* rows (service/store/tables.py).

    project    = a dataset (cv_projects: a dashed UUID and the app's free-text name; the dataset's name is a slug of it)
    tag        = a label of that dataset (cv_tags: a UUID, the free-text name, the label: a slug of it)
    iteration  = a training of the dataset, and the model version it made (cv_iterations)
    publish    = a named alias of that version (cv_publish_aliases), which /v1 predict takes as ?alias=

Names are free text; felis's names are slugs (datasets.NAME_RE, uploads.LABEL_RE), made here from
them, with a suffix (-2, -3, ...) when a slug is taken. Image ids are the images' own, dashed
(uuid.UUID(hex)); iteration ids are their own UUIDs. Everything else (uploads, training, versions,
deleting a dataset) goes through the modules that own it. Only multiclass classification is offered.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.config import Settings
from service.domain import cleanup, datasets, publish_names, trainings, uploads, versions
from service.domain.trainings import Status
from service.errors import AlreadyExists, Conflict, InvalidRequest, NotFound
from service.store.blobs import BlobStore
from service.store.tables import (
    CvIteration,
    CvProject,
    CvPublishAlias,
    CvTag,
    Dataset,
    Image,
    ModelVersion,
    Training,
    utcnow,
)

# Custom Vision's image classification domains (its documented ids); every one trains felis's default
# (EfficientNet-Lite0). Compact (exportable) and object detection domains are not offered.
DOMAINS: dict[str, str] = {
    "ee85a74c-405e-4adc-bb47-ffa8ca0c9f31": "General",
    "a8e3c40f-fb4a-466f-832a-5e457ae4a344": "General [A1]",
    "2e37d7fb-3a54-486a-b4d6-cfc369af0018": "General [A2]",
    "c151d5b5-dd07-472a-acc8-15d29dea8518": "Food",
    "ca455789-012d-4b50-9fec-5bb63841c793": "Landmarks",
    "b30a91ae-e3c1-4f73-a81e-c270bff27c39": "Retail",
}
DEFAULT_DOMAIN = "ee85a74c-405e-4adc-bb47-ffa8ca0c9f31"
MULTICLASS = "Multiclass"
MAX_NAME = 255
_STATUS = {Status.QUEUED: "Training", Status.RUNNING: "Training", Status.EXTRACTING: "Training", Status.SUCCEEDED: "Completed",
           Status.FAILED: "Failed", Status.CANCELLED: "Failed"}


def dashed(hex_id: str) -> str:
    return str(uuid.UUID(hex=hex_id))


def _undashed(cv_id: str) -> str | None:
    try:
        return uuid.UUID(cv_id).hex
    except (ValueError, AttributeError, TypeError):
        return None


def _new_id() -> str:
    return str(uuid.uuid4())


def _text(value: str | None, what: str, *, required: bool = False) -> str:
    value = (value or "").strip()
    if required and not value:
        raise InvalidRequest(f"a {what} is required", code=f"invalid_{what.replace(' ', '_')}")
    if len(value) > MAX_NAME:
        raise InvalidRequest(f"the {what} is over {MAX_NAME} characters", code=f"invalid_{what.replace(' ', '_')}")
    return value


def slug(name: str, *, lower: bool, limit: int = 60) -> str:
    """'Japanese Cherry' -> 'Japanese_Cherry' (a label) or 'japanese-cherry' (a dataset name)."""
    text = name.lower() if lower else name
    text = re.sub(r"[^a-z0-9_-]+" if lower else r"[^A-Za-z0-9_.-]+", "-" if lower else "_", text)
    text = re.sub(r"^[^A-Za-z0-9]+", "", text)[:limit].rstrip("-_.")
    return text or ("project" if lower else "tag")


def _candidates(base: str) -> Iterable[str]:
    yield base
    for n in range(2, 1000):
        yield f"{base}-{n}"


# --- projects ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProjectRef:
    project: CvProject
    dataset: Dataset


def create_project(session: Session, name: str, *, description: str | None = None, domain_id: str | None = None,
                   classification_type: str | None = None) -> ProjectRef:
    """A project and its dataset (named after a slug of ``name``, suffixed when taken). The caller commits."""
    name = _text(name, "project name", required=True)
    domain = (domain_id or DEFAULT_DOMAIN).lower()
    if domain not in DOMAINS:
        raise InvalidRequest(f"unknown domain {domain_id!r}: one of the image classification domains GET /domains lists",
                             code="unknown_domain")
    kind = (classification_type or MULTICLASS).capitalize()
    if kind == "Multilabel":
        raise InvalidRequest("multilabel projects are not supported by felis: create a Multiclass project (one tag per "
                             "image)", code="multilabel_unsupported")
    if kind != MULTICLASS:
        raise InvalidRequest(f"unknown classification type {classification_type!r}", code="unknown_classification")
    for candidate in _candidates(slug(name, lower=True)):
        try:  # a taken name is refused before anything is added (a lost race rolls back the session: nothing else is in it)
            dataset = datasets.create(session, candidate)
        except AlreadyExists:
            continue
        break
    else:
        raise Conflict(f"no free dataset name for project {name!r}", code="project_name_taken")
    project = CvProject(id=_new_id(), dataset_id=dataset.id, name=name, description=_text(description, "description"),
                        domain_id=domain, classification_type=MULTICLASS)
    session.add(project)
    session.flush()
    return ProjectRef(project, dataset)


def _visible(dataset: Dataset, visible: Mapping[str, int] | None) -> bool:
    return visible is None or dataset.id in visible.values()


def get_project(session: Session, project_id: str, visible: Mapping[str, int] | None = None, *,
                for_update: bool = False) -> ProjectRef:
    """A live project a caller may see (``visible``: a limited key's datasets, name -> id; None: all)."""
    row = session.execute(select(CvProject, Dataset).join(Dataset, Dataset.id == CvProject.dataset_id)
                          .where(CvProject.id == str(project_id).lower(), Dataset.deleted_at.is_(None))).first()
    if row is None or not _visible(row.Dataset, visible):
        raise NotFound(f"project {project_id!r} does not exist", code="project_not_found")
    if for_update:
        datasets.get(session, row.Dataset.name, for_update=True)
    return ProjectRef(row.CvProject, row.Dataset)


def list_projects(session: Session, visible: Mapping[str, int] | None = None) -> list[ProjectRef]:
    rows = session.execute(select(CvProject, Dataset).join(Dataset, Dataset.id == CvProject.dataset_id)
                           .where(Dataset.deleted_at.is_(None)).order_by(CvProject.created_at)).all()
    return [ProjectRef(r.CvProject, r.Dataset) for r in rows if _visible(r.Dataset, visible)]


def delete_project(session: Session, ref: ProjectRef) -> None:
    """Its mapping rows, and its dataset marked deleted (removed in the background, as DELETE
    /v1/datasets/{name} does), in one commit."""
    publish_names.drop_for_dataset(session, ref.dataset.id)
    session.execute(delete(CvIteration).where(CvIteration.project_id == ref.project.id))
    session.execute(delete(CvTag).where(CvTag.project_id == ref.project.id))
    session.execute(delete(CvProject).where(CvProject.id == ref.project.id))
    cleanup.delete_dataset(session, ref.dataset.name)  # commits


# --- tags ----------------------------------------------------------------------------------


def create_tag(session: Session, ref: ProjectRef, name: str, *, description: str | None = None,
               kind: str | None = None) -> CvTag:
    """A tag: a label of the project's dataset, before any image carries it. The caller commits."""
    name = _text(name, "tag name", required=True)
    if kind not in (None, "", "Regular"):
        raise InvalidRequest(f"tag type {kind!r} is not supported: only Regular tags", code="tag_type_unsupported")
    if session.scalar(select(CvTag.id).where(CvTag.project_id == ref.project.id, CvTag.name == name)):
        raise AlreadyExists(f"the project already has a tag named {name!r}", code="tag_exists")
    taken = set(session.scalars(select(CvTag.label).where(CvTag.project_id == ref.project.id)))
    label = next(c for c in _candidates(slug(name, lower=False)) if c not in taken)
    tag = CvTag(id=_new_id(), project_id=ref.project.id, name=name, label=uploads.validate_label(label),
                description=_text(description, "description"))
    session.add(tag)
    try:
        session.flush()
    except IntegrityError as e:
        session.rollback()
        raise AlreadyExists(f"the project already has a tag named {name!r}", code="tag_exists") from e
    return tag


def tags_of(session: Session, ref: ProjectRef) -> list[CvTag]:
    return list(session.scalars(select(CvTag).where(CvTag.project_id == ref.project.id).order_by(CvTag.created_at)))


def image_counts(session: Session, ref: ProjectRef) -> dict[str, int]:
    """Images per label of the project's dataset (a tag's image count is its label's)."""
    return datasets.label_counts(session, ref.dataset)


def _tags_by_id(session: Session, ref: ProjectRef) -> dict[str, CvTag]:
    return {t.id: t for t in tags_of(session, ref)}


# --- images --------------------------------------------------------------------------------


@dataclass
class NewImage:
    """One image of a create-images request: its bytes in a file (read by uploads.ingest, within
    the limits), or why it was refused while the body was read (a Custom Vision status)."""

    name: str
    tag_ids: list[str]
    file: Any = None  # a binary file at any position; None when refused
    status: str | None = None  # set: refused before ingest (ErrorImageSize, ...)


_REASON_STATUS = {"file_too_large": "ErrorImageSize", "empty_file": "ErrorImageSize",
                  "image_too_large": "ErrorImageDimensions", "image_too_small": "ErrorImageDimensions"}


def add_images(session: Session, store: BlobStore, ref: ProjectRef, images: list[NewImage], batch_tag_ids: list[str],
               settings: Settings) -> tuple[list[dict[str, Any]], dict[str, Image]]:
    """Store the images with their tag's label (multiclass: exactly one tag each) through
    uploads.ingest, all or nothing as every upload. Returns one result per image, in order
    ({"sourceUrl", "status", "imageId"}), and the stored rows by id."""
    tags = _tags_by_id(session, ref)
    results: list[dict[str, Any]] = []
    candidates: list[tuple[int, uploads.Candidate]] = []
    for index, image in enumerate(images):
        result: dict[str, Any] = {"sourceUrl": image.name, "status": image.status, "imageId": None}
        results.append(result)
        if image.status:
            continue
        wanted = list(dict.fromkeys(str(t).lower() for t in [*image.tag_ids, *batch_tag_ids]))
        if len(wanted) > 1:
            result["status"] = "ErrorTagLimitExceed"  # a multiclass project: one tag per image
        elif not wanted or wanted[0] not in tags:
            result["status"] = "ErrorInvalidTag"  # felis stores no untagged image; or not this project's tag
        else:
            candidates.append((index, uploads.Candidate(filename=image.name or f"image-{index}",
                                                        label=tags[wanted[0]].label,
                                                        read=uploads.file_reader(image.file, settings))))
    rows: dict[str, Image] = {}
    if candidates:
        report = uploads.ingest(session, store, ref.dataset, [c for _, c in candidates], settings)
        for (index, _), r in zip(candidates, report.results):
            if r["status"] == "rejected":
                results[index]["status"] = _REASON_STATUS.get(r["reason"], "ErrorImageFormat")
            else:
                results[index] |= {"status": "OK" if r["status"] == "created" else "OKDuplicate", "imageId": r["image_id"]}
        ids = [r["imageId"] for r in results if r["imageId"]]
        rows = {i.id: i for i in session.scalars(select(Image).where(Image.id.in_(ids)))} if ids else {}
        project = session.get(CvProject, ref.project.id)
        if project is not None:
            project.last_modified = utcnow()
        session.commit()
    return results, rows


def tagged_images(session: Session, ref: ProjectRef, *, tag_ids: list[str] | None, newest_first: bool = True,
                  take: int = 50, skip: int = 0) -> list[tuple[Image, CvTag]]:
    """The project's images whose label is one of its tags (those of ``tag_ids`` when given), each with its tag."""
    tags = {t.label: t for t in tags_of(session, ref)}
    if tag_ids:
        wanted = {str(t).lower() for t in tag_ids}
        tags = {label: t for label, t in tags.items() if t.id in wanted}
    if not tags:
        return []
    order = (Image.created_at.desc(), Image.id.desc()) if newest_first else (Image.created_at, Image.id)
    rows = session.scalars(select(Image).where(Image.dataset_id == ref.dataset.id, Image.label.in_(list(tags)))
                           .order_by(*order).limit(take).offset(skip))
    return [(image, tags[image.label]) for image in rows]


def image_for_content(session: Session, image_id: str) -> Image:
    """An image of a live dataset by its (dashed or plain) id, for a signed content URL."""
    hex_id = _undashed(image_id)
    image = session.scalar(select(Image).join(Dataset, Dataset.id == Image.dataset_id)
                           .where(Image.id == hex_id, Dataset.deleted_at.is_(None))) if hex_id else None
    if image is None:
        raise NotFound(f"image {image_id!r} does not exist", code="image_not_found")
    return image


# --- iterations ----------------------------------------------------------------------------


def train(session: Session, ref: ProjectRef, settings: Settings, *, request_id: str | None = None,
          key_id: str | None = None) -> tuple[CvIteration, Training]:
    """A training of the project's dataset with felis's defaults (trainings.request: validated,
    queued, capped), as a new iteration. The caller commits, then sends (trainings.send)."""
    training = trainings.request(session, ref.dataset.name, {}, settings, request_id=request_id, key_id=key_id)
    number = (session.scalar(select(func.count()).select_from(CvIteration)
                             .where(CvIteration.project_id == ref.project.id)) or 0) + 1
    iteration = CvIteration(id=_new_id(), project_id=ref.project.id, training_id=training.id, name=f"Iteration {number}")
    session.add(iteration)
    session.flush()
    return iteration, training


def get_iteration(session: Session, ref: ProjectRef, iteration_id: str) -> CvIteration:
    row = session.scalar(select(CvIteration).where(CvIteration.id == str(iteration_id).lower(),
                                                   CvIteration.project_id == ref.project.id))
    if row is None:
        raise NotFound(f"iteration {iteration_id!r} does not exist in this project", code="iteration_not_found")
    return row


def iterations_of(session: Session, ref: ProjectRef) -> list[CvIteration]:
    return list(session.scalars(select(CvIteration).where(CvIteration.project_id == ref.project.id)
                                .order_by(CvIteration.created_at)))


def _version_of(session: Session, ref: ProjectRef, training: Training | None) -> ModelVersion | None:
    if training is None or training.model_version is None:
        return None
    return session.scalar(select(ModelVersion).where(ModelVersion.dataset_id == ref.dataset.id,
                                                     ModelVersion.version == training.model_version))


@dataclass(frozen=True)
class IterationState:
    """What an iteration is now, in Custom Vision's words: its status (Training, Completed or Failed,
    from its training's), and the training, version and publish name behind it."""

    status: str
    training: Training | None
    version: int | None
    publish_name: str | None
    prediction_id: str | None

    @property
    def error(self) -> str | None:
        return (self.training.error or {}).get("message") if self.training and self.status == "Failed" else None


def iteration_state(session: Session, ref: ProjectRef, iteration: CvIteration) -> IterationState:
    training = session.get(Training, iteration.training_id)
    status = _STATUS.get(training.status, "Failed") if training else "Failed"
    if status == "Completed" and _version_of(session, ref, training) is None:
        status = "Failed"  # its version was deleted through /v1
    alias = session.scalar(select(CvPublishAlias).where(CvPublishAlias.iteration_id == iteration.id))
    return IterationState(status, training, training.model_version if training else None,
                          alias.name if alias else None, alias.prediction_id if alias else None)


def _completed_version(session: Session, ref: ProjectRef, iteration: CvIteration) -> ModelVersion:
    version = _version_of(session, ref, session.get(Training, iteration.training_id))
    if version is None:
        raise Conflict(f"iteration {iteration.id} has not completed training", code="iteration_not_completed")
    return version


@dataclass(frozen=True)
class TagPerformance:
    tag_id: str | None  # None: a label of the version that no tag names any more
    name: str
    precision: float
    recall: float
    average_precision: float
    support: int  # validation images of the label


@dataclass(frozen=True)
class Performance:
    per_tag: list[TagPerformance]
    precision: float
    recall: float
    average_precision: float


def performance(session: Session, ref: ProjectRef, iteration: CvIteration, threshold: float = 0.5) -> Performance:
    """Precision and recall at ``threshold`` and average precision, per tag and over all (weighted by
    each tag's validation images), from the version's validation evaluation."""
    if not 0.0 <= threshold <= 1.0:
        raise InvalidRequest("threshold must be within [0, 1]", code="invalid_threshold")
    evaluation = _completed_version(session, ref, iteration).evaluation or {}
    per_label, curves = evaluation.get("per_label") or {}, evaluation.get("threshold_curve") or {}
    tags = {t.label: t for t in tags_of(session, ref)}
    per_tag = []
    for label, stats in per_label.items():
        curve = curves.get(label) or []
        point = min(curve, key=lambda c: abs(c["threshold"] - threshold)) if curve else {}
        precision = point.get("precision")
        tag = tags.get(label)
        per_tag.append(TagPerformance(tag.id if tag else None, tag.name if tag else label,
                                      float(precision if precision is not None else 1.0),
                                      float(point.get("recall", 0.0)), _average_precision(curve),
                                      int(stats.get("support", 0))))
    total = sum(t.support for t in per_tag) or 1

    def mean(key: str) -> float:
        return float(sum(getattr(t, key) * t.support for t in per_tag) / total) if per_tag else 0.0

    return Performance(per_tag, mean("precision"), mean("recall"), mean("average_precision"))


def _average_precision(curve: list[dict]) -> float:
    """The area under the precision-recall steps of a threshold curve: each rise in recall times
    the precision where recall first reaches it, the highest threshold's, which is the best
    precision of the points at that recall (lower thresholds only add false positives)."""
    best: dict[float, float] = {}
    for c in curve:
        if c.get("precision") is not None:
            best[c["recall"]] = max(best.get(c["recall"], 0.0), c["precision"])
    area, last_recall = 0.0, 0.0
    for recall in sorted(best):  # recall rising
        area += (recall - last_recall) * best[recall]
        last_recall = recall
    return float(min(max(area, 0.0), 1.0))


def publish(session: Session, ref: ProjectRef, iteration: CvIteration, name: str, prediction_id: str | None,
            *, overwrite: bool = False) -> CvPublishAlias:
    """The publish name as an alias of the iteration's version; commits. A name another iteration
    holds is refused unless ``overwrite``; an iteration has one publish name (a new one replaces it)."""
    name = _text(name, "publish name", required=True)
    version = _completed_version(session, ref, iteration)
    datasets.get(session, ref.dataset.name, for_update=True)  # publishes of one dataset, one at a time
    held = session.get(CvPublishAlias, (ref.dataset.id, name))
    if held is not None and held.iteration_id != iteration.id and not overwrite:
        raise AlreadyExists(f"the publish name {name!r} is taken by another iteration", code="publish_name_taken")
    alias = publish_names.replace(session, ref.dataset.id, name, version.version, iteration.id, prediction_id or "")
    iteration.last_modified = utcnow()
    session.commit()
    return alias


def unpublish(session: Session, ref: ProjectRef, iteration: CvIteration) -> None:
    if not publish_names.drop_for_iteration(session, iteration.id):
        raise Conflict(f"iteration {iteration.id} is not published", code="iteration_not_published")
    iteration.last_modified = utcnow()
    session.commit()


def delete_iteration(session: Session, store: BlobStore, ref: ProjectRef, iteration: CvIteration) -> None:
    """The iteration and its version (versions.delete, forced: it may be the default). Refused while
    it trains or is published, as Custom Vision refuses."""
    if session.scalar(select(CvPublishAlias.name).where(CvPublishAlias.iteration_id == iteration.id)):
        raise Conflict(f"iteration {iteration.id} is published: unpublish it first", code="iteration_published")
    training = session.get(Training, iteration.training_id)
    if training is not None and training.status in trainings.ACTIVE:
        raise Conflict(f"iteration {iteration.id} is still training", code="training_active")
    version = _version_of(session, ref, training)
    session.delete(iteration)
    session.flush()
    if version is not None:
        versions.delete(session, store, ref.dataset.name, version.version, force=True)  # commits both
    else:
        session.commit()


# --- predicting ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PredictionTarget:
    dataset: str  # the dataset's name
    version: int
    iteration_id: str
    tags: dict[str, tuple[str, str]]  # label -> (tag id, tag name)


def prediction_target(session: Session, project_id: str, publish_name: str,
                      visible: Mapping[str, int] | None = None) -> PredictionTarget:
    """What a classify request names: the project's dataset, the version its publish name aliases, its tags."""
    ref = get_project(session, project_id, visible)
    alias = session.get(CvPublishAlias, (ref.dataset.id, publish_name))
    if alias is None:
        raise NotFound(f"project {project_id!r} has no iteration published as {publish_name!r}",
                       code="publish_name_not_found")
    tags = {t.label: (t.id, t.name) for t in tags_of(session, ref)}
    return PredictionTarget(ref.dataset.name, alias.version, alias.iteration_id, tags)


def alias_version(conn: Connection, dataset_name: str, alias: str) -> int:
    """The version a publish name aliases (/v1 predict's ?alias=), in one small Core query."""
    version = conn.execute(select(CvPublishAlias.version).join(Dataset, Dataset.id == CvPublishAlias.dataset_id)
                           .where(Dataset.name == dataset_name, Dataset.deleted_at.is_(None),
                                  CvPublishAlias.name == alias)).scalar()
    if version is None:
        raise NotFound(f"dataset {dataset_name!r} has no version published as {alias!r}", code="alias_not_found")
    return int(version)
