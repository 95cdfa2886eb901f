"""Redis SIGKILLed while trainings are queued, with the append-only file as compose runs it
(appendfsync everysec). A SIGKILL usually loses nothing Redis had written to the OS; a power
loss can lose the last second, which the second test stands for by deleting the queue. Either
way no queued training is lost: the workers' sweep sends again what was sent long ago and never
claimed (the outbox), and each training runs exactly once. A Redis server of the test's own."""

from __future__ import annotations

import shutil
import time

import httpx
import pytest

from tests.conftest import ASSETS, zip_folder
from tests.utils.processes import Proc, create_postgres_database, felis_env, free_port, wait_ready, wait_training
from tests.utils.servers import RedisServer

pytestmark = [pytest.mark.timeout(600), pytest.mark.production,
              pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server not installed")]


@pytest.mark.parametrize("lose_queue, redeliver", [(False, "10"), (True, "10"), (True, None)],
                         ids=["sigkill", "sigkill-and-messages-lost", "messages-lost-default-redelivery"])
def test_queued_trainings_survive_a_redis_crash(tmp_path, lose_queue, redeliver):
    """The third case keeps the default redelivery age (30 minutes, for a queue that is long on
    purpose). Before, its lost messages waited that long; now the sweep sees the broker's queue
    empty while trainings sent a minute ago are still unclaimed, and sends them again."""
    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    db_url, drop = create_postgres_database()
    ages = {"FELIS_TRAINING_REDELIVER_AFTER_SECONDS": redeliver} if redeliver else {"FELIS_TRAINING_LOST_AFTER_SECONDS": "5"}
    env = felis_env(FELIS_DATA_DIR=str(tmp_path / "var"), FELIS_DATABASE_URL=db_url, FELIS_BROKER_URL=redis_server.url,
                    FELIS_TRAINING_SWEEP_SECONDS="1", **ages)
    api_port = free_port()
    api = Proc(["api", "--port", str(api_port)], env, tmp_path / "api.log")
    worker = None
    try:
        wait_ready(f"http://127.0.0.1:{api_port}", [api])
        c = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=60)
        c.post("/v1/datasets", json={"name": "pets"})
        c.post("/v1/datasets/pets/images",
               files={"archive": ("s.zip", zip_folder(ASSETS / "cifar-cat" / "train"), "application/zip")})
        ids = [c.post("/v1/datasets/pets/trainings", json={"architecture": "simple_cnn", "epochs": 2, "seed": i}).json()["id"]
               for i in range(3)]
        redis_server.kill()  # within a second of the last enqueue: the AOF may not hold every message
        redis_server.start()
        if lose_queue:  # before: these trainings stayed queued for good
            import redis

            redis.Redis.from_url(redis_server.url).delete("gpu")
        worker = Proc(["worker", "--queues", "gpu", "--concurrency", "1"], env, tmp_path / "worker.log")
        done = [wait_training(c, i, timeout=300 if redeliver else 150) for i in ids]
        assert [d["status"] for d in done] == ["succeeded"] * 3, done
        assert sorted(d["model_version"] for d in done) == [1, 2, 3]
        time.sleep(12)  # past the redelivery age: a message sent again must not make a 4th version
        assert [m["version"] for m in c.get("/v1/datasets/pets/models").json()["data"]] == [1, 2, 3]
        assert all(c.get(f"/v1/trainings/{i}").json()["attempts"] == 1 for i in ids)
    finally:
        if worker:
            worker.stop()
        api.stop()
        redis_server.stop()
        drop()
