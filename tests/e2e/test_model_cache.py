"""The model cache under pressure: more versions served at once than it holds (issue 14, finding 7).
Before: evicting the least recently used model closed its batcher while other requests still held
it; their queued images were never answered and later requests got 500."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.conftest import ASSETS
from tests.utils.checkpoints import simple_cnn_checkpoint
from tests.utils.processes import Proc, felis_env, free_port, wait_ready

pytestmark = pytest.mark.timeout(300)


def _four_datasets(data_dir) -> None:
    """Four datasets, each with one version of the same checkpoint, in the data dir the API serves."""
    import os

    os.environ["FELIS_DATA_DIR"] = str(data_dir)
    from tests.conftest import _reset_caches

    _reset_caches()
    from service.domain import datasets
    from service.domain.pipeline import import_checkpoint
    from service.store.blobs import get_store
    from service.store.db import init_db, new_session

    init_db()
    data = simple_cnn_checkpoint()
    with new_session() as session:
        for i in range(4):
            dataset = datasets.create(session, f"d{i}")
            session.commit()
            import_checkpoint(session, get_store(), dataset, data)
    _reset_caches()


def test_more_versions_than_the_cache_holds_under_concurrent_predictions(tmp_path, monkeypatch):
    monkeypatch.setenv("FELIS_DATA_DIR", str(tmp_path / "var"))
    _four_datasets(tmp_path / "var")
    port = free_port()
    api = Proc(["api", "--port", str(port)], felis_env(FELIS_DATA_DIR=str(tmp_path / "var"), FELIS_MODEL_CACHE_SIZE="2",
                                                         FELIS_PREDICT_MAX_WAIT_MS="20",
                                                         FELIS_MAX_INFLIGHT_REQUESTS="0"), tmp_path / "api.log")
    image = (ASSETS / "cifar-cat" / "test" / "cat" / "0000.jpg").read_bytes()

    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            async def one(i: int) -> int:
                files = [("files", (f"{j}.jpg", image, "image/jpeg")) for j in range(1 + i % 3)]
                return (await c.post(f"/v1/datasets/d{i % 4}/predict", files=files)).status_code

            return list(await asyncio.gather(*(one(i) for i in range(240))))

    try:
        wait_ready(f"http://127.0.0.1:{port}", [api])
        statuses = asyncio.run(asyncio.wait_for(run(), 120))
        assert statuses == [200] * 240, {s: statuses.count(s) for s in set(statuses)}
    finally:
        api.stop()
