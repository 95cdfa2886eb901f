"""Deleting what users delete, and removing it in the background.

Deleting a dataset answers at once: it is marked deleted (gone from every listing, its name free
for a new dataset under a new id) and its trainings are cancelled, in one commit. ``purge`` then
removes its rows, each through the module that owns them; the workers' sweep runs it.

Image blobs are never deleted with their rows. Whatever drops a reference to a blob (deleting an
image, purging a dataset's rows, dropping a failed or dead upload's stage) lists the blob in
blob_orphans in the same commit, and ``collect``, in the workers' sweep, deletes each listed blob
that nothing refers to once it has been listed for FELIS_BLOB_GRACE_SECONDS: no image row and no
staged row of an upload in progress (for an image blob), no version (for a model blob). So a
crash between a row's delete and its blob's leaves an entry the next sweep acts on. Model blobs,
which no upload races for, ``purge`` lists too but deletes at once after its commit.
(versions.delete still deletes a version's blobs inline after its commit without listing them:
a crash in between leaves them for good, until it lists them with uploads.orphan_blobs.)

Why deleting an image blob inline raced uploads: an upload that finds the blob of its bytes
already stored (another dataset's) writes nothing and counts on it until it publishes its rows.
Here an upload stages its row (committed) before it looks for the blob, and staging deletes the
blob's orphan entry in the same transaction. ``collect`` claims an entry (deletes it, which takes
its row lock on PostgreSQL, the write lock on SQLite), checks the references and deletes the blob
before it commits: an upload staging those bytes meanwhile waits for that commit, then finds the
blob gone and writes it again; one that staged before is a reference, and the blob stays.

What the grace period protects: the one interleaving that lock cannot see, on PostgreSQL (SQLite
runs one writer at a time), a staging transaction that looked for the orphan entry before the
transaction listing it committed, and commits only after the collection checked the references.
That takes the two transactions together (milliseconds, seconds for a purge of a large dataset)
to outlast the grace period. It also absorbs clock skew between the processes that list and
collect, since "listed since" is the lister's clock.

``collect`` also drops the stages of dead uploads (staged rows untouched for
FELIS_UPLOAD_STAGE_TTL_SECONDS; a live upload stages a chunk every few seconds, and one that
outlives the TTL fails whole at publishing, see uploads.py), listing their blobs as orphans, and
deletes cached feature blobs (service.store.features, ``features/<extractor>/ab/<sha256>.f16``) of
bytes no image and no upload uses any more (features are shared by every dataset with those
bytes). An image blob's cached thumbnails (images.thumbnail_keys) and feature blobs (one per
extractor that has any: the folders under ``features/``) go with it, in the same claim: a crash
before the commit leaves the entry listed, and the next round deletes them again (deleting is
idempotent). A feature blob deleted while a training starts to use it again is only computed again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from itertools import islice

from sqlalchemy import delete, exists, func, or_, select
from sqlalchemy.orm import Session

from service.config import Settings
from service.domain import datasets, images, trainings, uploads, versions
from service.store.blobs import FEATURES_PREFIX, BlobStore, feature_key, image_key, parse_feature_key
from service.store.tables import (
    BlobOrphan,
    Image,
    ImageStage,
    ModelVersion,
    utcnow,
)

log = logging.getLogger("felis.cleanup")

_IMAGES, _MODELS = "images/", "models/"


def delete_dataset(session: Session, name: str) -> int:
    """Mark it deleted and cancel its trainings, in one commit; returns its id (for purge_soon)."""
    dataset = datasets.mark_deleted(session, name)
    trainings.cancel_all(session, dataset.id, reason="its dataset was deleted")
    session.commit()
    return dataset.id


def purge_soon(dataset_id: int) -> None:
    """Purge one deleted dataset now, on a session of its own (the API runs it after answering the
    delete). Best effort: a failure, or a training still running, leaves it to the workers' sweep."""
    from service.store.blobs import get_store
    from service.store.db import new_session

    try:
        with new_session() as session:
            purge(session, get_store(), only=dataset_id)
    except Exception:
        log.warning("purging deleted dataset %s failed; the workers' sweep will", dataset_id, exc_info=True)


PURGE_BATCH = 2000  # image rows removed a transaction: the write lock is held a fraction of a second


def purge(session: Session, store: BlobStore, only: int | None = None) -> int:
    """Remove the deleted datasets (or just dataset `only`) whose trainings have all stopped;
    returns how many went. Safe to run anywhere, any number of times, concurrently: the API starts
    it for a dataset as soon as the delete is answered, the workers' sweep finishes what a process
    that died left. Images go PURGE_BATCH rows a transaction, their blobs listed as orphans in it
    (a large dataset never holds the write lock for long: other writers go on between batches);
    then the versions, trainings and the dataset row in one commit; the model blobs (which no upload
    can race for) are deleted at once after it."""
    done = 0
    for dataset_id in datasets.deleted_ids(session):
        if only is not None and dataset_id != only:
            continue
        if trainings.any_active(session, dataset_id):
            continue  # a running training stops at its next step; the sweep settles a dead worker's
        shas, removed = images.delete_batch(session, dataset_id, PURGE_BATCH), 0
        while shas:
            uploads.orphan_blobs(session, [image_key(sha) for sha in shas])
            session.commit()
            removed += len(shas)
            shas = images.delete_batch(session, dataset_id, PURGE_BATCH)
        model_keys = versions.delete_all(session, dataset_id)
        trainings.delete_all(session, dataset_id)
        datasets.remove(session, dataset_id)
        uploads.orphan_blobs(session, model_keys)
        session.commit()
        for key in model_keys:  # a crash here leaves them listed: collect deletes them
            store.delete(key)
        if model_keys:
            session.execute(delete(BlobOrphan).where(BlobOrphan.key.in_(model_keys))
                            .execution_options(synchronize_session=False))
            session.commit()
        log.info("removed deleted dataset %s: %d images, %d model blobs", dataset_id, removed, len(model_keys))
        done += 1
    return done


def collect(session: Session, store: BlobStore, settings: Settings, *, limit: int = 1000) -> dict[str, int]:
    """One round of the collection (see the module's docstring): the stages of dead uploads, up
    to ``limit`` orphan blobs past the grace period, and up to ``limit`` feature blobs looked at.
    Returns how many of each went. Safe to run anywhere, any number of times, concurrently."""
    counts = {"stages": 0, "blobs": 0, "features": 0}
    staged_before = utcnow() - timedelta(seconds=settings.upload_stage_ttl_seconds)
    dead = session.scalars(select(ImageStage.upload_id).group_by(ImageStage.upload_id)
                           .having(func.max(ImageStage.created_at) < staged_before).limit(limit)).all()
    session.commit()
    for upload_id in dead:
        if uploads.drop_stage(session, upload_id, staged_before=staged_before):
            log.info("dropped the stage of dead upload %s", upload_id)
            counts["stages"] += 1
    listed_before = utcnow() - timedelta(seconds=settings.blob_grace_seconds)
    keys = session.scalars(select(BlobOrphan.key).where(BlobOrphan.since <= listed_before)
                           .order_by(BlobOrphan.since).limit(limit)).all()
    session.commit()
    extractors = _feature_extractors(store) if any(key.startswith(_IMAGES) for key in keys) else []
    for key in keys:
        counts["blobs"] += _collect_blob(session, store, key, listed_before, extractors)
    counts["features"] = _collect_features(session, store, limit)
    if any(counts.values()):
        log.info("collected %d dead upload stages, %d blobs, %d feature blobs",
                 counts["stages"], counts["blobs"], counts["features"])
    return counts


def _collect_blob(session: Session, store: BlobStore, key: str, listed_before: datetime,
                  extractors: Sequence[str] = ()) -> bool:
    """Claim the entry, and delete the blob if nothing refers to it, all before the commit."""
    # First a look outside any transaction: a store that does not answer fails the round here,
    # not while holding the lock (on SQLite the database's write lock) through its timeouts.
    store.exists(key)
    try:
        claimed = session.execute(delete(BlobOrphan).where(BlobOrphan.key == key, BlobOrphan.since <= listed_before)
                                  .returning(BlobOrphan.key).execution_options(synchronize_session=False)).first()
        if claimed is None or _referenced(session, key):  # taken off the list meanwhile, or in use again
            session.commit()
            return False
        sha = key.rsplit("/", 1)[-1] if key.startswith(_IMAGES) else None
        for derived in _derived_keys(sha, extractors) if sha else []:  # never listed on their own
            store.delete(derived)
        store.delete(key)
        session.commit()
        return True
    except BaseException:
        session.rollback()  # the entry stays listed: the next round tries again
        raise


def _referenced(session: Session, key: str) -> bool:
    if key.startswith(_IMAGES):
        sha = key.rsplit("/", 1)[-1]
        return bool(session.scalar(select(exists().where(Image.sha256 == sha)))
                    or session.scalar(select(exists().where(ImageStage.sha256 == sha))))
    if key.startswith(_MODELS):
        return bool(session.scalar(select(exists().where(or_(*(column == key for column in versions.BLOB_COLUMNS))))))
    return True  # no kind of blob this module knows: never delete it


def _derived_keys(sha: str, extractors: Sequence[str]) -> list[str]:
    """The blobs made from an image blob's bytes: its thumbnails and its features."""
    keys = list(images.thumbnail_keys(sha))
    try:
        keys += [feature_key(extractor, sha) for extractor in extractors]
    except ValueError:  # not a sha256 (no upload names a blob so): no features of it either
        pass
    return keys


def _feature_extractors(store: BlobStore) -> list[str]:
    """The extractors that have feature blobs: the folders under features/ (one listing)."""
    return [name[len(FEATURES_PREFIX):-1] for name in store.list(FEATURES_PREFIX, recursive=False) if name.endswith("/")]


_features_scanned_to: str | None = None  # the feature blob key where the last round stopped


def _collect_features(session: Session, store: BlobStore, limit: int) -> int:
    """Feature blobs of bytes no image and no upload uses any more. Those of the image blobs
    collected went with them; this finds the rest (a training that cached them after its images
    were deleted, features of an extractor listed after the image blob went), ``limit`` keys a
    round, in the store's key order and round again, so a round costs the same whatever the
    number of blobs: one listing, the lookups of their sha256s, the deletes."""
    global _features_scanned_to
    start = _features_scanned_to
    keys = list(islice(store.list(FEATURES_PREFIX, start_after=start or ""), limit))
    if start and len(keys) < limit:  # past the end: on from the beginning
        keys = list(dict.fromkeys(keys + list(islice(store.list(FEATURES_PREFIX), limit - len(keys)))))
    _features_scanned_to = keys[-1] if len(keys) == limit else None
    owners = {key: parsed[1] for key in keys if (parsed := parse_feature_key(key))}
    shas = sorted(set(owners.values()))
    used = set()
    for i in range(0, len(shas), 500):
        chunk = shas[i:i + 500]
        used.update(session.scalars(select(Image.sha256).where(Image.sha256.in_(chunk)).distinct()))
        used.update(session.scalars(select(ImageStage.sha256).where(ImageStage.sha256.in_(chunk)).distinct()))
    session.commit()
    gone = [key for key, sha in owners.items() if sha not in used]
    for key in gone:
        store.delete(key)
    return len(gone)
