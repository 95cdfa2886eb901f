"""POST /v1/datasets/{name}/predict applies the upload limits per file (security finding 4): a part
over FELIS_MAX_FILE_BYTES answers `file_too_large` and an image over FELIS_MAX_IMAGE_PIXELS
`image_too_large`, without its pixels being decoded; the other files still get their predictions,
and when every file is refused the request answers 422 with the first file's code."""

from __future__ import annotations

import base64
import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import asset_images
from tests.utils.checkpoints import simple_cnn_checkpoint


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def checkpoint() -> bytes:
    return simple_cnn_checkpoint()


@pytest.fixture(scope="module")
def huge_png() -> bytes:
    """12000 x 12000 grey pixels in about 140 KB: 430 MB once decoded to RGB."""
    return _png(Image.new("L", (12000, 12000), 128))


def _client(felis_env, monkeypatch, checkpoint: bytes, **env: str) -> TestClient:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from service.api.app import create_app
    from service.config import get_settings
    from service.domain import datasets
    from service.domain.pipeline import import_checkpoint
    from service.store.blobs import get_store
    from service.store.db import new_session

    get_settings.cache_clear()
    with new_session() as session:
        dataset = datasets.create(session, "pets")
        session.commit()
        import_checkpoint(session, get_store(), dataset, checkpoint)
    return TestClient(create_app())


def _code(prediction: dict) -> str | None:
    return prediction.get("error", {}).get("code")


def _predict(c: TestClient, files: list[tuple[str, bytes]]):
    return c.post("/v1/datasets/pets/predict", files=[("files", (name, data, "image/png")) for name, data in files])


def test_an_image_over_the_pixel_limit_is_refused_per_file(felis_env, monkeypatch, checkpoint, huge_png):
    cat = asset_images("test", "cat")[0].read_bytes()
    with _client(felis_env, monkeypatch, checkpoint) as c:  # the default limit: 50 M pixels
        r = _predict(c, [("huge.png", huge_png), ("cat.jpg", cat), ("huge2.png", huge_png)])
        assert r.status_code == 200, r.text
        huge, good, huge2 = r.json()["predictions"]
        assert huge["filename"] == "huge.png" and _code(huge) == "image_too_large", huge
        assert "12000x12000" in huge["error"]["message"] and _code(huge2) == "image_too_large"
        assert good["filename"] == "cat.jpg" and set(good["probabilities"]) == {"cat", "noncat"}

        r = _predict(c, [("huge.png", huge_png)])  # one file: the lone-request path
        assert r.status_code == 422 and r.json()["error"]["code"] == "image_too_large", r.text
        assert r.json()["error"]["details"]["filename"] == "huge.png"
        r = _predict(c, [("huge.png", huge_png), ("huge2.png", huge_png)])
        assert r.status_code == 422 and r.json()["error"]["code"] == "image_too_large", r.text


def test_the_pixel_limit_is_the_setting(felis_env, monkeypatch, checkpoint):
    small = _png(Image.new("RGB", (100, 100), (200, 30, 30)))
    with _client(felis_env, monkeypatch, checkpoint, FELIS_MAX_IMAGE_PIXELS="10000") as c:
        assert _predict(c, [("exact.png", small)]).status_code == 200  # 100 x 100 = the limit: served
        r = _predict(c, [("over.png", _png(Image.new("RGB", (101, 100))))])
        assert r.status_code == 422 and r.json()["error"]["code"] == "image_too_large", r.text


def test_a_part_over_the_byte_limit_is_refused_per_file(felis_env, monkeypatch, checkpoint):
    cat = asset_images("test", "cat")[0].read_bytes()
    limit = 4 * len(cat)
    padded = cat + b"\0" * (limit - len(cat))  # exactly the limit (JPEG ignores what follows its end): served
    over = padded + b"\0"
    big = over + b"\0" * (2 * 1024 * 1024)  # spooled to disk by the multipart parser
    with _client(felis_env, monkeypatch, checkpoint, FELIS_MAX_FILE_BYTES=str(limit)) as c:
        r = _predict(c, [("over.jpg", over), ("cat.jpg", cat), ("padded.jpg", padded), ("big.jpg", big)])
        assert r.status_code == 200, r.text
        refused, good, exact, big_answer = r.json()["predictions"]
        assert refused["filename"] == "over.jpg" and _code(refused) == "file_too_large", refused
        assert _code(big_answer) == "file_too_large" and str(limit) in big_answer["error"]["message"]
        assert good["filename"] == "cat.jpg" and "probabilities" in good
        assert exact["probabilities"] == good["probabilities"]

        r = _predict(c, [("big.jpg", big)])  # one file: the lone-request path
        assert r.status_code == 422 and r.json()["error"]["code"] == "file_too_large", r.text
        assert r.json()["error"]["details"]["filename"] == "big.jpg"
        r = _predict(c, [("over.jpg", over), ("big.jpg", big)])
        assert r.status_code == 422 and r.json()["error"]["code"] == "file_too_large", r.text


def test_a_file_of_unknown_size_is_read_no_further_than_the_limit():
    from models.images import InvalidImage
    from service.serving.predictions import Upload, _read

    f = io.BytesIO(b"x" * 1000)
    with pytest.raises(InvalidImage) as e:
        _read(Upload("big.bin", f), 100)
    assert e.value.code == "file_too_large" and f.tell() == 101
    assert _read(Upload("exact.bin", io.BytesIO(b"x" * 100)), 100) == b"x" * 100
    with pytest.raises(InvalidImage) as e:  # a size the parser counted: nothing is read
        _read(Upload("big.bin", f := io.BytesIO(b"x" * 1000), 1000), 100)
    assert e.value.code == "file_too_large" and f.tell() == 0


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def test_predict_refuses_what_upload_refuses_per_file_and_never_hands_postscript_to_ghostscript(
        felis_env, monkeypatch, checkpoint):
    """Formats upload refuses (`unsupported_format`: TGA, EPS, ...) and images under
    FELIS_MIN_IMAGE_SIDE (`image_too_small`) answer the same codes per file on predict; an EPS file
    is refused from its header, so Pillow never starts Ghostscript on a stranger's PostScript."""
    import subprocess

    def no_subprocess(*a, **k):
        raise AssertionError(f"a process was started for a predict request: {a!r}")

    cat = asset_images("test", "cat")[0].read_bytes()
    picture = Image.new("RGB", (64, 64), (90, 140, 200))
    with _client(felis_env, monkeypatch, checkpoint) as c:
        monkeypatch.setattr(subprocess, "Popen", no_subprocess)
        files = [("a.tga", _encoded(picture, "TGA")), ("b.eps", _encoded(picture, "EPS")),
                 ("c.png", _png(Image.new("RGB", (1, 1)))), ("d.pcx", _encoded(picture, "PCX")), ("cat.jpg", cat)]
        r = _predict(c, files)
        assert r.status_code == 200, r.text
        codes = [_code(p) for p in r.json()["predictions"]]
        assert codes == ["unsupported_format", "unsupported_format", "image_too_small", "unsupported_format", None], r.text
        r = _predict(c, [("b.eps", _encoded(picture, "EPS"))])  # the lone-request path
        assert r.status_code == 422 and r.json()["error"]["code"] == "unsupported_format", r.text
        r = c.post("/v2/models/pets/infer", json={"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                                             "parameters": {"content_type": "base64"},
                                                             "data": [base64.b64encode(_encoded(picture, "TGA")).decode()]}]})
        assert r.status_code == 422 and r.json()["error"].startswith("unsupported_format: "), r.text


def test_past_the_file_count_limits_uploads_and_predictions_answer_413_too_many_files(felis_env, monkeypatch, checkpoint):
    """FELIS_MAX_FILES_PER_REQUEST loose files upload, FELIS_MAX_PREDICT_FILES predict; one more,
    or many more (the multipart parser's own cap), is 413 too_many_files and stores nothing."""
    cat = asset_images("test", "cat")[0].read_bytes()
    pictures = [_png(Image.new("RGB", (32, 32), (i, 100, 200))) for i in range(12)]
    with _client(felis_env, monkeypatch, checkpoint, FELIS_MAX_FILES_PER_REQUEST="3", FELIS_MAX_PREDICT_FILES="4") as c:
        def upload(n: int):
            return c.post("/v1/datasets/pets/images", data={"label": "cat"},
                          files=[("files", (f"{i}.png", pictures[i], "image/png")) for i in range(n)])

        for n in (4, 5, 12):
            r = upload(n)
            assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_files", (n, r.text)
        assert c.get("/v1/datasets/pets").json()["image_count"] == 0
        assert upload(3).status_code == 201
        for n in (5, 6, 12):
            r = _predict(c, [(f"{i}.jpg", cat) for i in range(n)])
            assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_files", (n, r.text)
        assert _predict(c, [(f"{i}.jpg", cat) for i in range(4)]).status_code == 200


def test_when_every_file_is_refused_the_422_says_why_for_each(felis_env, monkeypatch, checkpoint):
    """Before: the 422 named the first file only (empty.jpg: the file is empty); the user fixed
    one file a request. Its code stays the first file's; its details list every file's reason."""
    with _client(felis_env, monkeypatch, checkpoint) as c:
        r = _predict(c, [("empty.jpg", b""), ("text.jpg", b"not an image, a note" * 4), ("one.png", _png(Image.new("RGB", (1, 1))))])
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "empty_file" and error["details"]["filename"] == "empty.jpg"
    assert [(f["filename"], f["code"]) for f in error["details"]["files"]] == [
        ("empty.jpg", "empty_file"), ("text.jpg", "not_an_image"), ("one.png", "image_too_small")]
    assert error["message"].startswith("none of the 3 images could be read: empty.jpg: ")
    assert "text.jpg: " in error["message"] and "one.png: " in error["message"]
