"""A real client of the Open Inference Protocol against a real felis: NVIDIA's tritonclient (HTTP)
drives /v2 of a felis process that trained a simple_cnn version through its own worker, with
the binary tensor data extension (tritonclient's default) and with plain JSON, and gets the
probabilities /v1 predict gives for the same photos. Runs once in embedded mode and once
against Redis + PostgreSQL (tests/e2e/conftest.py)."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from tests.conftest import ASSETS, DATASETS, needs_datasets, zip_folder
from tests.utils.processes import wait_training

httpclient = pytest.importorskip("tritonclient.http")  # the test extra: tritonclient[http]
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = [needs_datasets(), pytest.mark.timeout(600)]
LABELS = ["cat", "noncat"]


class _Keyed:
    """The client with felis's key on every call, as an app passes ``headers=`` to each (tritonclient
    has no per-client headers); in embedded mode there is no key to pass."""

    def __init__(self, client, headers: dict[str, str]):
        self._client, self._headers = client, headers

    def __getattr__(self, name: str):
        method = getattr(self._client, name)
        if not self._headers or name == "close":
            return method
        return lambda *args, **kwargs: method(*args, headers={**self._headers, **kwargs.pop("headers", {})}, **kwargs)


def _photos() -> list[bytes]:
    return [p.read_bytes() for label in LABELS for p in sorted((DATASETS / "photos" / "test" / label).glob("*.jpg"))[:2]]


@pytest.fixture(scope="module")
def triton(felis):
    """A trained version of dataset `pets`, and a tritonclient pointed at the same felis."""
    assert felis.post("/v1/datasets", json={"name": "pets"}).status_code == 201
    r = felis.post("/v1/datasets/pets/images",
                   files={"archive": ("s.zip", zip_folder(ASSETS / "cifar-cat" / "train"), "application/zip")})
    assert r.status_code == 201, r.text
    training = felis.post("/v1/datasets/pets/trainings", json={"architecture": "simple_cnn", "epochs": 2}).json()
    assert wait_training(felis, training["id"])["status"] == "succeeded"
    client = _Keyed(httpclient.InferenceServerClient(url=str(felis.base_url).removeprefix("http://").rstrip("/"),
                                                     network_timeout=120), felis.auth_headers)
    try:
        yield client
    finally:
        client.close()


def _v1_probabilities(felis, photos: list[bytes]) -> np.ndarray:
    r = felis.post("/v1/datasets/pets/predict", files=[("files", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(photos)])
    assert r.status_code == 200, r.text
    return np.array([[p["probabilities"][lab] for lab in LABELS] for p in r.json()["predictions"]])


def test_health_metadata_and_readiness(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert "binary_tensor_data" in triton.get_server_metadata()["extensions"]
    assert triton.is_model_ready("pets") and triton.is_model_ready("pets", "1")
    assert not triton.is_model_ready("pets", "9") and not triton.is_model_ready("nope")
    meta = triton.get_model_metadata("pets")
    assert meta["versions"] == ["1"] and meta["platform"] == "onnx"
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]} == {
        "probabilities": ("FP32", [-1, 2]), "labels": ("BYTES", [2]), "label": ("BYTES", [-1]),
        "decision": ("BYTES", [-1])}
    assert triton.get_model_metadata("pets", "1") == meta


def test_binary_infer_answers_what_v1_predict_answers(felis, triton):
    photos = _photos()
    image = httpclient.InferInput("image", [len(photos)], "BYTES")
    image.set_data_from_numpy(np.array(photos, dtype=np.object_), binary_data=True)
    result = triton.infer("pets", [image], request_id="tc-1")  # no outputs named: every output, binary
    assert result.get_response()["id"] == "tc-1" and result.get_response()["model_version"] == "1"
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == (len(photos), 2)
    np.testing.assert_allclose(probs, _v1_probabilities(felis, photos), atol=1e-5)
    assert [b.decode() for b in result.as_numpy("labels")] == LABELS
    assert [b.decode() for b in result.as_numpy("label")] == [LABELS[i] for i in probs.argmax(axis=1)]
    assert all(b.decode() in ("", *LABELS) for b in result.as_numpy("decision"))


def test_json_infer_and_requested_outputs(felis, triton):
    """tritonclient's JSON mode sends each BYTES element as a UTF-8 string, which image files are not:
    they go as base64 with MLServer's content_type marker (InferInput has no public setter for it)."""
    photos = _photos()[:3]
    image = httpclient.InferInput("image", [len(photos)], "BYTES")
    image.set_data_from_numpy(np.array([base64.b64encode(b) for b in photos], dtype=np.object_), binary_data=False)
    image._parameters["content_type"] = "base64"
    outputs = [httpclient.InferRequestedOutput("label", binary_data=False),
               httpclient.InferRequestedOutput("probabilities", binary_data=False)]
    result = triton.infer("pets", [image], model_version="1", outputs=outputs)
    assert [o["name"] for o in result.get_response()["outputs"]] == ["label", "probabilities"]
    probs = result.as_numpy("probabilities")
    np.testing.assert_allclose(probs, _v1_probabilities(felis, photos), atol=1e-5)
    assert list(result.as_numpy("label")) == [LABELS[i] for i in probs.argmax(axis=1)]
    assert result.as_numpy("decision") is None  # not asked for


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests(triton, algorithm):
    image = httpclient.InferInput("image", [2], "BYTES")
    image.set_data_from_numpy(np.array(_photos()[:2], dtype=np.object_))
    result = triton.infer("pets", [image], request_compression_algorithm=algorithm)
    assert result.as_numpy("probabilities").shape == (2, 2)


def test_errors_reach_the_client_with_status_and_code(triton):
    wrong = httpclient.InferInput("input__0", [1], "BYTES")
    wrong.set_data_from_numpy(np.array([_photos()[0]], dtype=np.object_))
    with pytest.raises(InferenceServerException) as e:
        triton.infer("pets", [wrong])
    assert e.value.status() == "400" and e.value.message().startswith("unknown_input: ")
    junk = httpclient.InferInput("image", [1], "BYTES")
    junk.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as e:
        triton.infer("pets", [junk])
    assert e.value.status() == "422" and e.value.message().startswith("not_an_image: ")
    with pytest.raises(InferenceServerException) as e:
        triton.infer("nope", [junk])
    assert e.value.status() == "404" and e.value.message().startswith("dataset_not_found: ")
