"""A corpus of awkward and hostile files, each with its documented answer, through the upload API."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import asset_images


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _png_bomb(side: int = 30000) -> bytes:
    """A valid PNG header claiming side x side pixels with a tiny compressed body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    raw = zlib.compress(b"\0" * (side // 8 + 1) * 64, 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def _jpeg(mode: str = "RGB", size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (10, 20, 30, 40)[: len(mode)] if mode != "L" else 128).save(buf, "JPEG")
    return buf.getvalue()


def _gif_animated() -> bytes:
    frames = [Image.new("P", (32, 32), i) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def _zip_bomb() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("cat/bomb.png", b"\0" * 20_000_000)
    return buf.getvalue()


GOOD = asset_images("train", "cat")[0].read_bytes()
CORPUS = {
    # name: (bytes, expected status, expected reason)
    "truncated.jpg": (GOOD[:-60], "rejected", "truncated_image"),
    "bomb.png": (_png_bomb(), "rejected", "image_too_large"),
    "zero.jpg": (b"", "rejected", "empty_file"),
    "text.jpg": (b"<html>not an image</html>" * 4, "rejected", "not_an_image"),
    "tiny.png": (_png(Image.new("RGB", (4, 4))), "rejected", "image_too_small"),
    "huge-dimensions.png": (_png_bomb(60000), "rejected", "image_too_large"),
    "unsupported.pdf": (b"%PDF-1.4\n" + b"0" * 100, "rejected", "unsupported_format"),
    # accepted, decoded by content whatever the name says
    "png-named.jpg": (_png(Image.new("RGB", (32, 32), (200, 10, 10))), "created", None),
    "cmyk.jpg": (_jpeg("CMYK"), "created", None),
    "grey16.png": (_png(Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16))), "created", None),
    "animated.gif": (_gif_animated(), "created", None),
    # a JPEG with a zip appended: stored as the JPEG it is, and served back as image/jpeg with nosniff
    "polyglot.jpg": (GOOD + b"PK\x03\x04" + b"\0" * 26, "created", None),
}


@pytest.fixture
def client(felis_env):
    from service.api.app import create_app

    with TestClient(create_app()) as c:
        c.post("/v1/datasets", json={"name": "pets"})
        yield c


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_each_file_gets_its_documented_answer(client, name):
    data, status, reason = CORPUS[name]
    r = client.post("/v1/datasets/pets/images", data={"label": "cat"}, files={"files": (name, data)})
    result = r.json()["results"][0]
    assert (result["status"], result["reason"]) == (status, reason), r.text
    assert r.status_code == (201 if status == "created" else 422)
    if status == "created":
        content = client.get(f"/v1/datasets/pets/images/{result['image_id']}/content")
        assert content.content == data
        assert content.headers["x-content-type-options"] == "nosniff"


def test_zip_bomb_member_is_rejected(client):
    r = client.post("/v1/datasets/pets/images", files={"archive": ("bomb.zip", _zip_bomb(), "application/zip")})
    assert r.status_code == 422
    assert r.json()["results"][0]["reason"] == "compression_ratio_too_high"


def test_whole_corpus_in_one_request_is_a_207_and_keeps_the_good_ones(client):
    files = [("files", (name, data)) for name, (data, _, _) in sorted(CORPUS.items())]
    r = client.post("/v1/datasets/pets/images", data={"label": "cat"}, files=files)
    assert r.status_code == 207
    created = sum(1 for _, s, _ in CORPUS.values() if s == "created")
    assert r.json()["created"] == created
    assert client.get("/v1/datasets/pets").json()["image_count"] == created
