"""The label-error report through the API, embedded mode (issue 15): 30 kaggle_ cats and 30 dogs
of photos/train, three of the dogs uploaded as "cat"; a default linear training (in-process, as
the worker's task runs it) reports them at the top, relabels and deletes show at once, versions
without a report answer 409, and the report's blob lives and dies with its version. ~20 s."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import DATASETS, needs_datasets
from tests.utils.apps import isolated_client

pytestmark = needs_datasets()
PHOTOS = DATASETS / "photos"


def _files(paths: list[Path]) -> list[tuple]:
    return [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def _kaggle(folder: str, n: int) -> list[Path]:
    return sorted((PHOTOS / "train" / folder).glob("kaggle_*"))[:n]


WRONG = _kaggle("noncat", 33)[30:]  # three dogs, uploaded as cats


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[TestClient]:
    from models.checkpoint import checkpoint_bytes, load_checkpoint
    from service.domain import datasets, pipeline, versions
    from service.store.blobs import get_store
    from service.store.db import new_session

    with isolated_client(tmp_path_factory.mktemp("label-issues") / "var") as client:
        assert client.post("/v1/datasets", json={"name": "pets"}).status_code == 201
        for label, paths in (("cat", _kaggle("cat", 30) + WRONG), ("dog", _kaggle("noncat", 30))):
            r = client.post("/v1/datasets/pets/images", data={"label": label}, files=_files(paths))
            assert r.status_code == 201, r.text
        training = client.post("/v1/datasets/pets/trainings", json={"label_issues": "keep"}).json()
        assert pipeline.run_training(training["id"]) == "succeeded"
        store, session = get_store(), new_session()
        try:  # version 2: the same checkpoint imported, as a version without a report
            dataset = datasets.get(session, "pets")
            ckpt = load_checkpoint(store.get(versions.get(session, dataset, 1).checkpoint_key))
            assert pipeline.import_checkpoint(session, store, dataset, checkpoint_bytes(ckpt)) == 2
        finally:
            session.close()
        yield client


def test_the_mislabelled_photos_come_first(served):
    r = served.get("/v1/datasets/pets/label-issues")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == 1 and body["count"] == len(body["data"]) >= 2
    top = body["data"][:4]
    wrong = {p.name for p in WRONG}
    assert len(wrong & {i["filename"] for i in top}) >= 2, body  # at least two of the three, near the top
    for item in body["data"]:
        assert set(item) == {"image_id", "filename", "label", "current_label", "suggested_label", "score"}
        assert item["label"] == item["current_label"] and item["suggested_label"] != item["label"]
        assert 0 <= item["score"] <= 1
        if item["filename"] in wrong:
            assert (item["label"], item["suggested_label"]) == ("cat", "dog")
    scores = [i["score"] for i in body["data"]]
    assert scores == sorted(scores, reverse=True)
    assert served.get("/v1/datasets/pets/models/1").json()["label_issue_count"] == body["count"]
    page = served.get("/v1/datasets/pets/label-issues", params={"limit": 1, "offset": 1}).json()
    assert page["count"] == body["count"] and page["data"] == body["data"][1:2]


def test_a_relabel_and_a_delete_show_at_once(served):
    before = served.get("/v1/datasets/pets/label-issues").json()
    first, second = before["data"][:2]
    assert served.patch(f"/v1/datasets/pets/images/{first['image_id']}", json={"label": first["suggested_label"]}).status_code == 200
    assert served.delete(f"/v1/datasets/pets/images/{second['image_id']}").status_code == 204
    after = served.get("/v1/datasets/pets/label-issues").json()
    assert after["count"] == before["count"] - 1
    relabelled = next(i for i in after["data"] if i["image_id"] == first["image_id"])
    assert (relabelled["label"], relabelled["current_label"]) == (first["label"], first["suggested_label"])
    assert second["image_id"] not in {i["image_id"] for i in after["data"]}


def test_versions_without_a_report_and_unknown_ones(served):
    r = served.get("/v1/datasets/pets/label-issues", params={"version": 2})
    assert r.status_code == 409 and r.json()["error"]["code"] == "label_issues_unavailable"
    assert served.get("/v1/datasets/pets/models/2").json()["label_issue_count"] is None
    r = served.get("/v1/datasets/pets/label-issues", params={"version": 9})
    assert r.status_code == 404 and r.json()["error"]["code"] == "version_not_found"
    assert served.get("/v1/datasets/nope/label-issues").status_code == 404
    for bad in ({"limit": 0}, {"offset": -1}, {"version": 0}, {"limit": 1001}):
        assert served.get("/v1/datasets/pets/label-issues", params=bad).status_code == 422


def test_the_report_blob_goes_with_its_version(served):
    from service.domain import datasets, versions
    from service.store.blobs import get_store
    from service.store.db import new_session

    store, session = get_store(), new_session()
    try:
        key = versions.get(session, datasets.get(session, "pets"), 1).heldout_key
        assert key and key.endswith("/heldout.npz") and store.exists(key)
    finally:
        session.close()
    assert served.post("/v1/datasets/pets/models/2/promote").status_code == 200
    assert served.delete("/v1/datasets/pets/models/1").status_code == 204
    assert not store.exists(key)
    r = served.get("/v1/datasets/pets/label-issues")  # the default is now version 2: no report
    assert r.status_code == 409
