"""Deleting what users delete, and removing it in the background.

Deleting a dataset answers at once: it is marked deleted (gone from every listing, its name free
for a new dataset under a new id) and its trainings are cancelled, in one commit. ``purge`` then
removes its rows, each through the module that owns them, and the blobs no row refers to any
more; the workers' sweep runs it. Rows go first (committed), blobs after, so a crash in between
leaves unreferenced blobs at worst, never a row pointing at a missing blob.
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from service.domain import datasets, images, trainings, versions
from service.store.blobs import BlobStore, image_key

log = logging.getLogger("felis.cleanup")


def delete_dataset(session: Session, name: str) -> None:
    dataset = datasets.mark_deleted(session, name)
    trainings.cancel_all(session, dataset.id, reason="its dataset was deleted")
    session.commit()


def purge(session: Session, store: BlobStore) -> int:
    """Remove the deleted datasets whose trainings have all stopped; returns how many went. Safe to
    run anywhere, any number of times, concurrently."""
    done = 0
    for dataset_id in datasets.deleted_ids(session):
        if trainings.any_active(session, dataset_id):
            continue  # a running training stops at its next step; the sweep settles a dead worker's
        model_keys = versions.delete_all(session, dataset_id)
        trainings.delete_all(session, dataset_id)
        shas = images.delete_all(session, dataset_id)
        datasets.remove(session, dataset_id)
        session.commit()
        for sha in images.unreferenced(session, shas):
            store.delete(image_key(sha))
        for key in model_keys:
            store.delete(key)
        log.info("removed deleted dataset %s: %d images, %d model blobs", dataset_id, len(shas), len(model_keys))
        done += 1
    return done
