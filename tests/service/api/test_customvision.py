"""The Custom Vision API in-process (service/api/customvision): the key headers, status codes, the
error form, the body bounds, the signed image URLs, and classify on a version trained here.
tests/e2e/test_customvision_sdk.py runs Microsoft's own SDK against real processes."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image as PILImage

from tests.conftest import asset_images
from tests.utils.apps import isolated_client

T = "/customvision/v3.4-preview/training"
P = "/customvision/v3.1/prediction"


@pytest.fixture
def client(felis_env) -> Iterator[TestClient]:
    from service.api.app import create_app

    with TestClient(create_app()) as c:
        yield c


@pytest.fixture
def keyed(felis_env, monkeypatch) -> Iterator[tuple[TestClient, dict[str, str]]]:
    """Keys required; one felis key per scope."""
    monkeypatch.setenv("FELIS_API_KEYS_REQUIRED", "true")
    from service.api.app import create_app
    from service.config import get_settings
    from service.domain import keys
    from service.store.db import new_session

    get_settings.cache_clear()
    with new_session() as session:
        made = {scope: keys.create(session, [scope])[1] for scope in ("predict", "read", "write")}
    with TestClient(create_app()) as c:
        yield c, made


def _project(client: TestClient, name: str = "Pets", headers: dict | None = None) -> dict:
    r = client.post(f"{T}/projects", params={"name": name}, headers=headers or {})
    assert r.status_code == 200, r.text
    return r.json()


def _entry(data: bytes, tag_id: str, name: str = "x.jpg") -> dict:
    return {"name": name, "contents": base64.b64encode(data).decode(), "tagIds": [tag_id]}


def _noise_png(side: int) -> bytes:
    """A PNG of random pixels: it compresses to about 3 bytes a pixel."""
    rng = np.random.default_rng(side)
    out = io.BytesIO()
    PILImage.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


# --- keys -----------------------------------------------------------------------------------------


def test_a_write_key_is_a_training_key_in_any_letter_case_or_as_the_apim_header(keyed):
    client, made = keyed
    for header in ("Training-Key", "training-key", "TRAINING-KEY", "Ocp-Apim-Subscription-Key"):
        assert client.get(f"{T}/projects", headers={header: made["write"]}).status_code == 200, header
    assert client.post(f"{T}/projects", params={"name": "a"}, headers={"Training-key": made["write"]}).status_code == 200


def test_missing_wrong_and_felis_style_keys_are_refused_in_custom_visions_form(keyed):
    client, made = keyed
    for headers in ({}, {"Authorization": f"Bearer {made['write']}"}, {"Prediction-Key": made["write"]},
                    {"Training-Key": "an-old-azure-key"}):
        r = client.get(f"{T}/projects", headers=headers)
        assert r.status_code == 401, headers
        assert set(r.json()) == {"code", "message"} and r.json()["code"] == "Unauthorized"


def test_a_predict_key_classifies_but_never_trains_or_uploads(keyed):
    client, made = keyed
    r = client.post(f"{T}/projects", params={"name": "a"}, headers={"Training-Key": made["predict"]})
    assert r.status_code == 403 and r.json()["code"] == "Forbidden"
    project = _project(client, headers={"Training-Key": made["write"]})
    r = client.post(f"{T}/projects/{project['id']}/images/files", json={"images": []},
                    headers={"Training-Key": made["read"]})
    assert r.status_code == 403
    # a Prediction-Key reaches the prediction routes (and finds no published iteration)
    r = client.post(f"{P}/{project['id']}/classify/iterations/nope/image", headers={"Prediction-Key": made["predict"]},
                    files={"imageData": (None, b"x")})
    assert r.status_code == 404 and r.json()["code"] == "NotFound"


def test_without_required_keys_any_key_value_is_accepted(client):
    assert client.get(f"{T}/projects", headers={"Training-Key": "whatever-azure-gave-me"}).status_code == 200
    assert client.get(f"{T}/projects").status_code == 200


# --- status codes and the error form ----------------------------------------------------------


def test_projects_and_tags_status_codes_and_shapes(client):
    assert {d["name"] for d in client.get(f"{T}/domains").json()} >= {"General", "General [A2]"}
    project = _project(client, "Japanese Cherry")
    assert project["name"] == "Japanese Cherry" and project["felisDataset"] == "japanese-cherry"
    assert project["settings"]["classificationType"] == "Multiclass"
    second = _project(client, "Japanese Cherry")  # names need not be unique: the slug gets a suffix
    assert second["felisDataset"] == "japanese-cherry-2" and second["id"] != project["id"]
    r = client.post(f"{T}/projects/{project['id']}/tags", params={"name": "Japanese Cherry"})
    assert r.status_code == 200 and r.json()["imageCount"] == 0 and r.json()["type"] == "Regular"
    r = client.post(f"{T}/projects/{project['id']}/tags", params={"name": "Japanese Cherry"})
    assert r.status_code == 409 and r.json()["code"] == "BadRequestTagNameNotUnique"
    r = client.post(f"{T}/projects/{project['id']}/tags", params={"name": "Japanese  Cherry"})  # same slug, other name
    assert r.status_code == 200
    assert client.get("/v1/datasets/japanese-cherry").json()["name"] == "japanese-cherry"
    assert [t["name"] for t in client.get(f"{T}/projects/{project['id']}/tags").json()] == \
           ["Japanese Cherry", "Japanese  Cherry"]
    assert client.delete(f"{T}/projects/{second['id']}").status_code == 204
    assert client.get("/v1/datasets/japanese-cherry-2").status_code == 404  # the dataset went with it


def test_errors_are_top_level_code_and_message(client):
    missing = "00000000-0000-0000-0000-000000000000"
    r = client.get(f"{T}/projects/{missing}")
    assert r.status_code == 404 and r.json() == {"code": "NotFoundProject", "message": f"project {missing!r} does not exist"}
    r = client.post(f"{T}/projects", params={"name": "x", "classificationType": "Multilabel"})
    assert r.status_code == 422 and r.json()["code"] == "BadRequestNotSupported" and "multilabel" in r.json()["message"]
    r = client.post(f"{T}/projects", params={"name": "x", "domainId": "0732100f-1a38-4e49-a514-c9b44c697ab5"})
    assert r.json()["code"] == "BadRequestProjectUnknownDomain"
    r = client.post(f"{T}/projects")  # no name
    assert r.status_code == 400 and set(r.json()) == {"code", "message"} and r.json()["code"] == "BadRequest"
    assert client.get("/customvision/v2.0/training/projects").json()["code"] == "BadRequest"
    project = _project(client)
    r = client.post(f"{T}/projects/{project['id']}/train")
    assert r.json()["code"] == "BadRequestTrainingValidationFailed"
    r = client.get(f"{T}/projects/{project['id']}/iterations/{missing}")
    assert r.status_code == 404 and r.json()["code"] == "NotFoundIteration"


def test_refusals_made_before_the_route_runs_are_in_custom_visions_form(felis_env, monkeypatch):
    """A body over the limit by its Content-Length, a Host the server does not answer for and a
    state change from another site's page are refused in middleware, before any route runs: a
    Custom Vision SDK still gets {code, message}."""
    from service.api.app import create_app
    from service.config import get_settings

    monkeypatch.setenv("FELIS_MAX_REQUEST_BYTES", "50000")
    get_settings.cache_clear()
    with TestClient(create_app()) as c:
        project = _project(c)["id"]
        r = c.post(f"{P}/{project}/classify/iterations/prod/image", content=b"x" * 60_000,
                   headers={"content-type": "application/octet-stream"})
        assert r.status_code == 413 and r.json() == {"code": "BadRequestImageSizeBytes", "message": r.json()["message"]}
        r = c.get(f"{T}/projects", headers={"Host": "felis.example.net"})
        assert r.status_code == 403 and r.json() == {"code": "Forbidden", "message": r.json()["message"]}
        r = c.post(f"{T}/projects", params={"name": "x"}, headers={"Origin": "https://elsewhere.example"})
        assert r.status_code == 403 and set(r.json()) == {"code", "message"} and r.json()["code"] == "Forbidden"
        assert [p["id"] for p in c.get(f"{T}/projects").json()] == [project]


def test_a_lost_database_and_a_bug_answer_in_custom_visions_form(felis_env, monkeypatch):
    """503 ErrorServiceUnavailable while the metadata store is down, 500 ErrorUnknown for a bug:
    the SDK reads .error.code from both."""
    from sqlalchemy.exc import OperationalError

    from service.api.app import create_app
    from service.domain import customvision as cv

    def down(*a, **k):
        raise OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))

    def bug(*a, **k):
        raise KeyError("oops")

    with TestClient(create_app(), raise_server_exceptions=False) as c:
        monkeypatch.setattr(cv, "list_projects", down)
        r = c.get(f"{T}/projects")
        assert r.status_code == 503 and r.json() == {"code": "ErrorServiceUnavailable", "message": r.json()["message"]}
        monkeypatch.setattr(cv, "list_projects", bug)
        r = c.get(f"{T}/projects")
        assert r.status_code == 500 and r.json() == {"code": "ErrorUnknown", "message": "an unexpected error occurred"}


# --- bounded bodies ---------------------------------------------------------------------------


@pytest.fixture
def tagged(client) -> tuple[TestClient, str, str]:
    project = _project(client)
    tag = client.post(f"{T}/projects/{project['id']}/tags", params={"name": "Cat"}).json()
    return client, project["id"], tag["id"]


def test_create_images_from_files_answers_a_status_per_image(tagged):
    client, project, tag = tagged
    cats = [p.read_bytes() for p in asset_images("train", "cat")[:3]]
    batch = {"images": [_entry(cats[0], tag, "a.jpg"), _entry(cats[1], tag, "b.jpg"), _entry(b"not an image", tag),
                        _entry(cats[2], "11111111-1111-1111-1111-111111111111"),
                        {"name": "no-tag.jpg", "contents": base64.b64encode(cats[2]).decode()}]}
    r = client.post(f"{T}/projects/{project}/images/files", json=batch)
    assert r.status_code == 207 and r.json()["isBatchSuccessful"] is False
    assert [i["status"] for i in r.json()["images"]] == ["OK", "OK", "ErrorImageFormat", "ErrorInvalidTag", "ErrorInvalidTag"]
    image = r.json()["images"][0]["image"]
    assert image["tags"][0]["tagId"] == tag and image["width"] == 32
    r = client.post(f"{T}/projects/{project}/images/files", json={"images": [_entry(cats[0], tag)]})
    assert r.status_code == 207 and r.json()["images"][0]["status"] == "OKDuplicate"
    r = client.post(f"{T}/projects/{project}/images/files", json={"images": [_entry(cats[2], tag)]})
    assert r.status_code == 200 and r.json()["isBatchSuccessful"] is True
    assert client.get(f"{T}/projects/{project}/tags").json()[0]["imageCount"] == 3


def test_the_batch_caps_are_custom_visions_and_hold_while_reading(tagged, monkeypatch):
    from service.api.customvision import bodies

    client, project, tag = tagged
    assert (bodies.MAX_BATCH_IMAGES, bodies.MAX_IMAGE_BYTES) == (64, 6 * 1024 * 1024)  # Custom Vision's own
    monkeypatch.setattr(bodies, "MAX_BATCH_IMAGES", 2)
    monkeypatch.setattr(bodies, "MAX_IMAGE_BYTES", 2000)
    small, large = asset_images("train", "cat")[0].read_bytes(), b"\xff" * 2001
    assert len(small) <= 2000
    r = client.post(f"{T}/projects/{project}/images/files", json={"images": [_entry(small, tag)] * 3})
    assert r.status_code == 413 and r.json()["code"] == "BadRequestExceededBatchSize"
    r = client.post(f"{T}/projects/{project}/images/files", json={"images": [_entry(large, tag), _entry(small, tag)]})
    assert [i["status"] for i in r.json()["images"]] == ["ErrorImageSize", "OK"]
    # a declared body over the cap is refused before it is read
    limit = bodies.batch_body_limit()
    r = client.post(f"{T}/projects/{project}/images/files", content=b"{}",
                    headers={"content-type": "application/json", "content-length": str(limit + 1)})
    assert r.status_code == 413 and r.json()["code"] == "BadRequestImageSizeBytes"
    # and an undeclared (chunked) one as soon as it passes it
    r = client.post(f"{T}/projects/{project}/images/files", content=iter([b'{"images": [', b" " * (limit + 10), b"]}"]),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["code"] == "BadRequestImageSizeBytes"
    for body in (b"{not json", b'{"images": [{"contents": "@@@@"}]}', b'{"images": 3}', b"[]"):
        r = client.post(f"{T}/projects/{project}/images/files", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["code"] == "BadRequestImageBatch", body


def test_the_batch_parser_keeps_one_chunk_in_memory_and_stops_at_the_65th_image():
    """The parser itself, fed in 64 KiB chunks: a 6 MiB image never sits in memory whole (only the
    chunk being decoded), and the 65th image is refused before any of its bytes are pulled."""
    from service.api.customvision import bodies
    from service.errors import TooLarge

    image = bytes(range(256)) * (6 * 1024 * 1024 // 256)
    entry = json.dumps({"name": "big.jpg", "contents": base64.b64encode(image).decode(), "tagIds": ["t"]}).encode()
    body = b'{"tagIds": ["b"], "images": [' + entry + b"]}"
    chunks = [body[i:i + 65536] for i in range(0, len(body), 65536)]
    largest = 0

    def reader(chunks: list[bytes]) -> bodies._Reader:
        it = iter(chunks)
        r = bodies._Reader(lambda: next(it, None), bodies.batch_body_limit())
        fill = r.fill

        def watched_fill() -> bool:
            nonlocal largest
            ok = fill()
            largest = max(largest, len(r.buf))
            return ok

        r.fill = watched_fill
        return r

    images, batch_tags = bodies._parse_batch(reader(chunks), 64, bodies.MAX_IMAGE_BYTES)
    assert batch_tags == ["b"] and images[0].tag_ids == ["t"] and images[0].status is None
    images[0].file.seek(0)
    assert images[0].file.read() == image
    assert largest <= 2 * 65536
    # 65 small images: the 65th is refused as it begins
    small = json.dumps({"name": "s", "contents": base64.b64encode(b"abc").decode()}).encode()
    pulled = []
    parts = [b'{"images": ['] + [small + b"," for _ in range(64)] + [small + b"]}"]
    it = iter(parts)
    r = bodies._Reader(lambda: (lambda c: pulled.append(c) or c)(next(it, None)), 10**9)
    with pytest.raises(TooLarge):
        bodies._parse_batch(r, 64, 1000)
    assert len(pulled) <= 66  # never the 65th image's own chunk and what follows


def test_create_images_from_data_reads_multipart_parts_without_a_filename_past_1_mib(tagged):
    client, project, tag = tagged
    big = _noise_png(700)
    assert 1024 * 1024 < len(big) < 6 * 1024 * 1024
    r = client.post(f"{T}/projects/{project}/images", params={"tagIds": tag}, files={"imageData": (None, big)})
    assert r.status_code == 200 and r.json()["images"][0]["status"] == "OK", r.text
    r = client.post(f"{T}/projects/{project}/images", params={"tagIds": tag},
                    content=asset_images("train", "cat")[0].read_bytes(), headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200 and r.json()["isBatchSuccessful"]


# --- signed URLs ------------------------------------------------------------------------------


def test_signed_urls_name_the_public_url_not_the_requests_host(felis_env, monkeypatch):
    """With FELIS_PUBLIC_URL set, the image URLs a response hands out point there whatever Host
    the request named (production checks no Host: a caller could have them point anywhere)."""
    monkeypatch.setenv("FELIS_PUBLIC_URL", "https://felis.example.com/")
    from service.api.app import create_app
    from service.config import get_settings

    get_settings.cache_clear()
    with TestClient(create_app()) as client:
        project = _project(client)["id"]
        tag = client.post(f"{T}/projects/{project}/tags", params={"name": "Cat"}).json()["id"]
        data = asset_images("train", "cat")[0].read_bytes()
        client.post(f"{T}/projects/{project}/images/files", json={"images": [_entry(data, tag)]})
        [image] = client.get(f"{T}/projects/{project}/images/tagged", headers={"Host": "testserver"}).json()
    for key in ("originalImageUri", "thumbnailUri", "resizedImageUri"):
        assert image[key].startswith("https://felis.example.com/customvision/content/images/"), image[key]


def test_tagged_images_have_signed_expiring_urls_that_need_no_key(keyed, monkeypatch):
    from urllib.parse import parse_qs, urlsplit

    client, made = keyed
    h = {"Training-Key": made["write"]}
    project = _project(client, headers=h)["id"]
    tag = client.post(f"{T}/projects/{project}/tags", params={"name": "Cat"}, headers=h).json()["id"]
    data = asset_images("train", "cat")[0].read_bytes()
    client.post(f"{T}/projects/{project}/images/files", json={"images": [_entry(data, tag)]}, headers=h)
    [image] = client.get(f"{T}/projects/{project}/images/tagged", headers=h).json()
    url = urlsplit(image["originalImageUri"])
    assert client.get(f"{url.path}?{url.query}").content == data  # no key sent
    thumb = urlsplit(image["thumbnailUri"])
    assert client.get(f"{thumb.path}?{thumb.query}").headers["content-type"] == "image/jpeg"
    query = parse_qs(url.query)
    expires, signature = int(query["expires"][0]), query["signature"][0]
    forged = [f"{url.path}?expires={expires + 3600}&signature={signature}",  # a longer life
              f"{url.path}?expires={expires}&signature={'0' * 64}",  # no signature of ours
              f"{thumb.path.rsplit('/', 1)[0]}/resized?expires={expires}&signature={signature}",  # another kind
              url.path.replace(image["id"], "00000000-0000-0000-0000-000000000000") + f"?{url.query}"]
    for target in forged:
        r = client.get(target)
        assert r.status_code == 403 and r.json()["code"] == "Forbidden", target
    monkeypatch.setattr(time, "time", lambda: expires + 1)  # an hour later
    r = client.get(f"{url.path}?{url.query}")
    assert r.status_code == 403 and "expired" in r.json()["message"]


# --- a trained, published iteration -------------------------------------------------------------


def _publish_a_trained_project(client: TestClient) -> tuple[str, dict[str, str]]:
    """A project with tags Cat and "Not a cat" (16 small images each), trained (in-process, the
    worker's task) and published as "prod": (project id, {"iteration": id, tag name: id})."""
    from service.domain import pipeline

    project = _project(client, "Cats")["id"]
    tags = {name: client.post(f"{T}/projects/{project}/tags", params={"name": name}).json()["id"]
            for name in ("Cat", "Not a cat")}
    for name, folder in (("Cat", "cat"), ("Not a cat", "noncat")):
        batch = {"images": [_entry(p.read_bytes(), tags[name], p.name) for p in asset_images("train", folder)]}
        assert client.post(f"{T}/projects/{project}/images/files", json=batch).json()["isBatchSuccessful"]
    iteration = client.post(f"{T}/projects/{project}/train").json()
    assert iteration["status"] == "Training"
    assert pipeline.run_training(iteration["felisTraining"]) == "succeeded"
    assert client.get(f"{T}/projects/{project}/iterations/{iteration['id']}").json()["status"] == "Completed"
    r = client.post(f"{T}/projects/{project}/iterations/{iteration['id']}/publish",
                    params={"publishName": "prod", "predictionId": "/subscriptions/x"})
    assert r.status_code == 200 and r.json() is True
    return project, {"iteration": iteration["id"], **tags}


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Iterator[tuple[TestClient, str, dict[str, str]]]:
    """_publish_a_trained_project in a data folder of its own, shared by the module's tests."""
    with isolated_client(tmp_path_factory.mktemp("customvision") / "var") as client:
        project, ids = _publish_a_trained_project(client)
        yield client, project, ids


def test_a_published_version_is_not_deleted_through_v1_unless_forced(tmp_path):
    """Deleting on /v1 the version a publish name serves would take the Custom Vision endpoint down
    (classify 404) and leave the name dangling: 409 version_published, as Custom Vision refuses to
    delete a published iteration; ?force=true deletes the version and its publish name together."""
    from service.domain import pipeline

    with isolated_client(tmp_path / "var") as client:
        project, _ = _publish_a_trained_project(client)  # version 1, published as "prod"
        dataset = client.get(f"{T}/projects/{project}").json()["felisDataset"]
        r = client.post(f"/v1/datasets/{dataset}/trainings", json={})
        assert r.status_code == 202, r.text
        assert pipeline.run_training(r.json()["id"]) == "succeeded"
        assert client.post(f"/v1/datasets/{dataset}/models/2/promote").status_code == 200  # 1 is no longer the default
        version, cat = 1, asset_images("test", "cat")[0].read_bytes()
        r = client.delete(f"/v1/datasets/{dataset}/models/{version}")
        assert r.status_code == 409 and r.json()["error"]["code"] == "version_published", r.text
        assert "prod" in r.json()["error"]["message"]
        r = client.post(f"{P}/{project}/classify/iterations/prod/image", content=cat)
        assert r.status_code == 200, r.text  # still served
        r = client.delete(f"/v1/datasets/{dataset}/models/{version}", params={"force": "true"})
        assert r.status_code == 204, r.text
        r = client.post(f"{P}/{project}/classify/iterations/prod/image", content=cat)
        assert r.status_code == 404 and r.json()["code"] == "NotFound", r.text  # the name went with it
        r = client.post(f"/v1/datasets/{dataset}/predict", params={"alias": "prod"}, files={"files": ("c.jpg", cat)})
        assert r.status_code == 404 and r.json()["error"]["code"] == "alias_not_found", r.text


def test_classify_reads_the_raw_body_and_answers_tags_likeliest_first(published):
    client, project, ids = published
    big = _noise_png(700)  # over Starlette's 1 MiB for a part without a filename
    for path in ("image", "image/nostore"):
        r = client.post(f"{P}/{project}/classify/iterations/prod/{path}", files={"imageData": (None, big)})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["project"] == project and body["iteration"] == ids["iteration"]
        assert {p["tagName"] for p in body["predictions"]} == {"Cat", "Not a cat"}
        assert {p["tagId"] for p in body["predictions"]} == {ids["Cat"], ids["Not a cat"]}
        probabilities = [p["probability"] for p in body["predictions"]]
        assert probabilities == sorted(probabilities, reverse=True)
    r = client.post(f"{P}/{project}/classify/iterations/prod/image", content=asset_images("test", "cat")[0].read_bytes(),
                    headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200
    assert sum(t["imageCount"] for t in client.get(f"{T}/projects/{project}/tags").json()) == 32  # nothing stored


def test_classify_bounds_and_errors(published):
    client, project, _ = published
    r = client.post(f"{P}/{project}/classify/iterations/prod/image", files={"imageData": (None, _noise_png(1300))})
    assert r.status_code == 413 and r.json()["code"] == "BadRequestImageSizeBytes"  # over Custom Vision's 4 MB
    r = client.post(f"{P}/{project}/classify/iterations/prod/image", files={"imageData": (None, b"not an image")})
    assert r.status_code == 422 and r.json()["code"] == "BadRequestImageFormat"
    r = client.post(f"{P}/{project}/classify/iterations/nope/image", files={"imageData": (None, b"x")})
    assert r.status_code == 404 and set(r.json()) == {"code", "message"}


def test_performance_publish_alias_and_iteration_rules(published):
    client, project, ids = published
    iteration = ids["iteration"]
    perf = client.get(f"{T}/projects/{project}/iterations/{iteration}/performance").json()
    assert {t["name"] for t in perf["perTagPerformance"]} == {"Cat", "Not a cat"}
    assert all(0 <= perf[k] <= 1 for k in ("precision", "recall", "averagePrecision"))
    dataset = client.get(f"{T}/projects/{project}").json()["felisDataset"]
    image = asset_images("test", "cat")[0]
    r = client.post(f"/v1/datasets/{dataset}/predict", params={"alias": "prod"},
                    files={"files": (image.name, image.read_bytes())})
    assert r.status_code == 200 and r.json()["model_version"] == 1
    r = client.post(f"/v1/datasets/{dataset}/predict", params={"alias": "nope"}, files={"files": (image.name, b"x")})
    assert r.status_code == 404 and r.json()["error"]["code"] == "alias_not_found"
    r = client.delete(f"{T}/projects/{project}/iterations/{iteration}")
    assert r.status_code == 409 and r.json()["code"] == "BadRequestCannotDeletePublishedIteration"
    assert client.get(f"{T}/projects/{project}/iterations/{iteration}").json()["publishName"] == "prod"


# --- classify_image_url: off by default, allow-listed hosts, public addresses only ----------------


@pytest.fixture
def image_server() -> Iterator[str]:
    """A local HTTP server: /cat.jpg, redirects, an endless body, a slow answer, a 404."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    cat = asset_images("test", "cat")[0].read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/cat.jpg":
                self._answer(200, cat, {"Content-Type": "image/jpeg"})
            elif self.path.startswith("/redirect/"):
                self._answer(302, b"", {"Location": self.path.removeprefix("/redirect/").replace("~", "/")})
            elif self.path == "/endless":  # no Content-Length, more than 4 MiB
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                for _ in range(80):
                    self.wfile.write(b"\0" * 65536)
            elif self.path == "/slow":
                time.sleep(2)
                self._answer(200, cat, {})
            else:
                self._answer(404, b"", {})

        def _answer(self, status: int, body: bytes, headers: dict) -> None:
            self.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def url_hosts(monkeypatch):
    """Sets FELIS_CUSTOMVISION_URL_HOSTS for the test (the app reads its settings per request)."""
    from service.config import get_settings

    def set_hosts(value: str) -> None:
        monkeypatch.setenv("FELIS_CUSTOMVISION_URL_HOSTS", value)
        get_settings.cache_clear()

    yield set_hosts
    monkeypatch.delenv("FELIS_CUSTOMVISION_URL_HOSTS", raising=False)
    get_settings.cache_clear()


def _classify_url(client: TestClient, project: str, url: str):
    return client.post(f"{P}/{project}/classify/iterations/prod/url", json={"url": url})


def test_classify_image_url_is_off_by_default_and_never_fetches_loopback(published, image_server, url_hosts):
    client, project, _ = published
    r = _classify_url(client, project, f"{image_server}/cat.jpg")
    assert r.status_code == 422 and r.json()["code"] == "BadRequestNotSupported" and "off" in r.json()["message"]
    url_hosts("127.0.0.1,localhost")  # listed, but loopback all the same
    r = _classify_url(client, project, f"{image_server}/cat.jpg")
    assert r.status_code == 403 and r.json()["code"] == "BadRequestImageUrl" and "private" in r.json()["message"]
    for bad in ("file:///etc/passwd", "http://user:pw@127.0.0.1/x", "not a url"):
        assert _classify_url(client, project, bad).json()["code"] == "BadRequestImageUrl", bad


def test_classify_image_url_follows_checked_redirects_within_size_and_time(published, image_server, url_hosts,
                                                                            monkeypatch):
    from service.api.customvision import fetch

    client, project, ids = published
    monkeypatch.setattr(fetch, "_public", lambda ip: True)  # this test's server is on loopback
    url_hosts("127.0.0.1")
    for path in ("url", "url/nostore"):
        r = client.post(f"{P}/{project}/classify/iterations/prod/{path}", json={"url": f"{image_server}/cat.jpg"})
        assert r.status_code == 200, r.text
        assert {p["tagId"] for p in r.json()["predictions"]} == {ids["Cat"], ids["Not a cat"]}
    assert _classify_url(client, project, f"{image_server}/redirect/~cat.jpg").status_code == 200
    r = _classify_url(client, project, f"{image_server}/redirect/http:~~localhost~cat.jpg")  # not on the list
    assert r.status_code == 403 and "localhost" in r.json()["message"]
    r = _classify_url(client, project, f"{image_server}/redirect/~redirect~~redirect~~redirect~~redirect~~cat.jpg")
    assert r.status_code == 422 and "redirects" in r.json()["message"]
    r = _classify_url(client, project, f"{image_server}/endless")
    assert r.status_code == 413 and r.json()["code"] == "BadRequestImageSizeBytes"
    monkeypatch.setattr(fetch, "FETCH_SECONDS", 0.5)
    r = _classify_url(client, project, f"{image_server}/slow")
    assert r.status_code == 422 and "did not answer" in r.json()["message"]
    assert _classify_url(client, project, f"{image_server}/missing").json()["message"].endswith("HTTP 404")
    r = client.post(f"{P}/{project}/classify/iterations/prod/url", content=b"x" * 9000)
    assert r.status_code == 413


@pytest.mark.parametrize(("address", "public"), [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("127.0.0.1", False), ("10.1.2.3", False),
    ("192.168.0.1", False), ("172.16.0.1", False), ("169.254.169.254", False), ("100.64.0.1", False),
    ("0.0.0.0", False), ("::1", False), ("fe80::1", False), ("fc00::1", False), ("::ffff:127.0.0.1", False),
    ("::ffff:8.8.8.8", True), ("224.0.0.1", False),
])
def test_only_public_addresses_are_fetched(address, public):
    import ipaddress

    from service.api.customvision import fetch

    assert fetch._public(ipaddress.ip_address(address)) is public


def test_a_name_with_any_private_address_is_refused(monkeypatch):
    """DNS rebinding: one public and one private address is refused; the checked address is the one connected to."""
    import anyio

    from service.api.customvision import fetch
    from service.errors import Forbidden

    async def resolve(host, port, **kw):
        return [(2, 1, 6, "", ("8.8.8.8", port)), (2, 1, 6, "", ("10.0.0.5", port))]

    monkeypatch.setattr(fetch.anyio, "getaddrinfo", resolve)
    with pytest.raises(Forbidden):
        anyio.run(fetch.public_address, "images.example.com", 443)

    async def public_only(host, port, **kw):
        return [(2, 1, 6, "", ("8.8.8.8", port))]

    monkeypatch.setattr(fetch.anyio, "getaddrinfo", public_only)
    assert anyio.run(fetch.public_address, "images.example.com", 443) == "8.8.8.8"
    assert fetch.host_allowed("a.images.example.com", ("*.example.com",))
    assert not fetch.host_allowed("example.com.evil.net", ("*.example.com", "example.com"))
