"""FELIS_STORAGE_BACKEND=s3 end to end: a real API process and a real Celery worker process, their
blobs in a bucket on an S3-compatible server the test starts (moto's server mode, on loopback).
Upload, train, predict, download: every image and model file goes to the bucket, under the prefix,
and nothing to the local blob folder."""

from __future__ import annotations

import time

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from models.checkpoint import load_checkpoint
from tests.conftest import ASSETS, zip_folder
from tests.utils.processes import Proc, felis_env, free_port, wait_ready, wait_training
from tests.utils.s3 import REGION, MotoServer, aws_env, start_moto

pytestmark = pytest.mark.timeout(600)

CIFAR_CAT = ASSETS / "cifar-cat"
PREFIX = "felis-e2e/"


@pytest.fixture(scope="module")
def s3_felis(tmp_path_factory) -> Iterator[tuple[httpx.Client, MotoServer, str, Path]]:
    """(a client of the API, the S3 server, the bucket, the data dir): API and worker as separate
    processes, SQLite and the filesystem broker for metadata and jobs, S3 for every blob."""
    tmp = tmp_path_factory.mktemp("felis-s3")
    moto = start_moto(tmp / "moto")
    procs: list[Proc] = []
    try:
        bucket = moto.create_bucket()
        port = free_port()
        env = aws_env(felis_env(FELIS_DATA_DIR=str(tmp / "var"), FELIS_PORT=str(port), FELIS_STORAGE_BACKEND="s3",
                                FELIS_S3_BUCKET=bucket, FELIS_S3_PREFIX=PREFIX, FELIS_S3_ENDPOINT_URL=moto.endpoint,
                                FELIS_S3_REGION=REGION, FELIS_WORKER_METRICS_PORT="0",
                                # deleted datasets are removed by the workers' sweep: make it quick here
                                FELIS_TRAINING_SWEEP_SECONDS="1", FELIS_BLOB_GRACE_SECONDS="0"))
        procs = [Proc(["worker", "--queues", "gpu", "--concurrency", "1", "--hostname", f"s3-{port}@%h"], env,
                      tmp / "worker.log"),
                 Proc(["api", "--port", str(port)], env, tmp / "api.log")]
        wait_ready(f"http://127.0.0.1:{port}", procs)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            yield client, moto, bucket, tmp / "var"
    finally:
        for p in reversed(procs):
            p.stop()
        moto.stop()


def test_upload_train_predict_download_with_every_blob_in_the_bucket(s3_felis):
    felis, moto, bucket, data_dir = s3_felis
    ready = felis.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["storage"] == "ok", ready.text

    assert felis.post("/v1/datasets", json={"name": "pets"}).status_code == 201
    r = felis.post("/v1/datasets/pets/images",
                   files={"archive": ("train.zip", zip_folder(CIFAR_CAT / "train"), "application/zip")})
    assert r.status_code == 201, r.text
    assert r.json()["created"] == 32
    image_keys = moto.keys(bucket, PREFIX + "images/")
    assert len(image_keys) == 32

    r = felis.post("/v1/datasets/pets/trainings", json={"architecture": "simple_cnn", "epochs": 3, "seed": 1})
    assert r.status_code == 202, r.text
    done = wait_training(felis, r.json()["id"], timeout=300)
    assert done["status"] == "succeeded", done  # the worker read every image from the bucket
    assert done["model_version"] == 1

    img = min((CIFAR_CAT / "test" / "cat").iterdir())
    r = felis.post("/v1/datasets/pets/predict", files=[("files", (img.name, img.read_bytes(), "image/jpeg"))])
    assert r.status_code == 200, r.text
    pred = r.json()["predictions"][0]
    assert set(pred["probabilities"]) == {"cat", "noncat"}
    assert abs(sum(pred["probabilities"].values()) - 1) < 1e-4

    blob = felis.get("/v1/datasets/pets/models/1/download")
    assert blob.status_code == 200
    ckpt = load_checkpoint(blob.content)
    assert ckpt["labels"] == ["cat", "noncat"]
    model_keys = moto.keys(bucket, PREFIX + "models/")
    assert any(k.endswith("/model.pt") for k in model_keys), model_keys
    pt_key = next(k for k in model_keys if k.endswith("/model.pt"))
    assert moto.client().get_object(Bucket=bucket, Key=pt_key)["Body"].read() == blob.content
    if any(k.endswith("/model.onnx") for k in model_keys):
        graph = felis.get("/v1/datasets/pets/models/1/download", params={"format": "onnx"})
        assert graph.status_code == 200 and graph.content

    assert all(k.startswith(PREFIX) for k in moto.keys(bucket)), "every object lives under FELIS_S3_PREFIX"
    local = data_dir / "blobs"
    assert not local.exists() or not [p for p in local.rglob("*") if p.is_file()], "a blob went to local disk"


def test_deleting_the_dataset_removes_its_blobs_from_the_bucket(s3_felis):
    felis, moto, bucket, _ = s3_felis
    assert felis.post("/v1/datasets", json={"name": "scratch"}).status_code == 201
    paths = sorted((CIFAR_CAT / "test" / "noncat").iterdir())
    r = felis.post("/v1/datasets/scratch/images", data={"label": "noncat"},
                   files=[("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths])
    assert r.status_code == 201, r.text
    before = set(moto.keys(bucket, PREFIX + "images/"))
    assert len(before) >= len(paths)
    assert felis.delete("/v1/datasets/scratch").status_code == 204
    assert felis.get("/v1/datasets/scratch").status_code == 404  # gone at once; its blobs go in the background
    deadline = time.monotonic() + 60
    while len(before - set(moto.keys(bucket, PREFIX + "images/"))) < len(paths) and time.monotonic() < deadline:
        time.sleep(0.5)
    after = set(moto.keys(bucket, PREFIX + "images/"))
    assert len(before - after) == len(paths)  # its own images went; the other dataset's stayed
