"""The README's walk-through over real HTTP with a real Celery worker: create a dataset, upload
catvnoncat as a zip and as files, train, watch, predict, train again, promote, download.
Runs once in embedded mode and once against Redis + PostgreSQL."""

from __future__ import annotations


import numpy as np
import pytest

from models.checkpoint import load_checkpoint
from models.predictor import Predictor
from tests.conftest import ASSETS, DATASETS, needs_datasets, zip_folder
from tests.utils.processes import wait_training

pytestmark = [needs_datasets(), pytest.mark.timeout(1200)]

CATVNONCAT = DATASETS / "catvnoncat"


def _test_images(label: str) -> list:
    return sorted((CATVNONCAT / "test" / label).iterdir())


@pytest.fixture(scope="module")
def trained(felis):
    """A dataset with catvnoncat's training set and one trained version (the default architecture)."""
    assert felis.post("/v1/datasets", json={"name": "cats"}).status_code == 201
    r = felis.post("/v1/datasets/cats/images",
                   files={"archive": ("train.zip", zip_folder(CATVNONCAT / "train", wrapper="train"), "application/zip")})
    assert r.status_code == 201, r.text
    assert r.json()["created"] == 209
    r = felis.post("/v1/datasets/cats/trainings", json={})
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued"
    done = wait_training(felis, r.json()["id"])
    assert done["status"] == "succeeded", done
    return done


def test_dataset_reports_its_labels(felis, trained):
    body = felis.get("/v1/datasets/cats").json()
    assert body["label_counts"] == {"cat": 72, "noncat": 137}
    assert body["image_count"] == 209 and body["labels"] == ["cat", "noncat"]
    assert felis.get("/v1/datasets").json()["count"] >= 1


def test_training_reports_progress_and_a_version(felis, trained):
    assert trained["model_version"] == 1
    assert trained["progress"]["phase"] == "done"
    models = felis.get("/v1/datasets/cats/models").json()
    assert models["count"] == 1 and models["data"][0]["default"] is True
    assert models["data"][0]["metrics"]["accuracy"] >= 0.8
    ev = felis.get("/v1/datasets/cats/models/1/evaluation").json()
    assert {"accuracy", "confusion_matrix", "calibration", "per_label"} <= set(ev)


def test_predict_on_the_held_out_test_set(felis, trained):
    correct = total = 0
    for label in ("cat", "noncat"):
        paths = _test_images(label)
        files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
        r = felis.post("/v1/datasets/cats/predict", files=files)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == 1
        for pred in body["predictions"]:
            assert set(pred["probabilities"]) == {"cat", "noncat"}
            assert abs(sum(pred["probabilities"].values()) - 1) < 1e-4
            correct += pred["label"] == label
            total += 1
    assert total == 50
    assert correct / total >= 0.9, f"{correct}/{total}"


def test_api_process_serves_without_torch_and_stays_small(felis, trained):
    """Issue 3: one loaded model, predictions under concurrency, and the API stays under 400 MB."""
    from tests.utils.processes import api_pid, has_torch_loaded, rss_mb

    img = _test_images("cat")[0]
    from concurrent.futures import ThreadPoolExecutor

    def one(_: int) -> int:
        return felis.post("/v1/datasets/cats/predict", files=[("files", (img.name, img.read_bytes()))]).status_code

    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(one, range(64))) == {200}
    pid = api_pid(felis.procs)
    assert not has_torch_loaded(pid), "the API loaded torch: predictions should need ONNX Runtime only"
    assert rss_mb(pid) < 400


def test_retrain_promote_and_download(felis, trained):
    r = felis.post("/v1/datasets/cats/trainings", json={"architecture": "simple_cnn", "epochs": 3, "seed": 1})
    assert r.status_code == 202, r.text
    done = wait_training(felis, r.json()["id"])
    assert done["status"] == "succeeded" and done["model_version"] == 2
    img = _test_images("cat")[0]
    predict = lambda: felis.post("/v1/datasets/cats/predict", files=[("files", (img.name, img.read_bytes()))]).json()
    assert predict()["model_version"] == 1  # a new version is not the default until promoted
    assert felis.post("/v1/datasets/cats/models/2/promote").json()["default"] is True
    assert predict()["model_version"] == 2
    explicit = felis.post("/v1/datasets/cats/predict?version=1", files=[("files", (img.name, img.read_bytes()))]).json()
    assert explicit["model_version"] == 1

    blob = felis.get("/v1/datasets/cats/models/1/download")
    assert blob.status_code == 200
    ckpt = load_checkpoint(blob.content)
    assert ckpt["labels"] == ["cat", "noncat"] and ckpt["dataset"]["image_count"] == 209
    served = [explicit["predictions"][0]["probabilities"][k] for k in ("cat", "noncat")]
    local = Predictor.from_checkpoint(ckpt).predict([img.read_bytes()])[0]  # rebuilds the served (INT8) graph
    assert ckpt["precision"] == "int8" and np.allclose([local[k] for k in ("cat", "noncat")], served, atol=1e-4)
    graph = felis.get("/v1/datasets/cats/models/1/download", params={"format": "onnx"})
    assert graph.status_code == 200 and graph.headers["content-disposition"].endswith('cats-v1.onnx"')
    local = Predictor.from_onnx(graph.content).predict([img.read_bytes()])[0]
    assert np.allclose([local[k] for k in ("cat", "noncat")], served, atol=1e-6)


def test_upload_files_with_a_label_and_duplicates(felis, trained):
    paths = sorted((ASSETS / "cifar-cat" / "train" / "cat").iterdir())[:3]
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    r = felis.post("/v1/datasets/cats/images", data={"label": "cat"}, files=files)
    assert r.status_code == 201 and r.json()["created"] == 3
    r = felis.post("/v1/datasets/cats/images", data={"label": "cat"},
                   files=files + [("files", ("junk.jpg", b"not an image", "image/jpeg"))])
    assert r.status_code == 422
    body = r.json()
    assert body["error"]["code"] == "no_images_created"
    assert [x["status"] for x in body["results"]] == ["duplicate"] * 3 + ["rejected"]
    assert body["results"][3]["reason"] == "not_an_image"
    image_id = body["results"][0]["image_id"]
    assert felis.get(f"/v1/datasets/cats/images/{image_id}/content").content == paths[0].read_bytes()
    assert felis.patch(f"/v1/datasets/cats/images/{image_id}", json={"label": "noncat"}).json()["label"] == "noncat"
    assert felis.delete(f"/v1/datasets/cats/images/{image_id}").status_code == 204
    assert felis.get(f"/v1/datasets/cats/images/{image_id}").status_code == 404


@pytest.mark.parametrize("method,path,kwargs,status,code", [
    ("get", "/v1/datasets/nope", {}, 404, "dataset_not_found"),
    ("get", "/v1/trainings/nope", {}, 404, "training_not_found"),
    ("get", "/v1/datasets/cats/models/99", {}, 404, "version_not_found"),
    ("post", "/v1/datasets", {"json": {"name": "Bad Name"}}, 422, "invalid_dataset_name"),
    ("post", "/v1/datasets", {"json": {}}, 422, "validation_error"),
    ("post", "/v1/datasets/cats/trainings", {"json": {"architecture": "vgg99"}}, 422, "invalid_training_option"),
    ("post", "/v1/datasets/cats/trainings", {"json": {"epochs": -1}}, 422, "invalid_training_option"),
    ("post", "/v1/datasets/cats/images", {"files": {"archive": ("x.zip", b"no zip")}}, 422, "invalid_archive"),
    ("post", "/v1/datasets/cats/images", {"files": {"files": ("a.jpg", b"x")}, "data": {"label": "unlabeled"}}, 422, "reserved_label"),
    ("post", "/v1/datasets/cats/images", {"data": {"label": "cat"}}, 422, "empty_upload"),
    ("post", "/v1/datasets/cats/predict", {"files": {"files": ("a.jpg", b"garbage")}}, 422, "not_an_image"),
    ("post", "/v1/datasets/cats/predict?version=99", {"files": {"files": ("a.jpg", b"x")}}, 404, "version_not_found"),
])
def test_bad_input_gets_a_clear_error(felis, trained, method, path, kwargs, status, code):
    r = getattr(felis, method)(path, **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


def test_training_needs_two_labels_and_predict_needs_a_model(felis, trained):
    assert felis.post("/v1/datasets", json={"name": "onelabel"}).status_code == 201
    paths = sorted((ASSETS / "cifar-cat" / "train" / "cat").iterdir())[:6]
    felis.post("/v1/datasets/onelabel/images", data={"label": "cat"},
               files=[("files", (p.name, p.read_bytes())) for p in paths])
    r = felis.post("/v1/datasets/onelabel/trainings", json={})
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_few_labels"
    r = felis.post("/v1/datasets/onelabel/predict", files=[("files", (paths[0].name, paths[0].read_bytes()))])
    assert r.status_code == 404 and r.json()["error"]["code"] == "no_model"
    assert felis.delete("/v1/datasets/onelabel").status_code == 204
    assert felis.get("/v1/datasets/onelabel").status_code == 404



def test_cancel_a_running_training_leaves_no_version(felis, trained):
    before = felis.get("/v1/datasets/cats/models").json()["count"]
    tid = felis.post("/v1/datasets/cats/trainings", json={"architecture": "simple_cnn", "epochs": 500}).json()["id"]
    import time

    deadline = time.monotonic() + 120
    while felis.get(f"/v1/trainings/{tid}").json()["status"] != "running":
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.2)
    r = felis.post(f"/v1/trainings/{tid}/cancel")
    assert r.status_code == 200
    done = wait_training(felis, tid, timeout=60)
    assert done["status"] == "cancelled" and done["model_version"] is None
    assert felis.get("/v1/datasets/cats/models").json()["count"] == before
    r = felis.post(f"/v1/trainings/{tid}/cancel")
    assert r.status_code == 409 and r.json()["error"]["code"] == "training_finished"


def test_thresholds_set_directly_or_by_precision_change_the_decision(felis, trained):
    r = felis.put("/v1/datasets/cats/models/1/thresholds/cat", json={"min_precision": 0.95})
    assert r.status_code == 200, r.text
    t = r.json()["thresholds"]["cat"]
    assert 0.0 <= t <= 1.0
    r = felis.put("/v1/datasets/cats/models/1/thresholds/cat", json={"threshold": 1.0})
    assert r.json()["thresholds"] == {"cat": 1.0}
    img = _test_images("cat")[0]
    pred = felis.post("/v1/datasets/cats/predict?version=1", files=[("files", (img.name, img.read_bytes()))]).json()
    p = pred["predictions"][0]
    assert p["decision"] == ("cat" if p["probabilities"]["cat"] >= 1.0 else "noncat")
    r = felis.put("/v1/datasets/cats/models/1/thresholds/dog", json={"threshold": 0.5})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_label"
    r = felis.put("/v1/datasets/cats/models/1/thresholds/cat", json={})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_threshold"
