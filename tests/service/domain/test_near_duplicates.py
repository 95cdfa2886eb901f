"""Near-duplicates are reported per dataset (and kept on one side of every split by models.split)."""

from __future__ import annotations

import io

from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import DATASETS, asset_images


def _reencoded(data: bytes, size: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").resize((size, size)).save(buf, "JPEG", quality=70)
    return buf.getvalue()


def test_copies_are_grouped_and_label_conflicts_come_first(felis_env):
    from service.api.app import create_app

    photo = sorted((DATASETS / "photos" / "train" / "cat").iterdir())[0].read_bytes() if DATASETS.is_dir() \
        else asset_images()[0].read_bytes()
    other = asset_images("train", "noncat")[3].read_bytes()
    with TestClient(create_app()) as c:
        c.post("/v1/datasets", json={"name": "pets"})
        c.post("/v1/datasets/pets/images", data={"label": "cat"},
               files=[("files", ("orig.jpg", photo)), ("files", ("small.jpg", _reencoded(photo, 120))),
                      ("files", ("other.jpg", other))])
        c.post("/v1/datasets/pets/images", data={"label": "noncat"},
               files=[("files", ("mislabeled.jpg", _reencoded(photo, 200)))])
        body = c.get("/v1/datasets/pets/images/near-duplicates").json()
    assert body["count"] == 1 and body["max_distance"] == 6
    group = body["data"][0]
    assert sorted(i["filename"] for i in group["images"]) == ["mislabeled.jpg", "orig.jpg", "small.jpg"]
    assert group["conflicting_labels"] is True and group["labels"] == ["cat", "noncat"]


def test_groups_come_a_page_at_a_time_with_their_count(session, store, settings):
    from service.domain import datasets, images, uploads

    ds = datasets.create(session, "pets")
    session.commit()
    cats = asset_images("train", "cat")[:4]
    files = []
    for p in cats:  # each photo and a re-encoded copy: 4 groups of 2
        data = p.read_bytes()
        files += [(p.name, lambda d=data: d), ("copy-" + p.name, lambda d=data: _reencoded(d, 48))]
    uploads.ingest(session, store, ds, uploads.files_candidates(files, "cat"), settings)
    page, total = images.near_duplicates(session, ds, 6, limit=3, offset=0)
    rest, again = images.near_duplicates(session, ds, 6, limit=3, offset=3)
    assert total == again == 4 and len(page) == 3 and len(rest) == 1
    assert all(len(g["images"]) == 2 for g in page + rest)
