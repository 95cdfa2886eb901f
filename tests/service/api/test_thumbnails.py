"""GET /v1/datasets/{name}/images/{id}/thumbnail: a small upright RGB JPEG, cached in the blob store
and collected with its image's blob. Real images from the shared datasets."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageOps

from tests.conftest import DATASETS, needs_datasets

pytestmark = needs_datasets()

PHOTO = DATASETS / "photos" / "train" / "cat" / "catbreeds_Cat1019.jpg"  # 1600x1067 JPEG
SMALL = DATASETS / "catvnoncat" / "train" / "cat" / "0002.png"  # 64x64 RGB PNG


@pytest.fixture
def client(felis_env):
    from service.api.app import create_app

    with TestClient(create_app()) as c:
        assert c.post("/v1/datasets", json={"name": "pets"}).status_code == 201
        yield c


def _upload(client, name: str, data: bytes, label: str = "cat", dataset: str = "pets") -> dict:
    r = client.post(f"/v1/datasets/{dataset}/images", data={"label": label}, files=[("files", (name, data))])
    assert r.status_code == 201, r.text
    image_id = r.json()["results"][0]["image_id"]
    return client.get(f"/v1/datasets/{dataset}/images/{image_id}").json()


def _thumb(client, image: dict, dataset: str = "pets", **params):
    return client.get(f"/v1/datasets/{dataset}/images/{image['id']}/thumbnail", params=params)


def _jpeg(r) -> Image.Image:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "JPEG" and img.mode == "RGB"
    return img


def test_a_photo_becomes_a_small_jpeg_of_the_asked_size(client):
    image = _upload(client, PHOTO.name, PHOTO.read_bytes())
    r = _thumb(client, image)
    assert _jpeg(r).size == (160, 107)  # the default: longest side 160, the aspect kept
    assert len(r.content) < 20_000 < image["size_bytes"]
    assert r.headers["cache-control"] == "private, max-age=31536000, immutable"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert image["sha256"] in r.headers["etag"]
    assert _jpeg(_thumb(client, image, size=96)).size == (96, 64)
    big = _thumb(client, image, size=320)
    w, h = _jpeg(big).size  # 1067 * 320 / 1600 = 213.4: a JPEG decoded at half scale is 800x534
    assert w == 320 and abs(h - 213.4) < 1 and big.headers["etag"] != r.headers["etag"]
    # and it is the picture: close to Pillow's own reduction of the original
    reference = Image.open(PHOTO).convert("RGB").resize((w, h), Image.Resampling.LANCZOS)
    diff = np.abs(np.asarray(_jpeg(big), dtype=np.int16) - np.asarray(reference, dtype=np.int16))
    assert diff.mean() < 6, diff.mean()


def test_a_small_image_is_not_enlarged(client):
    image = _upload(client, SMALL.name, SMALL.read_bytes())
    assert _jpeg(_thumb(client, image)).size == (64, 64)


def test_exif_orientation_is_applied(client):
    photo = Image.open(PHOTO)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise: portrait
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    image = _upload(client, "rotated.jpg", buf.getvalue())
    assert (image["width"], image["height"]) == (1067, 1600)  # as shown, as its thumbnail is
    thumb = _jpeg(_thumb(client, image))
    assert thumb.size == (107, 160)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))).convert("RGB")
    reference = upright.resize(thumb.size, Image.Resampling.LANCZOS)
    diff = np.abs(np.asarray(thumb, dtype=np.int16) - np.asarray(reference, dtype=np.int16))
    assert diff.mean() < 6, diff.mean()


def _png(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **save)
    return buf.getvalue()


def test_transparency_is_flattened_on_white(client):
    rgb = Image.open(SMALL).convert("RGB")
    rgba = rgb.convert("RGBA")
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[:, :32] = 0  # the left half transparent
    rgba.putalpha(Image.fromarray(alpha))
    palette = rgb.quantize(colors=255)
    palette.putpalette(palette.getpalette()[: 255 * 3] + [0, 0, 0])  # index 255: black, and transparent
    px = np.asarray(palette).copy()
    px[:, :32] = 255
    paletted = Image.fromarray(px, "P")
    paletted.putpalette(palette.getpalette())
    for name, data in (("rgba.png", _png(rgba)), ("palette.png", _png(paletted, transparency=255))):
        image = _upload(client, name, data)
        assert image["format"] == "PNG"
        thumb = np.asarray(_jpeg(_thumb(client, image)), dtype=np.float64)
        assert thumb[:, :30].mean() > 250, name  # white, not black
        assert thumb[:, 34:].mean() < 230, name  # the cat is still there


def test_made_once_then_read_from_the_cache(client, store, monkeypatch):
    from service.domain import images
    from service.store.blobs import thumbnail_key

    image = _upload(client, PHOTO.name, PHOTO.read_bytes())
    key = thumbnail_key(image["sha256"], 160)
    assert not store.exists(key)
    first = _thumb(client, image)
    assert store.exists(key) and store.get(key) == first.content

    def no_decoding(*args, **kwargs):
        raise AssertionError("a cached thumbnail was decoded again")

    monkeypatch.setattr(images, "decode_rgb", no_decoding)
    again = _thumb(client, image)
    assert again.status_code == 200 and again.content == first.content
    assert not store.exists(thumbnail_key(image["sha256"], 96))  # one blob per size asked for


def test_a_full_store_still_answers_the_thumbnail(client, store, monkeypatch):
    """Caching is a side effect of a read: a store with no room left must not fail the read."""
    from service.errors import StorageFull
    from service.store.blobs import thumbnail_key

    image = _upload(client, SMALL.name, SMALL.read_bytes())

    def full(key, data):
        raise StorageFull("no room", code="storage_full")

    monkeypatch.setattr(store, "put", full)
    assert _jpeg(_thumb(client, image)).size == (64, 64)
    assert not store.exists(thumbnail_key(image["sha256"], 160))


def test_bad_size_and_missing_image(client):
    image = _upload(client, SMALL.name, SMALL.read_bytes())
    for size in (100, 0, -1, 4096):
        r = _thumb(client, image, size=size)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_thumbnail_size", r.text
        assert r.json()["error"]["details"] == {"sizes": [96, 160, 320]}
    r = _thumb(client, image, size="big")
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"
    r = client.get("/v1/datasets/pets/images/nope/thumbnail")
    assert r.status_code == 404 and r.json()["error"]["code"] == "image_not_found"
    r = client.get(f"/v1/datasets/nowhere/images/{image['id']}/thumbnail")
    assert r.status_code == 404 and r.json()["error"]["code"] == "dataset_not_found"
    assert client.delete(f"/v1/datasets/pets/images/{image['id']}").status_code == 204
    r = _thumb(client, image)
    assert r.status_code == 404 and r.json()["error"]["code"] == "image_not_found"


def test_thumbnails_go_with_their_image_blob(client, session, store, settings):
    from service.domain import cleanup
    from service.store.blobs import image_key, thumbnail_key

    assert client.post("/v1/datasets", json={"name": "other"}).status_code == 201
    mine = _upload(client, PHOTO.name, PHOTO.read_bytes())
    theirs = _upload(client, PHOTO.name, PHOTO.read_bytes(), dataset="other")  # the same bytes: one blob
    sha = mine["sha256"]
    for size in (96, 320):
        assert _thumb(client, mine, size=size).status_code == 200
    thumbs = [thumbnail_key(sha, 96), thumbnail_key(sha, 320)]
    settings.blob_grace_seconds = 0

    assert client.delete(f"/v1/datasets/pets/images/{mine['id']}").status_code == 204
    cleanup.collect(session, store, settings)
    assert store.exists(image_key(sha)) and all(store.exists(k) for k in thumbs)  # the other dataset still has it
    assert _thumb(client, theirs, dataset="other", size=96).content == store.get(thumbs[0])

    assert client.delete(f"/v1/datasets/other/images/{theirs['id']}").status_code == 204
    assert store.exists(thumbs[0])  # left to the collection, like the image blob
    cleanup.collect(session, store, settings)
    assert not store.exists(image_key(sha))
    assert not any(store.exists(k) for k in thumbs)


def test_thumbnails_of_a_purged_dataset_are_collected(client, session, store, settings):
    from service.domain import cleanup
    from service.store.blobs import thumbnail_key

    image = _upload(client, SMALL.name, SMALL.read_bytes())
    assert _thumb(client, image).status_code == 200
    key = thumbnail_key(image["sha256"], 160)
    assert store.exists(key)
    settings.blob_grace_seconds = 0
    assert client.delete("/v1/datasets/pets").status_code == 204
    cleanup.purge(session, store)
    cleanup.collect(session, store, settings)
    assert not store.exists(key)
