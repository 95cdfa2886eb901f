"""service.domain.versions: numbering, deleting one version, retention."""

from __future__ import annotations

import pytest

from service.domain import trainings, versions
from service.errors import Conflict, NotFound
from service.store.blobs import model_keys


def _version(session, store, settings, keep: int = 0) -> int:
    """A finished training's version, recorded as the pipeline records one (blobs, then the row)."""
    t = trainings.request(session, "pets", {}, settings)
    session.commit()
    token = trainings.claim(t.id, "w1", settings.training_lease_seconds)
    ckpt, onnx = model_keys(t.dataset_id, t.id, token)
    store.put(ckpt, b"checkpoint")
    store.put(onnx, b"graph")
    number = versions.create(t.id, token, architecture="efficientnet_lite0", labels=["cat", "noncat"], metrics={},
                             evaluation={}, config={}, snapshot={}, checkpoint_key=ckpt, onnx_key=onnx).version
    if keep:  # as the pipeline applies FELIS_KEEP_VERSIONS once the version is recorded
        versions.apply_retention(session, store, t.dataset_id, keep)
    return number


def test_delete_a_version_and_its_blobs_and_never_reuse_its_number(session, store, settings, pets):
    assert [_version(session, store, settings) for _ in range(2)] == [1, 2]
    row = versions.get(session, pets, 2)
    versions.delete(session, store, "pets", 2)
    with pytest.raises(NotFound):
        versions.get(session, pets, 2)
    assert not store.exists(row.checkpoint_key) and not store.exists(row.onnx_key)
    assert _version(session, store, settings) == 3  # before: max + 1 gave 2 again


def test_the_default_version_is_deleted_only_with_force(session, store, settings, pets):
    _version(session, store, settings)
    with pytest.raises(Conflict) as e:
        versions.delete(session, store, "pets", 1)
    assert e.value.code == "version_is_default"
    versions.delete(session, store, "pets", 1, force=True)
    session.refresh(pets)
    assert pets.default_version is None and versions.list_for(session, pets) == []


def test_without_a_default_the_answer_says_whether_to_train_or_to_promote(session, store, settings, pets):
    with pytest.raises(NotFound) as e:
        versions.resolve(session, pets, None)
    assert e.value.code == "no_model" and "no trained model yet" in e.value.message
    _version(session, store, settings), _version(session, store, settings)
    versions.promote(session, "pets", 2)
    versions.delete(session, store, "pets", 2, force=True)
    session.refresh(pets)
    with pytest.raises(NotFound) as e:  # version 1 is there: "no trained model yet" would be wrong
        versions.resolve(session, pets, None)
    assert e.value.code == "no_model" and "promote" in e.value.message, e.value.message


def test_retention_keeps_the_newest_and_the_default(session, store, settings, pets):
    for _ in range(3):
        _version(session, store, settings, keep=2)
    assert [v.version for v in versions.list_for(session, pets)] == [1, 2, 3]  # 1 is the default
    versions.promote(session, "pets", 3)
    _version(session, store, settings, keep=2)
    assert [v.version for v in versions.list_for(session, pets)] == [3, 4]


def test_delete_over_http(felis_env):
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    with TestClient(create_app()) as c:
        c.post("/v1/datasets", json={"name": "pets"})
        r = c.delete("/v1/datasets/pets/models/1")
        assert r.status_code == 404 and r.json()["error"]["code"] == "version_not_found"


def test_for_serving_reads_the_default_and_its_thresholds_afresh_each_call(session, store, settings, pets):
    """Predict's per-request lookup: what a promotion or a moved threshold changed is served by the next call."""
    from service.store.db import get_engine

    def serving(version=None):
        with get_engine().connect() as conn:
            return versions.for_serving(conn, "pets", version)

    with pytest.raises(NotFound) as e:
        serving()
    assert e.value.code == "no_model"
    _version(session, store, settings), _version(session, store, settings)
    first = serving()
    assert (first.version, first.thresholds, first.ood_threshold) == (1, {}, None)
    assert first.checkpoint_key == versions.get(session, pets, 1).checkpoint_key
    assert serving(2).version == 2
    versions.promote(session, "pets", 2)
    assert serving().version == 2
    versions.set_threshold(session, "pets", 2, "cat", threshold=0.8)
    assert serving().thresholds == {"cat": 0.8} and serving(1).thresholds == {}
    with pytest.raises(NotFound) as e:
        serving(7)
    assert e.value.code == "version_not_found"
