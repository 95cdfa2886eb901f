"""Redis restarted while trainings are queued: with the append-only file on (as in the production
config), no queued training is lost. A Redis server of the test's own, on its own port."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
import redis

from tests.conftest import ASSETS, zip_folder
from tests.utils.processes import Proc, create_postgres_database, felis_env, free_port, wait_ready, wait_training

pytestmark = [pytest.mark.timeout(600),
              pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server not installed")]


def _start_redis(port: int, folder) -> None:
    subprocess.run(["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", str(port),
                    "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--dir", str(folder),
                    "--logfile", str(folder / "redis.log")], check=True)
    for _ in range(100):
        try:
            if redis.Redis(port=port).ping():
                return
        except redis.ConnectionError:
            time.sleep(0.05)
    raise TimeoutError("redis did not start")


def test_queued_trainings_survive_a_redis_restart(tmp_path):
    port = free_port()
    (tmp_path / "redis").mkdir()
    _start_redis(port, tmp_path / "redis")
    db_url, drop = create_postgres_database()
    env = felis_env(FELIS_DATA_DIR=str(tmp_path / "var"), FELIS_DATABASE_URL=db_url,
                    FELIS_BROKER_URL=f"redis://127.0.0.1:{port}/0")
    api_port = free_port()
    api = Proc(["api", "--port", str(api_port)], env, tmp_path / "api.log")
    worker = None
    try:
        wait_ready(f"http://127.0.0.1:{api_port}", [api])
        import httpx

        c = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=60)
        c.post("/v1/datasets", json={"name": "pets"})
        c.post("/v1/datasets/pets/images",
               files={"archive": ("s.zip", zip_folder(ASSETS / "cifar-cat" / "train"), "application/zip")})
        ids = [c.post("/v1/datasets/pets/trainings", json={"architecture": "simple_cnn", "epochs": 2, "seed": i}).json()["id"]
               for i in range(3)]
        assert redis.Redis(port=port).llen("gpu") == 3
        redis.Redis(port=port).shutdown(nosave=True)  # AOF, not a snapshot, must bring them back
        _start_redis(port, tmp_path / "redis")
        assert redis.Redis(port=port).llen("gpu") == 3
        worker = Proc(["worker", "--queues", "gpu", "--concurrency", "1"], env, tmp_path / "worker.log")
        done = [wait_training(c, i, timeout=300) for i in ids]
        assert [d["status"] for d in done] == ["succeeded"] * 3, done
        assert sorted(d["model_version"] for d in done) == [1, 2, 3]
    finally:
        if worker:
            worker.stop()
        api.stop()
        try:
            redis.Redis(port=port).shutdown(nosave=True)
        except redis.ConnectionError:
            pass
        drop()
