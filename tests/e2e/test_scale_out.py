"""Production mode scaled out, with real Redis and PostgreSQL: two workers and two API processes.

Four concurrent trainings on two datasets each complete exactly once with distinct, consecutive
versions; both API processes answer the same; a worker SIGKILLed mid-training loses nothing: its
training is picked up again (lease expired) and finishes on the other worker. A linear training's
features fan out as shards over both workers, and a worker killed mid-shard costs only that shard."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import ASSETS, DATASETS, needs_datasets, zip_folder
from tests.utils.processes import (Proc, create_postgres_database, felis_env, free_port, redis_database, wait_ready,
                                   wait_training)

pytestmark = pytest.mark.timeout(900)

OPTIONS = {"architecture": "simple_cnn", "epochs": 40, "seed": 3}
SHARD = 300  # images per feature shard (the fine-tuning trainings above have no shards)


@pytest.fixture
def cluster(tmp_path):
    db_url, drop = create_postgres_database()
    env = felis_env(FELIS_MODE="embedded", FELIS_DATA_DIR=str(tmp_path / "shared"), FELIS_DATABASE_URL=db_url,
                    FELIS_BROKER_URL=redis_database(), FELIS_TRAINING_LEASE_SECONDS="6", FELIS_DB_RETRY_SECONDS="3",
                    FELIS_TORCH_THREADS="1", FELIS_FEATURE_SHARD_IMAGES=str(SHARD))
    ports = [free_port(), free_port()]
    apis = [Proc(["api", "--port", str(p)], env, tmp_path / f"api{i}.log") for i, p in enumerate(ports)]
    wait_ready(f"http://127.0.0.1:{ports[0]}", apis)
    workers = [Proc(["worker", "--queues", "gpu", "--concurrency", "1", "--hostname", f"w{i}-{ports[0]}@%h"],
                    env, tmp_path / f"worker{i}.log") for i in range(2)]
    clients = [httpx.Client(base_url=f"http://127.0.0.1:{p}", timeout=120) for p in ports]
    try:
        for c in clients:
            wait_ready(str(c.base_url), apis + workers)
        yield clients, workers
    finally:
        for c in clients:
            c.close()
        for p in workers + apis:
            p.stop()
        drop()


def _dataset(client: httpx.Client, name: str) -> None:
    assert client.post("/v1/datasets", json={"name": name}).status_code == 201
    r = client.post(f"/v1/datasets/{name}/images",
                    files={"archive": ("set.zip", zip_folder(ASSETS / "cifar-cat" / "train"), "application/zip")})
    assert r.status_code == 201, r.text


def test_concurrent_trainings_on_two_workers_each_finish_once(cluster):
    (a, b), workers = cluster
    _dataset(a, "alpha")
    _dataset(b, "beta")
    ids = [c.post(f"/v1/datasets/{name}/trainings", json=OPTIONS).json()["id"]
           for c, name in ((a, "alpha"), (b, "beta"), (b, "alpha"), (a, "beta"))]
    done = [wait_training(a, i) for i in ids]
    assert [d["status"] for d in done] == ["succeeded"] * 4, done
    for name in ("alpha", "beta"):
        versions = sorted(v["version"] for v in a.get(f"/v1/datasets/{name}/models").json()["data"])
        assert versions == [1, 2]
    assert len({(d["dataset"], d["model_version"]) for d in done}) == 4
    img = sorted((ASSETS / "cifar-cat" / "test" / "cat").iterdir())[0].read_bytes()
    answers = [c.post("/v1/datasets/alpha/predict", files={"files": ("x.jpg", img)}).json() for c in (a, b)]
    assert answers[0]["predictions"] == answers[1]["predictions"]
    assert answers[0]["model_version"] == answers[1]["model_version"] == 1
    # both workers took part
    assert len({a.get(f"/v1/trainings/{i}").json()["worker"] for i in ids}) == 2


def test_a_worker_killed_mid_training_loses_nothing(cluster):
    (a, b), workers = cluster
    _dataset(a, "gamma")
    slow = {**OPTIONS, "epochs": 150}
    ids = [a.post("/v1/datasets/gamma/trainings", json=slow).json()["id"] for _ in range(2)]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # both running, one per worker
        states = [a.get(f"/v1/trainings/{i}").json() for i in ids]
        if all(s["status"] == "running" and s["progress"].get("epoch") for s in states):
            break
        time.sleep(0.3)
    else:
        pytest.fail(f"trainings did not both start: {states}")
    workers[0].kill_group()
    # the killed worker's training: lease expires, it is queued again and the survivor finishes it
    done = [wait_training(b, i, timeout=600) for i in ids]
    assert [d["status"] for d in done] == ["succeeded", "succeeded"], done
    assert sorted(d["model_version"] for d in done) == [1, 2]
    assert max(d["attempts"] for d in done) == 2
    assert a.get("/v1/datasets/gamma/models").json()["count"] == 2


def _photos_zip(per_label: int) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for label in ("cat", "noncat"):
            for path in sorted((DATASETS / "photos" / "train" / label).iterdir())[:per_label]:
                zf.write(path, f"{label}/{path.name}")
    return buf.getvalue()


@needs_datasets()
def test_a_linear_trainings_features_fan_out_over_both_workers_and_a_kill_costs_one_shard(cluster):
    """1,200 real photos, shards of 300: both workers compute shards at once; worker 0 is SIGKILLed
    while its shard is half done; that shard alone is computed again (by worker 1, after its lease),
    the other three are not, and the training succeeds with every feature computed by the shards."""
    (a, b), workers = cluster
    assert a.post("/v1/datasets", json={"name": "photos"}).status_code == 201
    r = a.post("/v1/datasets/photos/images", files={"archive": ("p.zip", _photos_zip(600), "application/zip")})
    assert r.status_code == 201, r.text
    tid = a.post("/v1/datasets/photos/trainings", json={"seed": 1}).json()["id"]
    seen: dict[int, set[str]] = {}
    both, victim = False, None
    deadline = time.monotonic() + 300
    while victim is None and time.monotonic() < deadline:
        body = a.get(f"/v1/trainings/{tid}").json()
        assert body["status"] in ("queued", "running", "extracting"), body
        shards = body["progress"].get("shards", []) if body["status"] == "extracting" else []
        running = [sh for sh in shards if sh["status"] == "running"]
        for sh in running:
            seen.setdefault(sh["index"], set()).add(sh["worker"].split("-")[0])
        both = both or len({sh["worker"].split("-")[0] for sh in running}) == 2
        victim = next((sh for sh in running if both and sh["worker"].startswith("w0-") and 0 < sh["done"] < sh["images"]), None)
        time.sleep(0.2)
    assert len(shards) == 4 and both and victim is not None, (body, seen)
    workers[0].kill_group()
    done = wait_training(b, tid, timeout=600)
    assert done["status"] == "succeeded", done
    assert done["model_version"] == 1 and done["attempts"] == 1  # the head fit ran once
    version = b.get("/v1/datasets/photos/models/1").json()
    assert version["metrics"]["features_computed"] == 0  # every feature came from the shards
    from sqlalchemy import create_engine, text

    engine = create_engine(cluster_db_url(workers))
    with engine.connect() as c:
        rows = c.execute(text("SELECT \"index\", status, attempts, worker FROM training_shards WHERE training_id = :t ORDER BY index"),
                         {"t": tid}).all()
    engine.dispose()
    assert [r.status for r in rows] == ["done"] * 4
    assert {r.index: r.attempts for r in rows} == {r.index: 2 if r.index == victim["index"] else 1 for r in rows}
    assert rows[victim["index"]].worker.startswith("w1-")  # the survivor finished it


def cluster_db_url(workers) -> str:
    return workers[0].env["FELIS_DATABASE_URL"]
