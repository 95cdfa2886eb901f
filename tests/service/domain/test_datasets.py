"""service.domain.datasets, images and cleanup: names, counts, relabel, delete (rows and blobs)."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from service.domain import cleanup, datasets, images, uploads
from service.errors import AlreadyExists, InvalidRequest, NotFound
from service.store.blobs import image_key
from tests.conftest import asset_images


def _upload(session, store, settings, ds, label, paths):
    files = [(p.name, (lambda p=p: p.read_bytes())) for p in paths]
    return uploads.ingest(session, store, ds, uploads.files_candidates(files, label), settings)


def test_create_get_list(session):
    datasets.create(session, "pets")
    datasets.create(session, "birds-2")
    session.commit()
    rows, total = datasets.list_all(session)
    assert total == 2 and [d.name for d in rows] == ["birds-2", "pets"]
    assert datasets.describe(session, datasets.get(session, "pets"))["image_count"] == 0


@pytest.mark.parametrize("name", ["", "Pets", "a b", "x" * 65, "../x", "-lead"])
def test_bad_names(session, name):
    with pytest.raises(InvalidRequest):
        datasets.create(session, name)


def test_duplicate_and_missing(session):
    datasets.create(session, "pets")
    session.commit()
    with pytest.raises(AlreadyExists):
        datasets.create(session, "pets")
    with pytest.raises(NotFound) as e:
        datasets.get(session, "nope")
    assert e.value.code == "dataset_not_found"


def test_label_counts_relabel_and_delete_image(session, store, settings):
    ds = datasets.create(session, "pets")
    r = _upload(session, store, settings, ds, "cat", asset_images("train", "cat")[:3])
    _upload(session, store, settings, ds, "noncat", asset_images("train", "noncat")[:2])
    assert datasets.label_counts(session, ds) == {"cat": 3, "noncat": 2}
    first = r.results[0]["image_id"]
    images.relabel(session, ds, first, "noncat")
    assert datasets.label_counts(session, ds) == {"cat": 2, "noncat": 3}
    sha = images.get(session, ds, first).sha256
    images.delete(session, store, ds, first)
    assert store.exists(image_key(sha))  # left to the collection, after its grace period
    settings.blob_grace_seconds = 0
    cleanup.collect(session, store, settings)
    assert not store.exists(image_key(sha))
    with pytest.raises(NotFound):
        images.get(session, ds, first)


def test_shared_blob_survives_deleting_one_dataset(session, store, settings):
    a, b = datasets.create(session, "a"), datasets.create(session, "b")
    path = asset_images("train", "cat")[:1]
    _upload(session, store, settings, a, "cat", path)
    _upload(session, store, settings, b, "cat", path)
    sha = images.list_images(session, a)[0][0].sha256
    settings.blob_grace_seconds = 0
    cleanup.delete_dataset(session, "a")
    assert cleanup.purge(session, store) == 1
    cleanup.collect(session, store, settings)
    assert store.exists(image_key(sha))
    cleanup.delete_dataset(session, "b")
    assert cleanup.purge(session, store) == 1
    assert store.exists(image_key(sha))  # purge leaves image blobs to the collection
    cleanup.collect(session, store, settings)
    assert not store.exists(image_key(sha))


def test_deleting_a_dataset_frees_its_name_at_once_and_cancels_its_trainings(session, store, settings, pets):
    from service.domain import trainings
    from service.domain.trainings import Status
    from service.store.tables import Dataset, Image, Training

    queued = trainings.request(session, "pets", {}, settings)
    running = trainings.request(session, "pets", {}, settings)
    session.commit()
    token = trainings.claim(running.id, "w1", settings.training_lease_seconds)
    old_id = pets.id
    cleanup.delete_dataset(session, "pets")
    with pytest.raises(NotFound):
        datasets.get(session, "pets")
    assert datasets.list_all(session)[1] == 0
    again = datasets.create(session, "pets")  # the name is free; a new id
    session.commit()
    assert again.id != old_id and datasets.describe(session, again)["image_count"] == 0
    session.expire_all()
    assert session.get(Training, queued.id).status == Status.CANCELLED
    assert session.get(Training, running.id).cancel_requested
    for t in (queued, running):  # gone from the API at once, as its dataset is (before: 'running', dataset 'pets',
        with pytest.raises(NotFound) as e:  # beside the new dataset of that name, until the worker stopped)
            trainings.get(session, t.id)
        assert e.value.code == "training_not_found" and "its dataset was deleted" in e.value.message
    assert cleanup.purge(session, store) == 0  # its running training has not stopped yet
    assert trainings.cancel_requested(running.id, token) and trainings.cancelled(running.id, token)
    sha = session.scalars(select(Image.sha256).where(Image.dataset_id == old_id)).first()
    assert cleanup.purge(session, store) == 1
    settings.blob_grace_seconds = 0
    cleanup.collect(session, store, settings)
    assert session.get(Dataset, old_id) is None and not store.exists(image_key(sha))
    assert session.scalar(select(func.count()).select_from(Image).where(Image.dataset_id == old_id)) == 0


def test_a_purge_goes_in_batches_and_one_that_dies_midway_is_finished_later(session, store, settings, monkeypatch):
    """Images go PURGE_BATCH rows a transaction, each batch's blobs listed as orphans with it: a purge
    that dies after two batches has committed exactly those (nothing lost track of), and the next
    purge removes the rest and the dataset."""
    from service.store.tables import BlobOrphan, Dataset, Image

    ds = datasets.create(session, "big")
    paths = asset_images("train", "cat") + asset_images("train", "noncat")
    _upload(session, store, settings, ds, "cat", paths)
    dataset_id = ds.id
    cleanup.delete_dataset(session, "big")
    monkeypatch.setattr(cleanup, "PURGE_BATCH", 5)
    real, calls = images.delete_batch, []

    def dies_on_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the process died")
        return real(*args, **kwargs)

    monkeypatch.setattr(images, "delete_batch", dies_on_the_third)
    with pytest.raises(RuntimeError):
        cleanup.purge(session, store)
    session.rollback()
    left = session.scalar(select(func.count()).select_from(Image).where(Image.dataset_id == dataset_id))
    listed = session.scalar(select(func.count()).select_from(BlobOrphan).where(BlobOrphan.key.like("images/%")))
    assert (left, listed) == (len(paths) - 10, 10)
    monkeypatch.setattr(images, "delete_batch", real)
    assert cleanup.purge(session, store) == 1
    assert session.get(Dataset, dataset_id) is None
    assert session.scalar(select(func.count()).select_from(BlobOrphan).where(BlobOrphan.key.like("images/%"))) == len(paths)


def test_deleting_over_http_starts_the_purge_at_once(felis_env):
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.store.db import new_session
    from service.store.tables import Dataset, Image

    with TestClient(create_app()) as client:
        client.post("/v1/datasets", json={"name": "gone"})
        client.post("/v1/datasets/gone/images", data={"label": "cat"},
                    files=[("files", (p.name, p.read_bytes(), "image/jpeg")) for p in asset_images("train", "cat")])
        assert client.delete("/v1/datasets/gone").status_code == 204
    with new_session() as s:  # no worker here: the API's own background task removed the rows
        assert s.scalar(select(func.count()).select_from(Image)) == 0 and s.scalar(select(func.count()).select_from(Dataset)) == 0
