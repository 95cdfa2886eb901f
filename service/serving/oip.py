"""The Open Inference Protocol v2 (KServe v2) over REST: requests and responses, as pure functions.

What a client sends (``POST /v2/models/{name}[/versions/{v}]/infer``) and what it gets back, in
both encodings the protocol has:

- plain JSON: a BYTES element is a JSON string; marked ``"parameters": {"content_type": "base64"}``
  (as MLServer marks them) the strings are base64 and decode to the image file's bytes, unmarked
  a string is its UTF-8 bytes (the spec's reading, useless for images but honoured);
- the binary tensor data extension (what tritonclient sends): the request header
  ``Inference-Header-Content-Length: n`` says the first n bytes of the body are the JSON, the rest
  is tensor data; an input with ``parameters.binary_data_size`` takes that many bytes of it, in
  the order of the inputs; a BYTES element is a 4-byte little-endian length and then its bytes.

The one input is ``image``: BYTES, shape [N], each element an encoded image file. The outputs, in
the order of ``labels``: ``probabilities`` FP32 [N, L], ``labels`` BYTES [L], ``label`` BYTES [N]
(the most probable label), ``decision`` BYTES [N] (the thresholded decision; an empty element
where felis's ``decision`` is null: the image is flagged out of distribution, or every label has a
threshold and none is cleared). A request may name the ``outputs`` it wants, each as JSON or as
binary (``parameters.binary_data``; ``binary_data_output`` in the request's parameters for all).

Everything a request can get wrong answers ``InvalidInference`` (HTTP 400, ``status_for``'s answer
for a domain error outside the table) with a code: ``invalid_header_length``, ``invalid_json``,
``invalid_binary_data``, ``invalid_datatype``, ``invalid_shape``, ``unknown_input``,
``missing_input``, ``unknown_output``, ``invalid_data``, ``invalid_parameter``,
``unsupported_content_encoding``, ``invalid_content_encoding``. The bounds are felis's own: at most
``max_elements`` images (413 ``too_many_files``), each at most ``max_element_bytes`` (413
``file_too_large``), checked before an element is copied or decoded; a compressed body inflates to
no more than the request limit (413 ``request_too_large``).
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.errors import FelisError, InvalidRequest, TooLarge

INPUT = "image"
OUTPUTS = ("probabilities", "labels", "label", "decision")
PLATFORM = "onnx"
EXTENSIONS = ["binary_tensor_data"]
HEADER_LENGTH = "Inference-Header-Content-Length"
_LEN = 4  # bytes of a BYTES element's length prefix


class InvalidInference(FelisError):
    """A malformed inference request. Deliberately not in service.api.errors.STATUS: a domain error
    outside the table is a 400 there (the protocol's status for a request it cannot read)."""

    code = "invalid_inference_request"


@dataclass(frozen=True)
class InferRequest:
    images: list[bytes]  # one encoded image file per element of the `image` input
    outputs: dict[str, bool]  # the outputs to answer, in order -> as binary data
    id: str | None = None  # echoed in the response


def _fail(code: str, message: str) -> InvalidInference:
    return InvalidInference(message, code=code)


def _dict(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail("invalid_json", f"{what} must be a JSON object")
    return value


def _flag(params: dict, key: str, what: str) -> bool | None:
    value = params.get(key)
    if value is not None and not isinstance(value, bool):
        raise _fail("invalid_parameter", f"{what} parameter {key!r} must be true or false")
    return value


def inflate(body: bytes, content_encoding: str | None, max_bytes: int) -> bytes:
    """The body as it was before compression (tritonclient's request_compression_algorithm: gzip, or
    deflate, which it sends zlib-wrapped), never inflated past max_bytes (413 request_too_large)."""
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise _fail("unsupported_content_encoding", f"Content-Encoding {encoding[:20]!r}: send gzip, deflate or none")
    inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 32)  # a gzip or a zlib header, whichever it has
    try:
        out = inflater.decompress(body, max_bytes + 1)
    except zlib.error as e:
        raise _fail("invalid_content_encoding", f"the {encoding} body does not inflate: {e}") from None
    if len(out) > max_bytes:
        raise TooLarge(f"the request body inflates past the limit of {max_bytes} bytes", code="request_too_large")
    if not inflater.eof:
        raise _fail("invalid_content_encoding", f"the {encoding} body is truncated")
    return out


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(the JSON header, the binary tensor data after it) per Inference-Header-Content-Length."""
    if header_length is None:
        return body, memoryview(b"")
    text = header_length.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        raise _fail("invalid_header_length", f"{HEADER_LENGTH} must be a byte count, not {header_length[:40]!r}")
    n = int(text)
    if not 0 < n <= len(body):
        raise _fail("invalid_header_length", f"{HEADER_LENGTH} is {n} but the body has {len(body)} bytes")
    view = memoryview(body)
    return bytes(view[:n]), view[n:]


def _shape(value: Any, max_elements: int) -> int:
    if (not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], int) or isinstance(value[0], bool)
            or value[0] < 1):
        raise _fail("invalid_shape", f"input {INPUT!r} has shape [N], N >= 1 images; got {json.dumps(value)[:60]}")
    n = value[0]
    if n > max_elements:
        raise TooLarge(f"{n} images in one request; the limit is {max_elements}", code="too_many_files")
    return n


def _too_large(i: int, size: int, limit: int) -> TooLarge:
    return TooLarge(f"element {i} of {INPUT!r} is {size} bytes; the limit is {limit} bytes per image",
                    code="file_too_large")


def decode_bytes_tensor(data: memoryview, n: int, max_element_bytes: int) -> list[bytes]:
    """The n elements of a BYTES tensor in the binary extension's layout (4-byte little-endian
    length, then the bytes), exactly filling ``data``; each checked against the limit before it is copied."""
    out, pos, end = [], 0, len(data)
    for i in range(n):
        if end - pos < _LEN:
            raise _fail("invalid_binary_data", f"element {i} of {INPUT!r}: {end - pos} bytes left, "
                        f"a {_LEN}-byte length was expected (the tensor data is truncated, or shape says too many)")
        size = int.from_bytes(data[pos:pos + _LEN], "little")
        pos += _LEN
        if size > max_element_bytes:
            raise _too_large(i, size, max_element_bytes)
        if end - pos < size:
            raise _fail("invalid_binary_data", f"element {i} of {INPUT!r}: its length says {size} bytes, "
                        f"{end - pos} are left (the tensor data is truncated)")
        out.append(bytes(data[pos:pos + size]))
        pos += size
    if pos != end:
        raise _fail("invalid_binary_data", f"{end - pos} bytes of tensor data after the {n} elements its shape "
                    f"says (shape [{n}] does not match the data)")
    return out


def _flatten(data: list, n: int) -> list:
    """Row-major elements of a nested JSON array (the spec allows both forms), no more than n + 1."""
    out, stack = [], [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) > 8:
                    raise _fail("invalid_data", f"input {INPUT!r}: data nested too deep")
                stack.append(iter(item))
                break
            out.append(item)
            if len(out) > n:
                return out
        else:
            stack.pop()
    return out


def decode_json_elements(data: Any, n: int, content_type: str | None, max_element_bytes: int) -> list[bytes]:
    """The n elements of a BYTES tensor given as JSON strings: base64 when marked so, else UTF-8."""
    if not isinstance(data, list):
        raise _fail("invalid_data", f"input {INPUT!r}: data must be a JSON array of strings")
    items = _flatten(data, n)
    if len(items) != n:
        raise _fail("invalid_shape", f"input {INPUT!r}: shape [{n}] but {'more' if len(items) > n else len(items)} "
                    f"elements in data")
    b64 = content_type == "base64"
    # a base64 text longer than this decodes to more than the limit: refused before it is decoded
    max_chars = 4 * ((max_element_bytes + 2) // 3) if b64 else max_element_bytes
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise _fail("invalid_data", f"element {i} of {INPUT!r} is not a string (a BYTES element in JSON is one)")
        if len(item) > max_chars:
            raise _too_large(i, len(item) * 3 // 4 if b64 else len(item), max_element_bytes)
        if b64:
            try:
                raw = base64.b64decode(item, validate=True)
            except (binascii.Error, ValueError):
                raise _fail("invalid_data", f"element {i} of {INPUT!r} is not valid base64 "
                            f"(the input says content_type base64)") from None
        else:
            raw = item.encode("utf-8", "surrogatepass")
        if len(raw) > max_element_bytes:
            raise _too_large(i, len(raw), max_element_bytes)
        out.append(raw)
    return out


def _outputs(request: dict) -> dict[str, bool]:
    binary_all = bool(_flag(_dict(request.get("parameters"), "parameters"), "binary_data_output", "the request's"))
    asked = request.get("outputs")
    if asked is None or asked == []:  # none named: every output
        return {name: binary_all for name in OUTPUTS}
    if not isinstance(asked, list):
        raise _fail("invalid_json", "outputs must be a JSON array")
    out: dict[str, bool] = {}
    for entry in asked:
        entry = _dict(entry, "each of outputs")
        name = entry.get("name")
        if name not in OUTPUTS:
            raise _fail("unknown_output", f"no output named {str(name)[:60]!r}; the outputs are {', '.join(OUTPUTS)}")
        params = _dict(entry.get("parameters"), f"output {name!r}'s parameters")
        if "classification" in params or "shared_memory_region" in params:
            raise _fail("invalid_parameter", f"output {name!r}: the classification and shared-memory extensions "
                        f"are not supported")
        binary = _flag(params, "binary_data", f"output {name!r}'s")
        out[name] = binary_all if binary is None else binary
    return out


def parse_request(body: bytes, header_length: str | None, *, max_elements: int,
                  max_element_bytes: int) -> InferRequest:
    """An inference request, from the body and its Inference-Header-Content-Length header (None: none)."""
    head, binary = split_body(body, header_length)
    try:
        request = json.loads(head)
    except (ValueError, UnicodeDecodeError) as e:
        where = f" (the first {len(head)} bytes, per {HEADER_LENGTH})" if header_length is not None else ""
        raise _fail("invalid_json", f"the request's JSON{where} does not parse: {str(e)[:120]}") from None
    request = _dict(request, "the request")
    rid = request.get("id")
    if rid is not None and not isinstance(rid, str):
        raise _fail("invalid_json", "id must be a string")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _fail("missing_input", f"inputs must be a JSON array with the input {INPUT!r}")
    outputs = _outputs(request)
    images: list[bytes] | None = None
    offset = 0  # into the binary tensor data: inputs take their binary_data_size in order
    for entry in inputs:
        entry = _dict(entry, "each of inputs")
        name = entry.get("name")
        if name != INPUT:
            raise _fail("unknown_input", f"no input named {str(name)[:60]!r}; the one input is {INPUT!r} "
                        f"(BYTES, shape [N], each element an image file)")
        if images is not None:
            raise _fail("unknown_input", f"input {INPUT!r} is given twice")
        if entry.get("datatype") != "BYTES":
            raise _fail("invalid_datatype", f"input {INPUT!r} is BYTES (encoded image files), "
                        f"not {str(entry.get('datatype'))[:20]}")
        n = _shape(entry.get("shape"), max_elements)
        params = _dict(entry.get("parameters"), f"input {INPUT!r}'s parameters")
        if "shared_memory_region" in params:
            raise _fail("invalid_parameter", "the shared-memory extension is not supported")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise _fail("invalid_binary_data", f"binary_data_size must be a byte count, not {json.dumps(size)[:40]}")
            if "data" in entry:
                raise _fail("invalid_binary_data", f"input {INPUT!r} has both data and binary_data_size")
            if offset + size > len(binary):
                raise _fail("invalid_binary_data", f"binary_data_size is {size} but {len(binary) - offset} bytes of "
                            f"tensor data follow the JSON" + ("" if header_length is not None else
                                                              f" (no {HEADER_LENGTH} header was sent)"))
            images = decode_bytes_tensor(binary[offset:offset + size], n, max_element_bytes)
            offset += size
        else:
            content_type = params.get("content_type")
            if content_type not in (None, "base64", "str"):
                raise _fail("invalid_parameter", f"input {INPUT!r}: content_type {str(content_type)[:20]!r}; "
                            f"base64 (or none: UTF-8 strings)")
            if "data" not in entry:
                raise _fail("invalid_data", f"input {INPUT!r} has neither data nor parameters.binary_data_size")
            images = decode_json_elements(entry["data"], n, content_type, max_element_bytes)
    if offset != len(binary):
        raise _fail("invalid_binary_data", f"{len(binary) - offset} bytes of tensor data after the JSON that no "
                    f"input's binary_data_size accounts for")
    assert images is not None
    return InferRequest(images=images, outputs=outputs, id=rid)


# --- the response ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Tensors:
    """What an inference answers, per image, in the order of labels."""

    labels: list[str]
    probabilities: np.ndarray  # float32 [N, L]
    label: list[str]
    decision: list[str | None]


def tensors_from_answer(answer: dict[str, Any]) -> Tensors:
    """The tensors of service.serving.predictions.predict's answer. One image that could not be read
    fails the whole request (a tensor has no per-element errors): InvalidRequest with its code."""
    predictions = answer["predictions"]
    for i, p in enumerate(predictions):
        if "error" in p:
            raise InvalidRequest(f"element {i} of {INPUT!r}: {p['error']['message']}", code=p["error"]["code"],
                                 details={"element": i})
    labels = list(predictions[0]["probabilities"])
    probs = np.array([[p["probabilities"][lab] for lab in labels] for p in predictions], dtype=np.float32)
    return Tensors(labels, probs, [p["label"] for p in predictions], [p["decision"] for p in predictions])


def _bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(len(b).to_bytes(_LEN, "little") + b for b in items)


def encode_response(model_name: str, model_version: int, tensors: Tensors, outputs: dict[str, bool],
                    request_id: str | None = None) -> tuple[bytes, int | None]:
    """(the response body, its JSON header's length when binary tensor data follows it, else None)."""
    n, n_labels = len(tensors.label), len(tensors.labels)
    described: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, binary in outputs.items():
        if name == "probabilities":
            out: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": [n, n_labels]}
            values = np.ascontiguousarray(tensors.probabilities, dtype="<f4")
            raw, data = (values.tobytes(), None) if binary else (b"", values.reshape(-1).tolist())
        else:
            texts = {"labels": tensors.labels, "label": tensors.label,
                     "decision": [d or "" for d in tensors.decision]}[name]
            out = {"name": name, "datatype": "BYTES", "shape": [len(texts)]}
            raw, data = (_bytes_tensor([t.encode() for t in texts]), None) if binary else (b"", texts)
        if binary:
            out["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            out["data"] = data
        described.append(out)
    head: dict[str, Any] = {"model_name": model_name, "model_version": str(model_version)}
    if request_id is not None:
        head["id"] = request_id
    head["outputs"] = described
    header = json.dumps(head, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def error_body(code: str, message: str) -> dict[str, str]:
    """The protocol's error object, its message led by felis's machine-readable code."""
    return {"error": f"{code}: {message}"}


# --- metadata --------------------------------------------------------------------------------


def server_metadata(version: str) -> dict[str, Any]:
    return {"name": "felis", "version": version, "extensions": list(EXTENSIONS)}


def model_metadata(name: str, versions: list[int], labels: list[str]) -> dict[str, Any]:
    n_labels = len(labels)
    return {
        "name": name,
        "versions": [str(v) for v in versions],
        "platform": PLATFORM,
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, n_labels]},
            {"name": "labels", "datatype": "BYTES", "shape": [n_labels]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "decision", "datatype": "BYTES", "shape": [-1]},
        ],
    }
