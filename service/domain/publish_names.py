"""Publish names (Custom Vision's): the rows that say which model version a name serves, and every
change made to them. Custom Vision's publish and unpublish (service.domain.customvision) and the
deletion of a version (service.domain.versions) both change them here, so that a version never goes
while a name still serves it."""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from service.store.tables import CvPublishAlias


def for_version(session: Session, dataset_id: int, version: int) -> list[str]:
    """The publish names that serve this version of the dataset (none for most)."""
    return list(session.scalars(select(CvPublishAlias.name).where(CvPublishAlias.dataset_id == dataset_id,
                                                                  CvPublishAlias.version == version)
                                .order_by(CvPublishAlias.name)))


def replace(session: Session, dataset_id: int, name: str, version: int, iteration_id: str,
            prediction_id: str) -> CvPublishAlias:
    """`name` now serves `version` for `iteration_id`, in place of whatever the name or the iteration
    had (one name an iteration, one version a name); the caller commits."""
    session.execute(delete(CvPublishAlias).where(CvPublishAlias.dataset_id == dataset_id,
                                                 (CvPublishAlias.name == name) | (CvPublishAlias.iteration_id == iteration_id)))
    alias = CvPublishAlias(dataset_id=dataset_id, name=name, version=version, iteration_id=iteration_id,
                           prediction_id=prediction_id[:1024])
    session.add(alias)
    return alias


def drop_for_iteration(session: Session, iteration_id: str) -> int:
    """Unpublish an iteration; how many names it had (0 or 1). The caller commits."""
    return session.execute(delete(CvPublishAlias).where(CvPublishAlias.iteration_id == iteration_id)).rowcount


def drop_for_version(session: Session, dataset_id: int, version: int) -> None:
    """Unpublish a version that is being deleted (versions.delete, forced); the caller commits."""
    session.execute(delete(CvPublishAlias).where(CvPublishAlias.dataset_id == dataset_id, CvPublishAlias.version == version))


def drop_for_dataset(session: Session, dataset_id: int) -> None:
    """Every name of a dataset whose project is being deleted; the caller commits."""
    session.execute(delete(CvPublishAlias).where(CvPublishAlias.dataset_id == dataset_id))
