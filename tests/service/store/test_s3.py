"""service.store.blobs.S3BlobStore over real HTTP, against moto's S3 server started by the tests.

moto has no quotas, so the storage-full answers of the S3-compatible servers users run are injected:
the exact HTTP status and XML error body each server sends, handed to botocore in place of the
network answer (``before-send``), so botocore's own parser, retry logic and the store's mapping
all run as they would against the real server; one of them also goes over a real socket."""

from __future__ import annotations

import hashlib
import http.server
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.errors import NotFound, StorageFull, TooLarge, Unavailable
from service.store.blobs import S3BlobStore, image_key, make_store
from tests.conftest import asset_images
from tests.utils.processes import free_port
from tests.utils.s3 import REGION, MotoServer, start_moto

KEY = image_key("ab" + "c" * 62)

# Fast-failing settings for the tests that make the server go away: no test waits on defaults.
FAST = {"connect_timeout": 1, "read_timeout": 1, "max_attempts": 2}


def s3_store(server: MotoServer | str, bucket: str, prefix: str = "felis/", **kw) -> S3BlobStore:
    endpoint = server if isinstance(server, str) else server.endpoint
    return S3BlobStore(bucket, prefix, endpoint, REGION, **kw)


# --- the basics, on a real server -------------------------------------------------------------


def test_put_get_exists_delete_round_trip(moto_server, s3_bucket):
    store = s3_store(moto_server, s3_bucket)
    assert not store.exists(KEY)
    store.put(KEY, b"data")
    assert store.exists(KEY) and store.get(KEY) == b"data"
    store.put(KEY, b"new")  # overwrite: a PUT replaces the object as a whole
    assert store.get(KEY) == b"new"
    store.delete(KEY)
    assert not store.exists(KEY)
    store.delete(KEY)  # deleting what is gone is fine, as on local disk
    store.check()


def test_put_many_puts_every_object(moto_server, s3_bucket):
    store = s3_store(moto_server, s3_bucket)
    items = [(f"images/{i:02x}/{i:064x}", bytes([i]) * (i + 1)) for i in range(20)]
    store.put_many(items)
    assert all(store.get(k) == v for k, v in items)


def test_a_missing_key_is_not_found_blob_missing(moto_server, s3_bucket):
    with pytest.raises(NotFound) as exc:
        s3_store(moto_server, s3_bucket).get(KEY)
    assert exc.value.code == "blob_missing"


@pytest.mark.parametrize("prefix,stored_under", [
    ("felis/", "felis/"),
    ("tenant-a", "tenant-a/"),  # a missing trailing slash is not glued onto the key
    ("/nested/deeper/", "nested/deeper/"),
    ("", ""),
])
def test_objects_live_under_the_prefix(moto_server, s3_bucket, prefix, stored_under):
    s3_store(moto_server, s3_bucket, prefix).put(KEY, b"x")
    assert moto_server.keys(s3_bucket) == [stored_under + KEY]
    assert moto_server.client().get_object(Bucket=s3_bucket, Key=stored_under + KEY)["Body"].read() == b"x"


def test_two_prefixes_in_one_bucket_do_not_see_each_other(moto_server, s3_bucket):
    a, b = s3_store(moto_server, s3_bucket, "a/"), s3_store(moto_server, s3_bucket, "b/")
    a.put(KEY, b"a")
    assert not b.exists(KEY)
    with pytest.raises(NotFound):
        b.get(KEY)


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "a/./b", ""])
def test_keys_are_validated_as_on_local_disk(moto_server, s3_bucket, key):
    with pytest.raises(ValueError):
        s3_store(moto_server, s3_bucket).put(key, b"x")


def test_make_store_builds_it_from_the_settings(moto_server, s3_bucket, tmp_path):
    from service.config import Settings

    settings = Settings(data_dir=tmp_path, storage_backend="s3", s3_bucket=s3_bucket, s3_prefix="p/",
                        s3_endpoint_url=moto_server.endpoint, s3_region=REGION)
    store = make_store(settings)
    assert isinstance(store, S3BlobStore)
    store.put(KEY, b"x")
    assert moto_server.keys(s3_bucket) == ["p/" + KEY]
    assert not (tmp_path / "blobs").exists()


def test_timeouts_are_bounded_and_retries_standard(moto_server, s3_bucket):
    config = s3_store(moto_server, s3_bucket).client.meta.config
    assert config.connect_timeout <= 10 and config.read_timeout <= 60
    assert config.retries["mode"] == "standard" and 1 < config.retries["total_max_attempts"] <= 5


def test_without_boto3_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 now raises ImportError
    with pytest.raises(ImportError, match=r"felis\[s3\]"):
        S3BlobStore("bucket")


# --- readiness and outages --------------------------------------------------------------------


def test_check_on_a_missing_bucket_is_unavailable(moto_server, aws_credentials):
    store = s3_store(moto_server, "no-such-bucket-here")
    with pytest.raises(Unavailable) as exc:
        store.check()
    assert exc.value.code == "storage_unavailable" and "no-such-bucket-here" in exc.value.message
    with pytest.raises(Unavailable):  # and writing there is the same, not a raw botocore error
        store.put(KEY, b"x")


def test_no_credentials_is_a_clear_unavailable(moto_server, s3_bucket, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = s3_store(moto_server, s3_bucket, **FAST)
    started = time.monotonic()
    with pytest.raises(Unavailable) as exc:
        store.put(KEY, b"x")
    assert "credentials" in exc.value.message.lower() and exc.value.code == "storage_unavailable"
    assert time.monotonic() - started < 10


def _each_call_fails_fast(store: S3BlobStore, bound: float) -> None:
    for call in (lambda: store.put(KEY, b"x"), lambda: store.get(KEY), lambda: store.exists(KEY),
                 lambda: store.delete(KEY), store.check):
        started = time.monotonic()
        with pytest.raises(Unavailable) as exc:
            call()
        assert exc.value.code == "storage_unavailable"
        assert time.monotonic() - started < bound, "a storage outage must not hang a request"


def test_nothing_listening_is_unavailable_at_once(aws_credentials):
    _each_call_fails_fast(s3_store(f"http://127.0.0.1:{free_port()}", "bucket", **FAST), bound=8)


@pytest.fixture
def own_moto(tmp_path, aws_credentials) -> Iterator[MotoServer]:
    """A moto server of the test's own, to freeze and kill."""
    server = start_moto(tmp_path / "moto")
    try:
        yield server
    finally:
        server.stop()


def test_a_frozen_then_killed_server_is_unavailable_within_the_timeouts(own_moto):
    bucket = own_moto.create_bucket()
    store = s3_store(own_moto, bucket, **FAST)
    store.put(KEY, b"x")
    own_moto.pause()  # accepts connections, never answers: only the read timeout ends a call
    try:
        _each_call_fails_fast(store, bound=8)
    finally:
        own_moto.resume()
    # back when the server is (a fresh key: the server may yet apply the requests that timed out)
    other = image_key("cd" + "e" * 62)
    store.put(other, b"y")
    assert store.get(other) == b"y"
    own_moto.kill()
    _each_call_fails_fast(store, bound=8)


# --- error answers, injected as the servers send them -------------------------------------------


class _Raw:
    def __init__(self, body: bytes):
        self.body = body

    def stream(self, **_):
        yield self.body


def error_xml(code: str, message: str = "refused") -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<Key>{KEY}</Key><BucketName>b</BucketName><Resource>/b/{KEY}</Resource>"
            "<RequestId>17A4F3C6E2D1B0A9</RequestId><HostId>dd9025bab4ad464b</HostId></Error>").encode()


def answer(store: S3BlobStore, operation: str, status: int, code: str, *, times: int | None = None,
           after: int = 0) -> list[int]:
    """From now on ``operation`` (PutObject, HeadObject...) gets this error answer instead of going to
    the server: after the first ``after`` calls, and ``times`` times if given. Returns a list that
    counts the answers sent."""
    from botocore.awsrequest import AWSResponse

    body = b"" if operation.startswith("Head") else error_xml(code)
    sent: list[int] = []
    passed = [0]

    def handler(request, **_):
        if passed[0] < after:
            passed[0] += 1
            return None
        if times is not None and len(sent) >= times:
            return None
        sent.append(status)
        return AWSResponse(request.url, status, {"Content-Type": "application/xml",
                                                 "Content-Length": str(len(body))}, _Raw(body))

    store.client.meta.events.register(f"before-send.s3.{operation}", handler)
    return sent


# (HTTP status, S3 error code) each S3-compatible server sends when it is full or over quota
STORAGE_FULL_ANSWERS = [
    pytest.param(403, "QuotaExceeded", id="ceph-rgw-user-or-bucket-quota"),
    pytest.param(400, "XMinioAdminBucketQuotaExceeded", id="minio-bucket-quota"),
    pytest.param(507, "XMinioStorageFull", id="minio-drives-full"),
    pytest.param(500, "XMinioStorageFull", id="older-minio-and-seaweedfs-drives-full"),
    pytest.param(507, "InsufficientStorage", id="http-507-insufficient-storage"),
    pytest.param(507, "SomeOtherCode", id="any-http-507"),
]


@pytest.mark.parametrize("status,code", STORAGE_FULL_ANSWERS)
def test_storage_full_answers_are_storage_full(moto_server, s3_bucket, status, code):
    store = s3_store(moto_server, s3_bucket, **FAST)
    answer(store, "PutObject", status, code)
    with pytest.raises(StorageFull) as exc:
        store.put(KEY, b"x")
    assert exc.value.code == "storage_full" and code in exc.value.message
    assert moto_server.keys(s3_bucket) == []


def test_entity_too_large_is_too_large(moto_server, s3_bucket):
    store = s3_store(moto_server, s3_bucket, **FAST)
    answer(store, "PutObject", 400, "EntityTooLarge")
    with pytest.raises(TooLarge) as exc:
        store.put(KEY, b"x")
    assert exc.value.code == "blob_too_large"


@pytest.mark.parametrize("status,code", [(503, "SlowDown"), (500, "InternalError"), (503, "ServiceUnavailable")])
def test_throttling_and_server_errors_are_retried_then_unavailable(moto_server, s3_bucket, status, code):
    store = s3_store(moto_server, s3_bucket, **FAST)
    sent = answer(store, "PutObject", status, code)
    with pytest.raises(Unavailable) as exc:
        store.put(KEY, b"x")
    assert exc.value.code == "storage_unavailable" and len(sent) == FAST["max_attempts"]


def test_one_throttled_answer_is_retried_and_succeeds(moto_server, s3_bucket):
    store = s3_store(moto_server, s3_bucket, **FAST)
    answer(store, "PutObject", 503, "SlowDown", times=1)
    store.put(KEY, b"x")
    assert store.get(KEY) == b"x"


def test_access_denied_is_unavailable_not_a_missing_blob(moto_server, s3_bucket):
    store = s3_store(moto_server, s3_bucket, **FAST)
    answer(store, "HeadObject", 403, "AccessDenied")
    answer(store, "GetObject", 403, "AccessDenied")
    with pytest.raises(Unavailable):
        store.exists(KEY)  # not False: an upload would then rewrite what it cannot see
    with pytest.raises(Unavailable):
        store.get(KEY)


class _FullServer(http.server.BaseHTTPRequestHandler):
    """A socket that answers every request as a MinIO whose drives are full."""

    def _full(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = error_xml("XMinioStorageFull", "Storage backend has reached its minimum free drive threshold.")
        self.send_response(507)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_PUT = do_GET = do_HEAD = do_POST = _full

    def log_message(self, *_):
        pass


def test_storage_full_over_a_real_socket(aws_credentials):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FullServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        store = s3_store(f"http://127.0.0.1:{server.server_port}", "bucket", **FAST)
        with pytest.raises(StorageFull):
            store.put(KEY, b"x")
    finally:
        server.shutdown()
        server.server_close()


# --- through the API (in-process), FELIS_STORAGE_BACKEND=s3 pointed at moto ---------------------


@pytest.fixture
def s3_client(felis_env, moto_server, s3_bucket, monkeypatch) -> Iterator[TestClient]:
    from service.api.app import create_app
    from tests.conftest import _reset_caches

    monkeypatch.setenv("FELIS_STORAGE_BACKEND", "s3")
    monkeypatch.setenv("FELIS_S3_BUCKET", s3_bucket)
    monkeypatch.setenv("FELIS_S3_ENDPOINT_URL", moto_server.endpoint)
    monkeypatch.setenv("FELIS_S3_REGION", REGION)
    _reset_caches()
    with TestClient(create_app()) as c:
        yield c


def _cats(n: int) -> list:
    return [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in asset_images("train", "cat")[:n]]


def test_api_stores_images_in_the_bucket(s3_client, moto_server, s3_bucket, felis_env):
    r = s3_client.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"]["storage"] == "ok"
    s3_client.post("/v1/datasets", json={"name": "pets"})
    files = _cats(2)
    r = s3_client.post("/v1/datasets/pets/images", data={"label": "cat"}, files=files)
    assert r.status_code == 201, r.text
    image_id = r.json()["results"][0]["image_id"]
    assert s3_client.get(f"/v1/datasets/pets/images/{image_id}/content").content == files[0][1][1]
    keys = moto_server.keys(s3_bucket)
    assert len(keys) == 2 and all(k.startswith("felis/images/") for k in keys)
    assert not (felis_env / "blobs").exists() or not any((felis_env / "blobs").rglob("*"))
    key = "felis/" + image_key(hashlib.sha256(files[0][1][1]).hexdigest())
    assert key in keys
    moto_server.client().delete_object(Bucket=s3_bucket, Key=key)  # lost behind felis's back
    r = s3_client.get(f"/v1/datasets/pets/images/{image_id}/content")
    assert r.status_code == 404 and r.json()["error"]["code"] == "blob_missing"


@pytest.mark.parametrize("status,code", STORAGE_FULL_ANSWERS[:3])
def test_api_upload_over_quota_is_507_and_stores_no_row(s3_client, moto_server, s3_bucket, status, code):
    from service.store.blobs import get_store

    s3_client.post("/v1/datasets", json={"name": "pets"})
    answer(get_store(), "PutObject", status, code)
    r = s3_client.post("/v1/datasets/pets/images", data={"label": "cat"}, files=_cats(2))
    assert r.status_code == 507, r.text
    assert r.json()["error"]["code"] == "storage_full"
    assert s3_client.get("/v1/datasets/pets").json()["image_count"] == 0
    assert s3_client.get("/v1/datasets/pets/images").json()["count"] == 0
    assert moto_server.keys(s3_bucket) == []


def test_api_quota_hit_mid_upload_stores_no_row(s3_client, moto_server, s3_bucket):
    from service.store.blobs import get_store

    s3_client.post("/v1/datasets", json={"name": "pets"})
    answer(get_store(), "PutObject", 403, "QuotaExceeded", after=1)  # the first image is written, the second refused
    r = s3_client.post("/v1/datasets/pets/images", data={"label": "cat"}, files=_cats(3))
    assert r.status_code == 507 and r.json()["error"]["code"] == "storage_full"
    assert len(moto_server.keys(s3_bucket)) == 1  # at worst an unreferenced blob...
    assert s3_client.get("/v1/datasets/pets").json()["image_count"] == 0  # ...never a row the client was told failed


def test_readyz_is_503_when_the_bucket_is_missing(felis_env, moto_server, aws_credentials, monkeypatch):
    from service.api.app import create_app
    from tests.conftest import _reset_caches

    monkeypatch.setenv("FELIS_STORAGE_BACKEND", "s3")
    monkeypatch.setenv("FELIS_S3_BUCKET", "felis-not-created")
    monkeypatch.setenv("FELIS_S3_ENDPOINT_URL", moto_server.endpoint)
    _reset_caches()
    with TestClient(create_app()) as c:
        r = c.get("/readyz")
    assert r.status_code == 503
    assert r.json()["checks"]["storage"] == "unavailable"  # the detail (the bucket's name) goes to the log only
