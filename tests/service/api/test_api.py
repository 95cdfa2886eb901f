"""The HTTP layer in-process: routing, error mapping, limits, readiness (no worker needed)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tests.conftest import asset_images


@pytest.fixture
def client(felis_env):
    from service.api.app import create_app

    with TestClient(create_app()) as c:
        yield c


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["checks"] == {"database": "ok", "storage": "ok", "broker": "ok"}


def test_dataset_lifecycle_and_error_shape(client):
    assert client.post("/v1/datasets", json={"name": "pets"}).status_code == 201
    r = client.post("/v1/datasets", json={"name": "pets"})
    assert r.status_code == 409 and r.json() == {"error": {"code": "dataset_exists", "message": "dataset 'pets' already exists"}}
    assert client.get("/v1/datasets").json()["count"] == 1
    assert client.get("/nowhere").json()["error"]["code"] == "not_found"
    assert client.put("/v1/datasets").json()["error"]["code"] == "method_not_allowed"
    r = client.post("/v1/datasets", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"


def test_the_dataset_list_shows_each_datasets_counts_in_a_fixed_number_of_queries(client):
    """GET /v1/datasets described each dataset with two queries of its own (its label counts,
    its unlabeled count): a page of 1,000 datasets made 2,000 queries. Each row still equals the
    dataset's own detail, and a page of 12 costs the same queries as a page of 2."""
    from sqlalchemy import event

    from service.store.db import get_engine

    cats, others = asset_images("train", "cat"), asset_images("train", "noncat")
    files = lambda paths: [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    for i in range(12):
        client.post("/v1/datasets", json={"name": f"set-{i:02d}"})
    client.post("/v1/datasets/set-01/images", data={"label": "cat"}, files=files(cats[:2]))
    client.post("/v1/datasets/set-01/images", data={"label": "Noncat"}, files=files(others[:1]))
    client.post("/v1/datasets/set-01/images", files=files(others[1:3]))  # unlabeled
    client.post("/v1/datasets/set-02/images", files=files(cats[2:3]))

    statements: list[str] = []
    listener = lambda conn, cursor, statement, *a: statements.append(statement)  # noqa: E731
    event.listen(get_engine(), "before_cursor_execute", listener)
    try:
        small = client.get("/v1/datasets", params={"limit": 2})
        n_small = len(statements)
        statements.clear()
        page = client.get("/v1/datasets", params={"limit": 100})
        n_page = len(statements)
    finally:
        event.remove(get_engine(), "before_cursor_execute", listener)
    assert small.status_code == 200 and page.status_code == 200
    assert n_page == n_small, (n_small, n_page)
    rows = page.json()["data"]
    assert page.json()["count"] == 12 and [r["name"] for r in rows] == [f"set-{i:02d}" for i in range(12)]
    for row in rows:
        assert row == client.get(f"/v1/datasets/{row['name']}").json()
    one, two = rows[1], rows[2]
    assert (one["labels"], one["label_counts"], one["unlabeled_count"], one["image_count"]) == (
        ["Noncat", "cat"], {"Noncat": 1, "cat": 2}, 2, 5)
    assert (two["labels"], two["unlabeled_count"], two["image_count"]) == ([], 1, 1)
    assert rows[0]["image_count"] == 0 and rows[0]["label_counts"] == {}


@pytest.mark.parametrize("body, content_type, message", [
    (b"{not json", "application/json", "body: not valid JSON at character 1 (Expecting property name enclosed in double quotes)"),
    (b'{"name": "pets"}', "text/plain", "body: send JSON with 'Content-Type: application/json' (this request's: text/plain)"),
    (b"name=pets", "application/x-www-form-urlencoded", "body: send JSON with 'Content-Type: application/json' "
                                                          "(this request's: application/x-www-form-urlencoded)"),
    (b"[1]", "application/json", "body: a JSON object is required"),
])
def test_a_body_that_is_no_json_object_says_why(client, body, content_type, message):
    """Before: '1: JSON decode error' (a character offset as the place), and for JSON sent as
    text/plain or a form 'Input should be a valid dictionary', though the body was one."""
    r = client.post("/v1/datasets", content=body, headers={"content-type": content_type})
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"
    assert r.json()["error"]["message"] == message


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_a_number_that_is_not_finite_is_named_so(client, value):
    """Python's JSON reader takes NaN and Infinity; the answer was 'Input should be less than or
    equal to 1' for a NaN threshold, which it is not, and not more than that either."""
    client.post("/v1/datasets", json={"name": "pets"})
    r = client.put("/v1/datasets/pets/models/1/thresholds/cat", content=f'{{"threshold": {value}}}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"
    assert r.json()["error"]["message"] == "threshold: must be a finite number, not " + ("NaN" if value == "NaN" else
                                                                                         "-inf" if value[0] == "-" else "inf")


def test_upload_statuses_201_207_422(client):
    client.post("/v1/datasets", json={"name": "pets"})
    cats = asset_images("train", "cat")
    files = lambda paths: [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    r = client.post("/v1/datasets/pets/images", data={"label": "cat"}, files=files(cats[:2]))
    assert r.status_code == 201 and r.json()["created"] == 2
    r = client.post("/v1/datasets/pets/images", data={"label": "cat"}, files=files(cats[1:3]))
    assert r.status_code == 207 and (r.json()["created"], r.json()["duplicates"]) == (1, 1)
    r = client.post("/v1/datasets/pets/images", data={"label": "cat"}, files=files(cats[:1]))
    assert r.status_code == 422 and r.json()["error"]["code"] == "no_images_created"
    listing = client.get("/v1/datasets/pets/images", params={"label": "cat", "limit": 2}).json()
    assert listing["count"] == 3 and len(listing["data"]) == 2
    assert client.get("/v1/datasets/pets/images", params={"label": "noncat"}).json()["count"] == 0


def test_a_label_with_an_archive_or_two_labels_are_refused_not_ignored(client):
    """A zip's folders are its labels: a `label` sent with `archive` was silently ignored (a flat
    zip stored unlabeled), and of two `label` fields the last won. Both are 422 now, nothing stored."""
    import io
    import zipfile

    client.post("/v1/datasets", json={"name": "pets"})
    cats = asset_images("train", "cat")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in cats[:3]:
            z.writestr(p.name, p.read_bytes())  # flat: no label folders
    r = client.post("/v1/datasets/pets/images", data={"label": "cat"},
                    files=[("archive", ("flat.zip", buf.getvalue(), "application/zip"))])
    assert r.status_code == 422 and r.json()["error"]["code"] == "label_with_archive", r.text
    r = client.post("/v1/datasets/pets/images", data={"label": ["cat", "dog"]},
                    files=[("files", (cats[0].name, cats[0].read_bytes(), "image/jpeg"))])
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_labels", r.text
    assert client.get("/v1/datasets/pets").json()["image_count"] == 0


def test_request_body_limit(felis_env, monkeypatch):
    monkeypatch.setenv("FELIS_MAX_REQUEST_BYTES", "1000")
    from service.api.app import create_app
    from service.config import get_settings

    get_settings.cache_clear()
    with TestClient(create_app()) as c:
        c.post("/v1/datasets", json={"name": "pets"})
        r = c.post("/v1/datasets/pets/images", data={"label": "cat"},
                   files=[("files", ("big.jpg", b"x" * 5000, "image/jpeg"))])
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_a_route_takes_the_body_it_declares_and_no_more(client):
    """64 KiB where a route declares nothing (by Content-Length, and counted when chunked), its own
    limit where it declares one (bulk labels: 256 KiB)."""
    assert client.post("/v1/datasets", json={"name": "pets"}).status_code == 201
    pad = json.dumps({"name": "pets2", "x": "y" * (70 * 1024)}).encode()
    for content in (pad, iter([pad])):
        r = client.post("/v1/datasets", content=content, headers={"content-type": "application/json"})
        assert (r.status_code, r.json()["error"]["code"]) == (413, "request_too_large"), r.text
    assert client.get("/v1/datasets/pets2").status_code == 404
    items = json.dumps([{"image_id": f"{i:032x}", "label": "cat"} for i in range(1000)]).encode()
    for total, status in ((250 * 1024, 207), (260 * 1024, 413)):
        body = items + b" " * (total - len(items))
        r = client.post("/v1/datasets/pets/images/labels", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == "request_too_large"


def test_not_multipart_is_a_clear_error(client):
    client.post("/v1/datasets", json={"name": "pets"})
    r = client.post("/v1/datasets/pets/images", json={"label": "cat"})
    assert r.status_code == 422
    assert r.json()["error"]["code"] in ("invalid_multipart", "empty_upload")


def test_training_requests_are_validated_before_queueing(client):
    client.post("/v1/datasets", json={"name": "pets"})
    r = client.post("/v1/datasets/pets/trainings", json={})
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_few_labels"
    assert client.get("/v1/datasets/pets/trainings").json()["count"] == 0


def test_openapi_lists_every_resource(client):
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/v1/datasets", "/v1/datasets/{name}/images", "/v1/datasets/{name}/trainings",
              "/v1/trainings/{training_id}", "/v1/datasets/{name}/models/{version}/promote",
              "/v1/datasets/{name}/predict", "/healthz", "/readyz"):
        assert p in paths


def test_a_client_that_goes_away_mid_upload_is_no_server_error(felis_env, caplog):
    """Before: an upload whose client disconnected (curl -m, a killed script, a resumable upload
    interrupted) logged 'unhandled error' with two tracebacks and counted as a 500, paging
    whoever watches the 5xx rate. It is the client's doing: 499, logged at info, no traceback."""
    import asyncio
    import logging

    from service.api.app import create_app

    app = create_app()
    with TestClient(app, base_url="http://localhost") as c:
        assert c.post("/v1/datasets", json={"name": "pets"}).status_code == 201
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + asset_images("train", "cat")[0].read_bytes()[:500]
    messages = iter([{"type": "http.request", "body": head, "more_body": True}, {"type": "http.disconnect"}])
    sent: list[dict] = []

    async def receive():
        return next(messages, {"type": "http.disconnect"})

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/datasets/pets/images", "raw_path": b"/v1/datasets/pets/images", "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 50000), "server": ("localhost", 80),
             "headers": [(b"host", b"localhost"), (b"content-type", f"multipart/form-data; boundary={boundary}".encode()),
                         (b"content-length", b"100000")]}
    with caplog.at_level(logging.INFO):
        asyncio.run(app(scope, receive, send))
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert starts and starts[0]["status"] == 499, sent
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    assert any("disconnected" in r.getMessage() for r in caplog.records)
