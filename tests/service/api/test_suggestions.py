"""Unlabeled images and suggested labels through the API, embedded mode (issue 15, part 3): 20
kaggle_ cats and 20 dogs labelled, 24 more photos uploaded without a label (loose files and a
zip's top level and unlabeled/ folder) plus one photo of a container ship; a default training
(in-process, as the worker runs it) ignores the unlabeled ones and suggests labels for them;
bulk labelling answers per item; images uploaded later get theirs from the worker's task
(run here as the task runs it). ~25 s."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import DATASETS, needs_datasets
from tests.utils.apps import isolated_client

pytestmark = needs_datasets()
PHOTOS = DATASETS / "photos"
SHIP = PHOTOS / "test" / "noncat" / "imagenet_n03095699_container_ship.JPEG"


def _kaggle(split: str, folder: str, n: int, skip: int = 0) -> list[Path]:
    return sorted((PHOTOS / split / folder).glob("kaggle_*"))[skip:skip + n]


def _files(paths: list[Path]) -> list[tuple]:
    return [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def _truth(filename: str) -> str:
    return "cat" if "cat" in filename.rsplit("/", 1)[-1].split(".")[0] else "dog"


UNLABELED_FILES = _kaggle("test", "cat", 8) + _kaggle("test", "noncat", 8) + [SHIP]
ZIPPED = {"top.jpg": _kaggle("test", "cat", 1, 8)[0], "unlabeled/a.jpg": _kaggle("test", "noncat", 1, 8)[0]}
ZIPPED.update({f"unlabeled/{p.name}": p for p in _kaggle("test", "cat", 3, 9) + _kaggle("test", "noncat", 3, 9)})


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[TestClient]:
    from service.domain import pipeline

    with isolated_client(tmp_path_factory.mktemp("suggestions") / "var") as client:
        assert client.post("/v1/datasets", json={"name": "pets"}).status_code == 201
        for label, folder in (("cat", "cat"), ("dog", "noncat")):
            r = client.post("/v1/datasets/pets/images", data={"label": label}, files=_files(_kaggle("train", folder, 20)))
            assert r.status_code == 201, r.text
        r = client.post("/v1/datasets/pets/images", files=_files(UNLABELED_FILES))  # no label: unlabeled
        assert r.status_code == 201 and all(x["label"] is None for x in r.json()["results"]), r.text
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for name, path in ZIPPED.items():
                z.writestr(name, path.read_bytes())
        r = client.post("/v1/datasets/pets/images", files={"archive": ("more.zip", buf.getvalue(), "application/zip")})
        assert r.status_code == 201 and r.json()["created"] == len(ZIPPED), r.text
        assert client.get("/v1/datasets/pets/suggestions").json()["error"]["code"] == "no_model"
        training = client.post("/v1/datasets/pets/trainings", json={}).json()
        assert pipeline.run_training(training["id"]) == "succeeded"
        yield client


def _all(client, order: str) -> dict:
    return client.get("/v1/datasets/pets/suggestions", params={"order": order, "limit": 1000}).json()


def test_the_unlabeled_images_are_counted_apart_and_not_trained_on(served):
    detail = served.get("/v1/datasets/pets").json()
    n = len(UNLABELED_FILES) + len(ZIPPED)
    assert detail["unlabeled_count"] == n and detail["label_counts"] == {"cat": 20, "dog": 20}
    assert detail["image_count"] == 40 + n
    assert served.get("/v1/datasets/pets/models/1").json()["snapshot"]["image_count"] == 40
    assert served.get("/v1/datasets/pets/images", params={"labeled": "false"}).json()["count"] == n
    # the reserved name reads as the folder it names (before: count 0, as no image has the label)
    for spelled in ("unlabeled", "Unlabeled"):
        assert served.get("/v1/datasets/pets/images", params={"label": spelled}).json()["count"] == n


def test_every_unlabeled_image_gets_a_suggestion_most_certain_first(served):
    body = _all(served, "certain")
    n = len(UNLABELED_FILES) + len(ZIPPED)
    assert body["version"] == 1 and body["count"] == n and body["pending"] == 0 and len(body["data"]) == n
    items = body["data"]
    for item in items:
        assert set(item) == {"image_id", "filename", "suggested_label", "probability", "ood", "ood_score"}
        assert item["suggested_label"] in ("cat", "dog") and 0.5 <= item["probability"] <= 1
    ship = next(i for i in items if i["filename"] == SHIP.name)
    flagged = [i["ood"] for i in items]
    assert ship["ood"] is True and flagged == sorted(flagged)  # certain: the open-set images last
    rest = [i for i in items if not i["ood"]]
    ood = [i for i in items if i["ood"]]
    assert [i["probability"] for i in rest] == sorted((i["probability"] for i in rest), reverse=True)
    right = sum(i["suggested_label"] == _truth(i["filename"]) for i in rest)
    assert right >= len(rest) - 1, rest  # kaggle_ test photos: nearly all right
    uncertain = _all(served, "uncertain")["data"]
    by_probability = lambda i: (i["probability"], i["image_id"])  # noqa: E731
    assert uncertain == sorted(ood, key=by_probability) + sorted(rest, key=by_probability)  # open-set images first
    page = served.get("/v1/datasets/pets/suggestions", params={"order": "certain", "limit": 2, "offset": 1}).json()
    assert page["data"] == items[1:3] and page["count"] == n
    assert served.get("/v1/datasets/pets/suggestions", params={"order": "random"}).status_code == 422


def test_the_suggestions_follow_the_versions_open_set_threshold(served):
    r = served.put("/v1/datasets/pets/models/1/ood-threshold", json={"threshold": 2.0})
    assert r.status_code == 200
    assert not any(i["ood"] for i in _all(served, "certain")["data"])
    threshold = r.json()["ood"]["threshold"]
    assert served.put("/v1/datasets/pets/models/1/ood-threshold", json={"flagged_fraction": 0.01}).status_code == 200
    assert threshold == 2.0 and any(i["ood"] for i in _all(served, "certain")["data"])


def test_bulk_labels_answer_per_item(served):
    items = _all(served, "certain")["data"]
    accept = [{"image_id": i["image_id"], "label": i["suggested_label"]} for i in items[:3]]
    r = served.post("/v1/datasets/pets/images/labels", json=accept)
    assert r.status_code == 200, r.text
    assert r.json()["applied"] == 3 and [x["status"] for x in r.json()["results"]] == ["labeled"] * 3
    after = _all(served, "certain")
    assert after["count"] == len(items) - 3 and {i["image_id"] for i in after["data"]}.isdisjoint(a["image_id"] for a in accept)
    assert served.get("/v1/datasets/pets").json()["label_counts"] == {
        "cat": 20 + sum(a["label"] == "cat" for a in accept), "dog": 20 + sum(a["label"] == "dog" for a in accept)}
    mixed = [{"image_id": accept[0]["image_id"], "label": None}, {"image_id": "nope", "label": "cat"},
             {"image_id": items[3]["image_id"], "label": "unlabeled"}, {"image_id": items[4]["image_id"], "label": "bad label!"}]
    r = served.post("/v1/datasets/pets/images/labels", json=mixed)
    assert r.status_code == 207, r.text
    results = r.json()["results"]
    assert [x["status"] for x in results] == ["unlabeled", "rejected", "rejected", "rejected"]
    assert [x["error"] and x["error"]["code"] for x in results] == [None, "image_not_found", "reserved_label", "invalid_label"]
    assert served.get(f"/v1/datasets/pets/images/{accept[0]['image_id']}").json()["label"] is None  # unlabeled again
    assert served.get(f"/v1/datasets/pets/images/{items[3]['image_id']}").json()["label"] is None  # unchanged
    assert accept[0]["image_id"] in {i["image_id"] for i in _all(served, "certain")["data"]}  # its suggestion is back


def test_bulk_label_requests_are_bounded(served):
    r = served.post("/v1/datasets/pets/images/labels", json=[{"image_id": "x", "label": "cat"}] * 1001)
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_items"
    r = served.post("/v1/datasets/pets/images/labels", content=b"[" + b" " * 300_000 + b"]",
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    for bad in (b"{not json", b'{"image_id": "x"}', b'[{"image_id": 5}]'):
        r = served.post("/v1/datasets/pets/images/labels", content=bad, headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error", bad


def test_images_uploaded_later_get_theirs_from_the_task(served, monkeypatch):
    from service.domain import datasets, suggesting, suggestions
    from service.store.db import new_session

    asked = []
    monkeypatch.setattr(suggestions, "request", asked.append)  # the broker is a folder nobody reads here
    later = _kaggle("test", "cat", 2, 20)
    assert served.post("/v1/datasets/pets/images", files=_files(later)).status_code == 201
    body = _all(served, "certain")
    assert body["pending"] == 2 and len(asked) == 1
    with new_session() as s:
        dataset_id = datasets.get(s, "pets").id
    assert asked == [dataset_id]
    assert suggesting.run_suggestions(dataset_id) == 2  # what the felis.suggest task runs
    assert suggesting.run_suggestions(dataset_id) == 0  # and again: nothing left to do
    body = _all(served, "certain")
    assert body["pending"] == 0 and {p.name for p in later} <= {i["filename"] for i in body["data"]}
    assert served.post("/v1/datasets/pets/images", data={"label": "cat"}, files=_files(_kaggle("test", "cat", 1, 30))).status_code == 201
    assert len(asked) == 1  # a labelled upload asks for nothing


def test_a_deleted_version_takes_its_suggestions(served):
    from service.domain import pipeline

    training = served.post("/v1/datasets/pets/trainings", json={}).json()
    assert pipeline.run_training(training["id"]) == "succeeded"  # version 2: its own suggestions, not the default yet
    assert served.post("/v1/datasets/pets/models/2/promote").status_code == 200
    assert _all(served, "certain")["version"] == 2 and _all(served, "certain")["pending"] == 0
    assert served.post("/v1/datasets/pets/models/1/promote").status_code == 200
    assert served.delete("/v1/datasets/pets/models/2").status_code == 204
    from service.store.db import new_session
    from service.store.tables import Suggestion

    with new_session() as s:
        assert s.query(Suggestion).filter_by(version=2).count() == 0 and s.query(Suggestion).filter_by(version=1).count() > 0


def test_unlabelling_asks_for_a_suggestion(served, monkeypatch):
    """An image labelled when the version trained has no suggestion: made unlabeled again (PATCH
    or POST .../labels with null), it must be asked for, or `pending` stays up until the next
    upload, promotion or training (before: neither asked)."""
    from service.domain import suggestions

    asked = []
    monkeypatch.setattr(suggestions, "request", asked.append)
    labelled = served.get("/v1/datasets/pets/images", params={"labeled": "true", "limit": 2}).json()["data"]
    assert served.patch(f"/v1/datasets/pets/images/{labelled[0]['id']}", json={"label": None}).status_code == 200
    assert len(asked) == 1
    r = served.post("/v1/datasets/pets/images/labels", json=[{"image_id": labelled[1]["id"], "label": None}])
    assert r.status_code == 200 and len(asked) == 2
    assert served.patch(f"/v1/datasets/pets/images/{labelled[0]['id']}", json={"label": "cat"}).status_code == 200
    assert len(asked) == 2  # labelling asks for nothing
