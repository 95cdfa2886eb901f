"""service.serving.oip: Open Inference Protocol v2 requests and responses, both encodings, and
every way a request can be malformed or too large (pure functions: no app, no model)."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from service.errors import InvalidRequest, TooLarge
from service.serving import oip
from service.serving.oip import InvalidInference

LIMITS = {"max_elements": 4, "max_element_bytes": 100}


def _bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(len(b).to_bytes(4, "little") + b for b in items)


def _binary(items: list[bytes], shape: list | None = None, size: int | None = None, **request) -> tuple[bytes, str]:
    """A request as tritonclient sends it: the JSON, then the tensor data; and its header's value."""
    data = _bytes_tensor(items)
    inp = {"name": "image", "shape": shape if shape is not None else [len(items)], "datatype": "BYTES",
           "parameters": {"binary_data_size": len(data) if size is None else size}}
    head = json.dumps({"inputs": [inp], **request}).encode()
    return head + data, str(len(head))


def _json(data, shape=None, content_type: str | None = "base64", **request) -> bytes:
    inp = {"name": "image", "shape": shape if shape is not None else [len(data)], "datatype": "BYTES", "data": data}
    if content_type:
        inp["parameters"] = {"content_type": content_type}
    return json.dumps({"inputs": [inp], **request}).encode()


def _code(excinfo) -> str:
    return excinfo.value.code


# --- requests that parse ---------------------------------------------------------------------


def test_binary_request_as_tritonclient_sends_it():
    body, length = _binary([b"\xff\xd8jpeg", b"", b"\x89PNG"], id="r-1")
    req = oip.parse_request(body, length, **LIMITS)
    assert req.images == [b"\xff\xd8jpeg", b"", b"\x89PNG"]
    assert req.id == "r-1"
    assert req.outputs == dict.fromkeys(oip.OUTPUTS, False)


def test_json_base64_elements_as_mlserver_marks_them():
    images = [b"\x00\x01\xfe\xff", b"GIF89a"]
    req = oip.parse_request(_json([base64.b64encode(b).decode() for b in images]), None, **LIMITS)
    assert req.images == images


def test_json_unmarked_strings_are_their_utf8_bytes():
    req = oip.parse_request(_json(["héllo", "x"], content_type=None), None, **LIMITS)
    assert req.images == ["héllo".encode(), b"x"]


def test_nested_json_data_is_read_row_major():
    req = oip.parse_request(_json([["YQ=="], ["Yg=="]], shape=[2]), None, **LIMITS)
    assert req.images == [b"a", b"b"]


def test_a_header_length_covering_the_whole_body_is_plain_json():
    body = _json(["YQ=="])
    assert oip.parse_request(body, str(len(body)), **LIMITS).images == [b"a"]


def test_outputs_asked_for_and_their_encodings():
    body, length = _binary([b"a"], outputs=[{"name": "label"}, {"name": "probabilities", "parameters": {"binary_data": True}}])
    assert oip.parse_request(body, length, **LIMITS).outputs == {"label": False, "probabilities": True}
    body, length = _binary([b"a"], parameters={"binary_data_output": True})
    assert oip.parse_request(body, length, **LIMITS).outputs == dict.fromkeys(oip.OUTPUTS, True)
    body, length = _binary([b"a"], outputs=[])
    assert oip.parse_request(body, length, **LIMITS).outputs == dict.fromkeys(oip.OUTPUTS, False)
    body, length = _binary([b"a"], parameters={"binary_data_output": True},
                           outputs=[{"name": "labels", "parameters": {"binary_data": False}}, {"name": "decision"}])
    assert oip.parse_request(body, length, **LIMITS).outputs == {"labels": False, "decision": True}


def test_triton_request_parameters_are_ignored():
    body, length = _binary([b"a"], parameters={"priority": 1, "timeout": 100, "sequence_id": 0})
    assert oip.parse_request(body, length, **LIMITS).images == [b"a"]


# --- malformed requests: 400 with a code -------------------------------------------------------


@pytest.mark.parametrize("value", ["abc", "-5", "0", "1e3", "", "99999999999999999999999"])
def test_a_malformed_header_length(value):
    body, _ = _binary([b"a"])
    with pytest.raises(InvalidInference) as e:
        oip.parse_request(body, value, **LIMITS)
    assert _code(e) == "invalid_header_length"


def test_a_header_length_past_the_body():
    body, _ = _binary([b"a"])
    with pytest.raises(InvalidInference) as e:
        oip.parse_request(body, str(len(body) + 1), **LIMITS)
    assert _code(e) == "invalid_header_length"


def test_a_header_length_that_cuts_the_json():
    body, length = _binary([b"a"])
    with pytest.raises(InvalidInference) as e:
        oip.parse_request(body, str(int(length) - 3), **LIMITS)
    assert _code(e) == "invalid_json"


@pytest.mark.parametrize("size_delta", [-1, 1])
def test_a_binary_data_size_that_does_not_match_the_data(size_delta):
    body, length = _binary([b"abc"], size=4 + 3 + size_delta)
    with pytest.raises(InvalidInference) as e:
        oip.parse_request(body, length, **LIMITS)
    assert _code(e) == "invalid_binary_data"
    assert str(e.value)


def test_binary_data_without_the_header():
    body, _ = _binary([b"abc"])
    with pytest.raises(InvalidInference) as e:
        oip.parse_request(body, None, **LIMITS)
    assert _code(e) == "invalid_json"  # the JSON parser sees the tensor data after the JSON


def test_truncated_element_lengths():
    data = _bytes_tensor([b"abc"])[:-1]  # the length says 3 bytes, 2 follow
    head = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(data)}}]}).encode()
    with pytest.raises(InvalidInference) as e:
        oip.parse_request(head + data, str(len(head)), **LIMITS)
    assert _code(e) == "invalid_binary_data" and "truncated" in e.value.message
    data = b"\x03\x00"  # half a length prefix
    head = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": 2}}]}).encode()
    with pytest.raises(InvalidInference) as e:
        oip.parse_request(head + data, str(len(head)), **LIMITS)
    assert _code(e) == "invalid_binary_data"


@pytest.mark.parametrize("shape", [[3], [1]])
def test_a_shape_that_does_not_match_the_binary_elements(shape):
    body, length = _binary([b"a", b"b"], shape=shape)
    with pytest.raises(InvalidInference) as e:
        oip.parse_request(body, length, **LIMITS)
    assert _code(e) == "invalid_binary_data"


@pytest.mark.parametrize("shape", [[], [0], [-1], [1, 1], ["1"], [True], "1", 2])
def test_a_wrong_shape(shape):
    with pytest.raises(InvalidInference) as e:
        oip.parse_request(_json(["YQ=="], shape=shape), None, **LIMITS)
    assert _code(e) == "invalid_shape"


def test_a_shape_that_does_not_match_the_json_elements():
    with pytest.raises(InvalidInference) as e:
        oip.parse_request(_json(["YQ==", "Yg=="], shape=[3]), None, **LIMITS)
    assert _code(e) == "invalid_shape"


@pytest.mark.parametrize("datatype", ["FP32", "UINT8", "bytes", None])
def test_a_wrong_datatype(datatype):
    body = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": datatype, "data": ["YQ=="]}]}).encode()
    with pytest.raises(InvalidInference) as e:
        oip.parse_request(body, None, **LIMITS)
    assert _code(e) == "invalid_datatype"


def test_an_unknown_input_name_and_a_second_image_input():
    body = json.dumps({"inputs": [{"name": "input0", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}).encode()
    with pytest.raises(InvalidInference) as e:
        oip.parse_request(body, None, **LIMITS)
    assert _code(e) == "unknown_input" and e.value.message.startswith("no input named 'input0'")
    inp = {"name": "image", "shape": [1], "datatype": "BYTES", "data": ["a"]}
    with pytest.raises(InvalidInference) as e:
        oip.parse_request(json.dumps({"inputs": [inp, inp]}).encode(), None, **LIMITS)
    assert _code(e) == "unknown_input"


@pytest.mark.parametrize("body", [b"{not json", b"[]", b'{"inputs": []}', b'{"inputs": {}}', b"\xff\xfe",
                                  b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES"}]}',
                                  b'{"id": 5, "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}'])
def test_bodies_that_are_no_inference_request(body):
    with pytest.raises(InvalidInference) as e:
        oip.parse_request(body, None, **LIMITS)
    assert _code(e) in ("invalid_json", "missing_input", "invalid_data")


def test_bad_json_elements():
    for data, code in ((["not base64!"], "invalid_data"), ([5], "invalid_data"), ("YQ==", "invalid_data")):
        with pytest.raises(InvalidInference) as e:
            oip.parse_request(_json(data, shape=[1]), None, **LIMITS)
        assert _code(e) == code, data
    with pytest.raises(InvalidInference) as e:
        oip.parse_request(_json(["YQ=="], content_type="np"), None, **LIMITS)
    assert _code(e) == "invalid_parameter"


def test_unknown_outputs_and_unsupported_extensions():
    body, length = _binary([b"a"], outputs=[{"name": "logits"}])
    with pytest.raises(InvalidInference) as e:
        oip.parse_request(body, length, **LIMITS)
    assert _code(e) == "unknown_output"
    body, length = _binary([b"a"], outputs=[{"name": "label", "parameters": {"classification": 2}}])
    with pytest.raises(InvalidInference) as e:
        oip.parse_request(body, length, **LIMITS)
    assert _code(e) == "invalid_parameter"
    body, length = _binary([b"a"], outputs=[{"name": "label", "parameters": {"binary_data": "yes"}}])
    with pytest.raises(InvalidInference) as e:
        oip.parse_request(body, length, **LIMITS)
    assert _code(e) == "invalid_parameter"


# --- the bounds: 413 with felis's codes, before anything is copied or decoded ---------------------


def test_more_elements_than_the_limit_by_shape():
    body, length = _binary([b"a"] * 5)
    with pytest.raises(TooLarge) as e:
        oip.parse_request(body, length, **LIMITS)
    assert _code(e) == "too_many_files"
    with pytest.raises(TooLarge) as e:  # the shape alone says so: its data is never read
        oip.parse_request(_json(["YQ=="], shape=[10**12]), None, **LIMITS)
    assert _code(e) == "too_many_files"


def test_an_element_over_the_byte_limit():
    body, length = _binary([b"a", b"x" * 101])
    with pytest.raises(TooLarge) as e:
        oip.parse_request(body, length, **LIMITS)
    assert _code(e) == "file_too_large" and "element 1" in e.value.message
    assert oip.parse_request(*_binary([b"x" * 100]), **LIMITS).images == [b"x" * 100]  # the limit itself is fine
    with pytest.raises(TooLarge):
        oip.parse_request(_json([base64.b64encode(b"x" * 101).decode()]), None, **LIMITS)
    with pytest.raises(TooLarge):
        oip.parse_request(_json(["x" * 101], content_type=None), None, **LIMITS)
    assert oip.parse_request(_json([base64.b64encode(b"x" * 100).decode()]), None, **LIMITS).images == [b"x" * 100]


def test_a_length_prefix_claiming_gigabytes_is_refused_before_any_copy():
    data = (2**32 - 1).to_bytes(4, "little") + b"abc"
    head = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(data)}}]}).encode()
    with pytest.raises(TooLarge) as e:
        oip.parse_request(head + data, str(len(head)), **LIMITS)
    assert _code(e) == "file_too_large"


def test_compressed_bodies_inflate_within_the_limit():
    import gzip
    import zlib

    body = _json(["YQ=="])
    assert oip.inflate(body, None, 100) is body and oip.inflate(body, "identity", 100) is body
    assert oip.inflate(gzip.compress(body), "gzip", 1000) == body
    assert oip.inflate(zlib.compress(body), "Deflate", 1000) == body  # tritonclient's deflate is zlib-wrapped
    bomb = gzip.compress(b"\0" * 10_000_000)  # 10 MB of zeros in about 10 kB
    with pytest.raises(TooLarge) as e:
        oip.inflate(bomb, "gzip", 1_000_000)
    assert _code(e) == "request_too_large"
    with pytest.raises(InvalidInference) as e:
        oip.inflate(gzip.compress(body)[:-12], "gzip", 1000)
    assert _code(e) == "invalid_content_encoding"
    with pytest.raises(InvalidInference) as e:
        oip.inflate(body, "gzip", 1000)
    assert _code(e) == "invalid_content_encoding"
    with pytest.raises(InvalidInference) as e:
        oip.inflate(body, "br", 1000)
    assert _code(e) == "unsupported_content_encoding"


# --- responses -------------------------------------------------------------------------------


def _tensors() -> oip.Tensors:
    return oip.Tensors(labels=["cat", "noncat"], probabilities=np.array([[0.75, 0.25], [0.125, 0.875]], np.float32),
                       label=["cat", "noncat"], decision=["cat", None])


def test_a_json_response():
    body, length = oip.encode_response("pets", 3, _tensors(), dict.fromkeys(oip.OUTPUTS, False), "r-9")
    assert length is None
    answer = json.loads(body)
    assert answer["model_name"] == "pets" and answer["model_version"] == "3" and answer["id"] == "r-9"
    out = {o["name"]: o for o in answer["outputs"]}
    assert [o["name"] for o in answer["outputs"]] == list(oip.OUTPUTS)
    assert out["probabilities"] == {"name": "probabilities", "datatype": "FP32", "shape": [2, 2],
                                    "data": [0.75, 0.25, 0.125, 0.875]}
    assert out["labels"] == {"name": "labels", "datatype": "BYTES", "shape": [2], "data": ["cat", "noncat"]}
    assert out["label"]["data"] == ["cat", "noncat"]
    assert out["decision"]["data"] == ["cat", ""]  # a null decision is an empty element


def test_a_binary_response_only_the_outputs_asked_for():
    body, length = oip.encode_response("pets", 1, _tensors(), {"decision": True, "probabilities": True})
    head = json.loads(body[:length])
    assert "id" not in head
    assert [(o["name"], o["parameters"]["binary_data_size"]) for o in head["outputs"]] == [("decision", 4 + 3 + 4),
                                                                                           ("probabilities", 16)]
    rest = body[length:]
    assert rest[:11] == _bytes_tensor([b"cat", b""])
    assert np.frombuffer(rest[11:], "<f4").tolist() == [0.75, 0.25, 0.125, 0.875]


def test_mixed_json_and_binary_outputs():
    body, length = oip.encode_response("pets", 1, _tensors(), {"label": False, "labels": True})
    head = json.loads(body[:length])
    assert head["outputs"][0]["data"] == ["cat", "noncat"]
    assert body[length:] == _bytes_tensor([b"cat", b"noncat"])


def test_tensors_from_a_predict_answer_and_a_bad_image():
    answer = {"dataset": "pets", "model_version": 1, "predictions": [
        {"filename": "image[0]", "label": "noncat", "probabilities": {"cat": 0.25, "noncat": 0.75}, "decision": None,
         "ood_score": 0.9, "ood": True}]}
    t = oip.tensors_from_answer(answer)
    assert t.labels == ["cat", "noncat"] and t.probabilities.tolist() == [[0.25, 0.75]] and t.decision == [None]
    answer["predictions"].append({"filename": "image[1]", "error": {"code": "not_an_image", "message": "not an image"}})
    with pytest.raises(InvalidRequest) as e:
        oip.tensors_from_answer(answer)
    assert _code(e) == "not_an_image" and e.value.message.startswith("element 1")


def test_metadata():
    meta = oip.model_metadata("pets", [1, 2], ["cat", "dog", "other"])
    assert meta["name"] == "pets" and meta["versions"] == ["1", "2"] and meta["platform"] == "onnx"
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"]: o["shape"] for o in meta["outputs"]} == {"probabilities": [-1, 3], "labels": [3],
                                                                  "label": [-1], "decision": [-1]}
    assert oip.server_metadata("0.1.0") == {"name": "felis", "version": "0.1.0", "extensions": ["binary_tensor_data"]}
    assert oip.error_body("invalid_shape", "bad") == {"error": "invalid_shape: bad"}
