"""service.domain.pipeline: one real training in-process, from rows to blobs to a version; and
importing a checkpoint trained elsewhere."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from models.checkpoint import load_checkpoint
from service.domain import datasets, pipeline, trainings, versions
from service.store.blobs import model_keys
from service.store.db import session_scope
from service.store.tables import Dataset, Training


@pytest.fixture
def trained(session, store, settings, pets):
    dataset = pets
    t = trainings.request(session, "pets", {"image_size": 64, "cv_folds": 2}, settings)
    session.commit()
    assert pipeline.run_training(t.id, settings=settings, store=store) == "succeeded"
    session.expire_all()
    return dataset, session.get(Training, t.id)


def test_the_version_the_checkpoint_and_the_training_agree_on_the_config(session, store, trained):
    dataset, training = trained
    row = versions.get(session, dataset, training.model_version)
    assert (row.checkpoint_key, row.onnx_key) == model_keys(dataset.id, training.id, training.claim_token)
    ckpt = load_checkpoint(store.get(row.checkpoint_key))
    assert row.config == ckpt["training_config"] == training.options
    assert row.config["image_size"] == 64 and row.config["precision"] == "int8"
    assert ckpt["dataset"]["name"] == "pets" and ckpt["dataset"]["image_count"] == row.snapshot["image_count"] == 32
    assert store.exists(row.onnx_key)


def test_a_linear_version_keeps_its_held_out_predictions_in_one_blob(session, store, trained):
    from models.label_issues import unpack_heldout
    from service.store.blobs import heldout_key

    dataset, training = trained
    row = versions.get(session, dataset, training.model_version)
    assert row.heldout_key == heldout_key(dataset.id, training.id, training.claim_token)
    held = unpack_heldout(store.get(row.heldout_key))
    assert len(held["image_ids"]) == row.snapshot["image_count"] == 32 and held["labels"] == row.labels
    assert held["probabilities"].shape == (32, 2) and row.label_issue_count == len(held["issue_rows"])
    assert sorted(held["image_ids"]) == sorted(i for i, _, _ in training_images(session, dataset))


def training_images(session, dataset):
    from service.store.tables import Image

    return session.execute(select(Image.id, Image.sha256, Image.label).where(Image.dataset_id == dataset.id)).all()


def test_import_checkpoint_records_the_next_version(session, store, trained):
    dataset, training = trained
    data = store.get(versions.get(session, dataset, training.model_version).checkpoint_key)
    other = datasets.create(session, "imported")
    session.commit()
    number = pipeline.import_checkpoint(session, store, other, data)
    row = versions.get(session, other, number)
    assert number == 1 and row.labels == ["cat", "noncat"] and store.exists(row.onnx_key)
    assert session.get(Training, row.training_id).status == "succeeded"


def test_a_run_that_never_records_its_version_leaves_no_model_blobs(session, store, settings, pets, monkeypatch):
    """Its dataset deleted (or its claim lost) after it wrote its checkpoint: before, those blobs
    stayed for ever; now they were listed as orphans before being written, and collected."""
    from service.domain import cleanup
    from service.domain.trainings import LostOwnership
    from service.store.tables import BlobOrphan

    t = trainings.request(session, "pets", {"architecture": "simple_cnn", "image_size": 32, "epochs": 1}, settings)
    session.commit()

    def lost(*_a, **_k):
        raise LostOwnership(t.id)

    monkeypatch.setattr(versions, "create", lost)
    pipeline.run_training(t.id, settings=settings, store=store)
    listed = set(session.scalars(select(BlobOrphan.key).where(BlobOrphan.key.like(f"models/%/{t.id}/%"))))
    assert len(listed) == 2 and all(store.exists(k) for k in listed)
    monkeypatch.setattr(settings, "blob_grace_seconds", 0)
    cleanup.collect(session, store, settings)
    assert not any(store.exists(k) for k in listed)


def test_a_linear_run_that_never_records_its_version_leaves_no_held_out_blob(session, store, settings, pets, monkeypatch):
    """The same for the third blob of a linear run; and a recorded version's blobs survive a collection."""
    from service.domain import cleanup
    from service.domain.trainings import LostOwnership
    from service.store.tables import BlobOrphan

    t = trainings.request(session, "pets", {"image_size": 64, "cv_folds": 2}, settings)
    session.commit()
    create = versions.create
    monkeypatch.setattr(versions, "create", lambda *a, **k: (_ for _ in ()).throw(LostOwnership(t.id)))
    pipeline.run_training(t.id, settings=settings, store=store)
    listed = set(session.scalars(select(BlobOrphan.key).where(BlobOrphan.key.like(f"models/%/{t.id}/%"))))
    assert len(listed) == 3 and any(k.endswith("/heldout.npz") for k in listed) and all(store.exists(k) for k in listed)
    monkeypatch.setattr(versions, "create", create)
    kept = trainings.request(session, "pets", {"image_size": 64, "cv_folds": 2}, settings)
    session.commit()
    assert pipeline.run_training(kept.id, settings=settings, store=store) == "succeeded"
    monkeypatch.setattr(settings, "blob_grace_seconds", 0)
    cleanup.collect(session, store, settings)
    assert not any(store.exists(k) for k in listed)
    session.expire_all()
    row = versions.get(session, datasets.get(session, "pets"), session.get(Training, kept.id).model_version)
    assert all(store.exists(k) for k in versions.blob_keys(row)) and len(versions.blob_keys(row)) == 3


@pytest.mark.parametrize("keep, code", [(2, "too_few_images"), (0, "too_few_labels")])
def test_labels_thinned_after_the_request_fail_the_run_as_the_request_would_have_been_refused(
        session, store, settings, pets, keep, code):
    """The per-label minimum and the two labels were checked only at the request. Images deleted
    while the training waited made it train anyway: on 16 cats and 2 non-cats it succeeded (one
    non-cat to validate on) and, the dataset's first version, became its default. With no non-cat
    left it failed as training_error (InvalidTrainConfig). The run checks again, with the request's codes."""
    from service.domain import images
    from service.store.tables import Image

    t = trainings.request(session, "pets", {"image_size": 64, "cv_folds": 2}, settings)
    session.commit()
    noncats = session.scalars(select(Image.id).where(Image.dataset_id == pets.id, Image.label == "noncat")).all()
    for image_id in noncats[keep:]:
        images.delete(session, store, pets, image_id)
    session.commit()
    assert pipeline.run_training(t.id, settings=settings, store=store) == "failed"
    session.expire_all()
    row = session.get(Training, t.id)
    assert row.error["code"] == code and str(settings.min_images_per_label if keep else 2) in row.error["message"]
    assert row.model_version is None and versions.list_for(session, pets) == []


def test_a_torchvision_backbone_trains_from_torch_hubs_cache_or_fails_saying_where_its_weights_go(
        session, store, settings, pets, tmp_path, monkeypatch):
    """architecture resnet18 with no FELIS_PRETRAINED_WEIGHTS: before, it failed as training_error
    ("needs a pretrained_weights file path") on every worker. Now a worker whose torch.hub cache
    cannot give the weights fails it as weights_unavailable naming the file; with the file in
    the cache (put there by hand, as offline; a connected worker downloads it) it trains."""
    import torch
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-cache"))
    (tmp_path / "no-cache").write_text("a file where the cache folder should be")
    options = {"architecture": "resnet18", "image_size": 64, "cv_folds": 2}
    t = trainings.request(session, "pets", options, settings)
    session.commit()
    assert pipeline.run_training(t.id, settings=settings, store=store) == "failed"
    session.expire_all()
    error = session.get(Training, t.id).error
    assert error["code"] == "weights_unavailable" and "resnet18-f37072fd.pth" in error["message"], error

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), cached)
    t = trainings.request(session, "pets", options, settings)
    session.commit()
    assert pipeline.run_training(t.id, settings=settings, store=store) == "succeeded"
    session.expire_all()
    row = versions.get(session, pets, session.get(Training, t.id).model_version)
    assert load_checkpoint(store.get(row.checkpoint_key))["architecture"]["name"] == "resnet18"


def test_images_deleted_while_the_run_reads_them_are_left_out_not_a_failed_training(session, store, settings, pets, monkeypatch):
    """A run lists the dataset's images at its start and reads their bytes as it goes. Images
    deleted meanwhile, their bytes purged (after FELIS_BLOB_GRACE_SECONDS: a long in-process
    extraction or fine-tuning), failed the whole training as training_error 'NotFound: blob
    images/6c/... is missing'. Now the run reads the dataset again and trains on what is left
    (the features it computed are cached); here two images go between the listing and the reads."""
    from service.domain import images
    from service.store.blobs import image_key
    from service.store.tables import Image

    t = trainings.request(session, "pets", {"image_size": 64, "cv_folds": 2}, settings)
    session.commit()
    doomed = session.scalars(select(Image).where(Image.dataset_id == pets.id, Image.label == "cat").limit(2)).all()
    gone = [(i.id, i.sha256) for i in doomed]
    original, calls = trainings.check_label_counts, []

    def delete_after_the_listing(*args, **kwargs):  # the run has its list; the images go now, bytes and all
        calls.append(1)
        if len(calls) == 1:
            with session_scope() as s:
                for image_id, sha in gone:
                    images.delete(s, store, s.get(Dataset, pets.id), image_id)
                s.commit()
            for _, sha in gone:
                store.delete(image_key(sha))
        return original(*args, **kwargs)

    monkeypatch.setattr(trainings, "check_label_counts", delete_after_the_listing)
    assert pipeline.run_training(t.id, settings=settings, store=store) == "succeeded"
    session.expire_all()
    training = session.get(Training, t.id)
    ckpt = load_checkpoint(store.get(versions.get(session, pets, training.model_version).checkpoint_key))
    assert ckpt["dataset"]["image_count"] == 30 and len(calls) == 2, ckpt["dataset"]


def test_a_new_phase_is_written_at_once_not_throttled(monkeypatch, settings):
    """Progress is written at most twice a second, but a phase change always: before, 'training'
    reported right after a features batch waited for the next write, and the client's bar for
    the features stayed at its first batch (32/213)."""
    written: list[dict] = []
    monkeypatch.setattr(pipeline.trainings, "report_progress", lambda _t, _k, state: written.append(state) or True)
    run = pipeline._Run("t-1", "token", settings)
    run.report({"phase": "features", "done": 32, "total": 213})
    run.report({"done": 64})  # throttled: within half a second of the last write
    run.report({"phase": "training", "epoch": 1, "epochs": 3})
    assert [w["phase"] for w in written] == ["features", "training"] and written[-1]["done"] == 64
