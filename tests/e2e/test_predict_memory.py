"""Predict under an oversized load, against a real `felis api` process (security finding 4).

Before: every part was read whole and every image decoded whatever its size; a 12000 x 12000 PNG
is 170 KB on the wire and 430 MB as RGB, so a few requests of them took GBs (or killed the API).
Now each part is read where it is decoded, at most FELIS_MAX_FILE_BYTES + 1 bytes of it, and an
image over FELIS_MAX_IMAGE_PIXELS is refused from its header."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import ASSETS
from tests.utils.checkpoints import simple_cnn_checkpoint
from tests.utils.processes import start_felis

pytestmark = pytest.mark.timeout(300)

MAX_FILE_BYTES = 4 * 1024 * 1024
GROWTH_CAP_MB = 300  # peak RSS growth of the API process over the whole run; before: about 1 GB and more


def _vm_hwm_mb(pid: int) -> float:
    """The process's peak resident memory so far."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def _dataset_with_a_model(data_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("FELIS_DATA_DIR", str(data_dir))
    from tests.conftest import _reset_caches

    _reset_caches()
    from service.domain import datasets
    from service.domain.pipeline import import_checkpoint
    from service.store.blobs import get_store
    from service.store.db import init_db, new_session

    init_db()
    with new_session() as session:
        dataset = datasets.create(session, "pets")
        session.commit()
        import_checkpoint(session, get_store(), dataset, simple_cnn_checkpoint())
    _reset_caches()


def test_many_huge_images_and_large_parts_keep_the_api_small(tmp_path, monkeypatch):
    _dataset_with_a_model(tmp_path / "var", monkeypatch)
    proc, base = start_felis("api", tmp_path, FELIS_MAX_FILE_BYTES=str(MAX_FILE_BYTES))
    buf = io.BytesIO()
    Image.new("L", (12000, 12000), 128).save(buf, "PNG")
    huge = buf.getvalue()
    cat = (ASSETS / "cifar-cat" / "test" / "cat" / "0000.jpg").read_bytes()
    at_limit = cat + b"\0" * (MAX_FILE_BYTES - len(cat))  # a JPEG ignores what follows its end
    over = at_limit + b"\0"
    part = lambda name, data: ("files", (name, data, "application/octet-stream"))  # noqa: E731

    async def run(c: httpx.AsyncClient) -> list[httpx.Response]:
        bombs = [part("cat.jpg", cat)] + [part(f"huge{i}.png", huge) for i in range(16)]
        large = ([part("cat.jpg", cat)] + [part(f"over{i}.bin", over) for i in range(6)]
                 + [part(f"limit{i}.jpg", at_limit) for i in range(4)])
        requests = [bombs] * 4 + [large] * 2 + [[part("huge.png", huge)]] * 2 + [[part("over.bin", over)]]
        return list(await asyncio.gather(*(c.post("/v1/datasets/pets/predict", files=files) for files in requests)))

    try:
        with httpx.Client(base_url=base, timeout=60) as c:  # load the model: part of the baseline
            assert c.post("/v1/datasets/pets/predict", files=[part("cat.jpg", cat)]).status_code == 200
        before = _vm_hwm_mb(proc.popen.pid)

        async def main() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=base, timeout=120) as c:
                return await run(c)

        answers = asyncio.run(asyncio.wait_for(main(), 150))
        growth = _vm_hwm_mb(proc.popen.pid) - before
        assert proc.popen.poll() is None, proc.tail()
        print(f"API process peak RSS: {before:.0f} MB after warm-up, grew by {growth:.0f} MB under the load")
        assert growth < GROWTH_CAP_MB, f"the API's peak RSS grew by {growth:.0f} MB (from {before:.0f} MB)"
        statuses = [r.status_code for r in answers]
        assert statuses == [200] * 6 + [422] * 3, [(r.status_code, r.text[:300]) for r in answers]
        codes = lambda r: [p.get("error", {}).get("code") for p in r.json()["predictions"]]  # noqa: E731
        for r in answers[:4]:
            assert codes(r) == [None] + ["image_too_large"] * 16
        for r in answers[4:6]:
            assert codes(r) == [None] + ["file_too_large"] * 6 + [None] * 4
            probabilities = [p.get("probabilities") for p in r.json()["predictions"]]
            assert probabilities[-4:] == [probabilities[0]] * 4  # the same picture, padded to the limit
        assert [r.json()["error"]["code"] for r in answers[6:]] == ["image_too_large"] * 2 + ["file_too_large"]
    finally:
        proc.stop()
