"""Open-set predictions through the API, embedded mode (issue 15): a default linear version trained
on 20 + 20 real kaggle_ photos of cats and dogs flags a photo of a container ship, answers a cat
photo as before, moves its threshold on request, and a version made without an index answers
ood_score null and ood false. The training runs in-process (pipeline.run_training, what the
worker's task calls); about 20 s on 2 cores."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import DATASETS, needs_datasets
from tests.utils.apps import isolated_client

pytestmark = needs_datasets()
PHOTOS = DATASETS / "photos"
IN_DISTRIBUTION = PHOTOS / "test" / "cat" / "kaggle_cat.4065.jpg"
OUT_OF_DISTRIBUTION = PHOTOS / "test" / "noncat" / "imagenet_n03095699_container_ship.JPEG"


def _files(paths: list[Path]) -> list[tuple]:
    return [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def _kaggle(split: str, folder: str, n: int) -> list[Path]:
    return sorted((PHOTOS / split / folder).glob("kaggle_*"))[:n]


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[TestClient]:
    """Dataset `pets` with version 1 (default linear training) and version 2 (the same checkpoint
    imported without its index, as a version made before issue 15 is)."""
    from models.checkpoint import checkpoint_bytes, load_checkpoint
    from service.domain import datasets, pipeline, versions
    from service.store.blobs import get_store
    from service.store.db import new_session

    with isolated_client(tmp_path_factory.mktemp("open-set") / "var") as client:
        assert client.post("/v1/datasets", json={"name": "pets"}).status_code == 201
        for label, folder in (("cat", "cat"), ("dog", "noncat")):
            r = client.post("/v1/datasets/pets/images", data={"label": label}, files=_files(_kaggle("train", folder, 20)))
            assert r.status_code == 201, r.text
        training = client.post("/v1/datasets/pets/trainings", json={}).json()
        assert pipeline.run_training(training["id"]) == "succeeded"
        store, session = get_store(), new_session()
        try:
            dataset = datasets.get(session, "pets")
            ckpt = load_checkpoint(store.get(versions.get(session, dataset, 1).checkpoint_key))
            del ckpt["ood"]
            assert pipeline.import_checkpoint(session, store, dataset, checkpoint_bytes(ckpt)) == 2
        finally:
            session.close()
        yield client


def test_a_photo_of_something_else_is_flagged_and_gets_no_decision(served):
    r = served.post("/v1/datasets/pets/predict", files=_files([IN_DISTRIBUTION, OUT_OF_DISTRIBUTION]))
    assert r.status_code == 200, r.text
    cat, ship = r.json()["predictions"]
    threshold = served.get("/v1/datasets/pets/models/1").json()["ood"]["threshold"]
    assert (cat["label"], cat["decision"], cat["ood"]) == ("cat", "cat", False)
    assert 0 <= cat["ood_score"] < threshold < ship["ood_score"] <= 2
    assert ship["ood"] is True and ship["decision"] is None
    assert ship["label"] in ("cat", "dog") and set(ship["probabilities"]) == {"cat", "dog"}  # still answered
    alone = served.post("/v1/datasets/pets/predict", files=_files([OUT_OF_DISTRIBUTION])).json()["predictions"][0]
    assert alone["ood"] is True and abs(alone["ood_score"] - ship["ood_score"]) < 1e-5  # alone as in a batch


def test_the_version_and_its_evaluation_show_the_calibration(served):
    ood = served.get("/v1/datasets/pets/models/1").json()["ood"]
    assert set(ood) == {"method", "threshold", "flagged_fraction", "index_vectors", "n_train"}  # no quantiles
    assert (ood["method"], ood["flagged_fraction"], ood["index_vectors"], ood["n_train"]) == ("knn_cosine", 0.01, 40, 40)
    evaluation = served.get("/v1/datasets/pets/models/1/evaluation").json()["ood"]
    assert evaluation["threshold"] == ood["threshold"] and evaluation["calibration"] == "leave_one_out"
    assert 0 <= evaluation["validation_flagged"] <= 1
    listing = served.get("/v1/datasets/pets/models").json()["data"]
    assert listing[0]["ood"] == ood and listing[1]["ood"] is None


def test_moving_the_threshold_flags_more_on_the_next_request(served):
    photos = _kaggle("test", "cat", 5) + _kaggle("test", "noncat", 5)
    before = served.post("/v1/datasets/pets/predict", files=_files(photos)).json()["predictions"]
    calibrated = served.get("/v1/datasets/pets/models/1").json()["ood"]
    r = served.put("/v1/datasets/pets/models/1/ood-threshold", json={"flagged_fraction": 0.5})
    assert r.status_code == 200, r.text
    moved = r.json()["ood"]
    try:
        after = served.post("/v1/datasets/pets/predict", files=_files(photos)).json()["predictions"]
        assert moved["flagged_fraction"] == 0.5 and moved["threshold"] < calibrated["threshold"]
        assert sum(p["ood"] for p in after) > sum(p["ood"] for p in before)
        assert [p["ood_score"] for p in after] == [p["ood_score"] for p in before]  # the model is the same
        assert all(p["decision"] is None for p in after if p["ood"])
        r = served.put("/v1/datasets/pets/models/1/ood-threshold", json={"threshold": 2.0})
        assert r.json()["ood"] == {**moved, "threshold": 2.0, "flagged_fraction": 0.0}
        assert not any(p["ood"] for p in served.post("/v1/datasets/pets/predict", files=_files(photos)).json()["predictions"])
        r = served.put("/v1/datasets/pets/models/1/ood-threshold", json={"threshold": moved["threshold"]})
        assert abs(r.json()["ood"]["flagged_fraction"] - 0.5) < 1e-3  # the same quantiles, read the other way
    finally:
        served.put("/v1/datasets/pets/models/1/ood-threshold", json={"threshold": calibrated["threshold"]})


def test_bad_threshold_bodies_are_refused_with_a_code(served):
    put = lambda body, version=1: served.put(f"/v1/datasets/pets/models/{version}/ood-threshold", json=body)  # noqa: E731
    for body in ({}, {"threshold": 0.5, "flagged_fraction": 0.1}, {"threshold": None}):
        r = put(body)
        assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_ood_threshold"), body
    for body in ({"flagged_fraction": 1.0}, {"flagged_fraction": 0.0}, {"threshold": 2.5}, {"threshold": -0.1},
                 {"threshold": True}, {"flagged_fraction": "0.5"}):  # a bool was stored as 1.0
        r = put(body)
        assert (r.status_code, r.json()["error"]["code"]) == (422, "validation_error"), body
    for body in ({"threshold": True}, {"min_precision": True}, {"threshold": "0.5"}):
        r = served.put("/v1/datasets/pets/models/1/thresholds/cat", json=body)
        assert (r.status_code, r.json()["error"]["code"]) == (422, "validation_error"), (body, r.text)
    r = put({"flagged_fraction": 0.5}, version=2)
    assert (r.status_code, r.json()["error"]["code"]) == (409, "ood_unavailable")
    assert put({"flagged_fraction": 0.5}, version=9).json()["error"]["code"] == "version_not_found"


def test_a_version_without_an_index_answers_null_and_false(served):
    r = served.post("/v1/datasets/pets/predict", params={"version": 2}, files=_files([IN_DISTRIBUTION, OUT_OF_DISTRIBUTION]))
    assert r.status_code == 200, r.text
    for p in r.json()["predictions"]:
        assert p["ood_score"] is None and p["ood"] is False and p["decision"] == p["label"]
    assert served.get("/v1/datasets/pets/models/2").json()["ood"] is None


def test_a_labels_threshold_can_be_removed(served):
    """Before: once set, a label's threshold could only be moved ({"threshold": null} answered 422
    and there was no DELETE), and threshold 0 is not the same as none: every image cleared it."""
    cat = _files([IN_DISTRIBUTION])
    r = served.put("/v1/datasets/pets/models/1/thresholds/dog", json={"threshold": 0.0})
    assert r.status_code == 200 and r.json()["thresholds"] == {"dog": 0.0}
    assert served.post("/v1/datasets/pets/predict", files=cat).json()["predictions"][0]["decision"] == "dog"
    r = served.delete("/v1/datasets/pets/models/1/thresholds/dog")
    assert r.status_code == 200 and r.json()["thresholds"] == {}, r.text
    assert served.post("/v1/datasets/pets/predict", files=cat).json()["predictions"][0]["decision"] == "cat"
    assert served.delete("/v1/datasets/pets/models/1/thresholds/dog").status_code == 200  # none to remove: the same answer
    r = served.delete("/v1/datasets/pets/models/1/thresholds/ship")
    assert (r.status_code, r.json()["error"]["code"]) == (422, "unknown_label")
