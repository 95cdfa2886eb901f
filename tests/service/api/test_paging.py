"""Keyset pagination (service.domain.paging) of images and trainings through the API: a cursor
walks every row once in the list's order, rows added meanwhile neither repeat nor skip earlier
ones, offset and count keep working, and a cursor that is not this list's is a clear 422."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.conftest import asset_images


@pytest.fixture
def client(felis_env):
    from service.api.app import create_app

    with TestClient(create_app()) as c:
        yield c


def _upload(client, paths, label="cat"):
    r = client.post("/v1/datasets/pets/images", data={"label": label},
                    files=[("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths])
    assert r.status_code == 201, r.text


def _walk(client, path, limit, **params) -> list[dict]:
    out, cursor = [], None
    for _ in range(100):
        page = client.get(path, params={"limit": limit, **params, **({"cursor": cursor} if cursor else {})}).json()
        out += page["data"]
        cursor = page["next_cursor"]
        if cursor is None:
            return out
    raise AssertionError("the cursor never ended")


def test_images_walk_once_each_in_order_and_new_ones_come_last(client):
    client.post("/v1/datasets", json={"name": "pets"})
    cats, noncats = asset_images("train", "cat"), asset_images("train", "noncat")
    _upload(client, cats)
    by_offset = client.get("/v1/datasets/pets/images", params={"limit": 1000}).json()
    assert by_offset["next_cursor"] is None and by_offset["count"] == len(cats)
    walked = _walk(client, "/v1/datasets/pets/images", 5)
    assert [i["id"] for i in walked] == [i["id"] for i in by_offset["data"]]
    first = client.get("/v1/datasets/pets/images", params={"limit": 5}).json()
    assert first["count"] == len(cats) and len(first["data"]) == 5 and first["next_cursor"]
    _upload(client, noncats[:4], "noncat")  # added between two pages
    rest = _walk(client, "/v1/datasets/pets/images", 5, cursor=first["next_cursor"])
    ids = [i["id"] for i in first["data"] + rest]
    assert len(ids) == len(set(ids)) == len(cats) + 4 and ids[:len(cats)] == [i["id"] for i in by_offset["data"]]
    labelled = _walk(client, "/v1/datasets/pets/images", 3, label="noncat")
    assert [i["label"] for i in labelled] == ["noncat"] * 4


def test_trainings_walk_newest_first(client, monkeypatch):
    client.post("/v1/datasets", json={"name": "pets"})
    _upload(client, asset_images("train", "cat"))
    _upload(client, asset_images("train", "noncat"), "noncat")
    made = []
    for _ in range(7):  # each cancelled at once (queued): the cap on unfinished trainings never bites
        t = client.post("/v1/datasets/pets/trainings", json={"architecture": "simple_cnn", "epochs": 1}).json()
        assert client.post(f"/v1/trainings/{t['id']}/cancel").status_code == 200
        made.append(t["id"])
    walked = _walk(client, "/v1/datasets/pets/trainings", 3)
    assert [t["id"] for t in walked] == made[::-1]
    page = client.get("/v1/datasets/pets/trainings", params={"limit": 2, "offset": 2}).json()
    assert page["count"] == 7 and [t["id"] for t in page["data"]] == made[::-1][2:4]


@pytest.mark.parametrize("cursor", ["nonsense", "x" * 300, "W10", "WyJ0cmFpbmluZ3MiLCIyMDI2LTEyLTAyVDAwOjAwOjAwIiwiYSJd"])
def test_a_foreign_or_broken_cursor_is_a_clear_error(client, cursor):
    client.post("/v1/datasets", json={"name": "pets"})
    r = client.get("/v1/datasets/pets/images", params={"cursor": cursor})
    assert r.status_code == 422
    assert r.json()["error"]["code"] in ("invalid_cursor", "validation_error")  # too long: refused by the query's bound
    if r.json()["error"]["code"] == "invalid_cursor":  # before: Python's words ("'utf-8' codec can't decode byte 0x81")
        assert r.json()["error"]["message"] == ("not a cursor this list gave: send the next_cursor of the page before, "
                                                "unchanged, or leave cursor out for the first page")
