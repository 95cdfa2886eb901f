"""Request bodies of the Custom Vision routes, read within Custom Vision's own limits and in
bounded memory: the body is never held whole, and each image goes to a temporary file as it
arrives (in memory up to ``SPOOL_BYTES``, then on disk).

- ``read_image_batch``: create_images_from_files' JSON, ``{"images": [{"name", "contents": base64,
  "tagIds"}], "tagIds"}``, parsed as it streams in (an image's base64 is decoded chunk by chunk).
  At most ``MAX_BATCH_IMAGES`` images (the 65th is refused as it begins, 413) of at most
  ``MAX_IMAGE_BYTES`` each (a larger one gets ErrorImageSize and the rest of it is skipped,
  unkept); the body may not pass ``batch_body_limit()``, by Content-Length before it is read or
  counted while it is.
- ``read_parts``: multipart/form-data (the SDK's ``imageData`` parts carry no filename, which
  Starlette's form parser would keep in memory as text fields and refuse past 1 MiB), or a raw
  application/octet-stream body, as Custom Vision's REST API also takes.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

import anyio.from_thread
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from service.domain.customvision import NewImage
from service.errors import InvalidRequest, TooLarge

MAX_BATCH_IMAGES = 64  # Custom Vision: images per create_images_from_files / create_images_from_data request
MAX_IMAGE_BYTES = 6 * 1024 * 1024  # Custom Vision: one training image
MAX_PREDICTION_BYTES = 4 * 1024 * 1024  # Custom Vision: one image to classify
MAX_TAG_IDS = 256  # tag ids in one list
SPOOL_BYTES = 256 * 1024  # what one image keeps in memory before it goes to disk
_SMALL = 64 * 1024  # any other JSON string (a name, a tag id)
_OVERHEAD = 16 * 1024  # per image: its name, tag ids and the JSON around them
_MAX_DEPTH = 32
_WS = b" \t\r\n"
_SPECIAL = re.compile(rb'["\\]')
_SCALAR = re.compile(rb"[-+.0-9A-Za-z]+")


def batch_body_limit() -> int:
    """The largest create_images_from_files body: the images at their cap, base64-encoded, and their JSON."""
    return MAX_BATCH_IMAGES * ((MAX_IMAGE_BYTES + 2) // 3 * 4 + _OVERHEAD) + _SMALL


def parts_body_limit(max_parts: int, max_part_bytes: int) -> int:
    return max_parts * (max_part_bytes + _OVERHEAD) + _SMALL


def _spool() -> IO[bytes]:
    return tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)


def _declared_length(request: Request, limit: int) -> None:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise TooLarge(f"the request body of {length} bytes is over the limit of {limit} bytes", code="request_too_large")


def _bad(message: str) -> InvalidRequest:
    return InvalidRequest(f"the request body is not a valid image batch: {message}", code="invalid_batch")


class _Reader:
    """The body's bytes, pulled a chunk at a time, never more than ``limit`` of them."""

    def __init__(self, pull: Callable[[], bytes | None], limit: int):
        self._pull, self._limit = pull, limit
        self.buf, self.pos, self.seen = b"", 0, 0

    def fill(self) -> bool:
        while True:
            chunk = self._pull()
            if chunk is None:
                return False
            if chunk:
                break
        self.seen += len(chunk)
        if self.seen > self._limit:
            raise TooLarge(f"the request body is over the limit of {self._limit} bytes", code="request_too_large")
        self.buf, self.pos = self.buf[self.pos:] + chunk, 0
        return True

    def peek(self) -> int | None:
        """The next byte that is not white space (not consumed); None at the end."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WS:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.fill():
                return None

    def expect(self, char: bytes) -> None:
        if self.peek() != char[0]:
            raise _bad(f"expected {char.decode()!r} at byte {self.seen - len(self.buf) + self.pos}")
        self.pos += 1

    def ensure(self, n: int) -> None:
        while len(self.buf) - self.pos < n:
            if not self.fill():
                raise _bad("it ends too early")

    def raw_string(self):
        """After an opening quote: the string's raw JSON text in pieces (escapes whole, as written)."""
        while True:
            m = _SPECIAL.search(self.buf, self.pos)
            if m is None:
                if self.pos < len(self.buf):
                    yield self.buf[self.pos:]
                self.buf, self.pos = b"", 0
                if not self.fill():
                    raise _bad("a string never ends")
                continue
            i = m.start()
            if i > self.pos:
                yield self.buf[self.pos:i]
            self.pos = i
            if self.buf[i] == 0x22:  # the closing quote
                self.pos += 1
                return
            self.ensure(2)
            n = 6 if self.buf[self.pos + 1] == 0x75 else 2  # \uXXXX
            self.ensure(n)
            yield self.buf[self.pos:self.pos + n]
            self.pos += n

    def small_string(self) -> str:
        self.expect(b'"')
        pieces, size = [], 0
        for piece in self.raw_string():
            size += len(piece)
            if size > _SMALL:
                raise _bad(f"a string is over {_SMALL} bytes")
            pieces.append(piece)
        try:
            return json.loads(b'"' + b"".join(pieces) + b'"')
        except ValueError as e:
            raise _bad(f"a string is malformed ({e})") from e

    def null(self) -> bool:
        """Consume a null if one is next."""
        if self.peek() == 0x6E:  # n
            self.scalar()
            return True
        return False

    def scalar(self) -> Any:
        self.ensure(1)
        while True:
            m = _SCALAR.match(self.buf, self.pos)
            end = m.end() if m else self.pos
            if end < len(self.buf) or not self.fill():
                break
        m = _SCALAR.match(self.buf, self.pos)
        if m is None or m.end() - m.start() > 64:
            raise _bad("unexpected text")
        self.pos = m.end()
        try:
            return json.loads(m.group())
        except ValueError as e:
            raise _bad(f"not a JSON value: {m.group()[:20]!r}") from e

    def members(self):
        """After peek() saw '{': each member's key, with the reader at its value."""
        self.expect(b"{")
        if self.peek() == 0x7D:
            self.pos += 1
            return
        while True:
            key = self.small_string()
            self.expect(b":")
            yield key
            c = self.peek()
            self.pos += 1
            if c == 0x7D:
                return
            if c != 0x2C:
                raise _bad("expected ',' or '}'")

    def elements(self):
        """After peek() saw '[': once per element, with the reader at it."""
        self.expect(b"[")
        if self.peek() == 0x5D:
            self.pos += 1
            return
        while True:
            yield
            c = self.peek()
            self.pos += 1
            if c == 0x5D:
                return
            if c != 0x2C:
                raise _bad("expected ',' or ']'")

    def skip(self, depth: int = 0) -> None:
        """Any value, read and dropped (strings of any length too)."""
        if depth > _MAX_DEPTH:
            raise _bad(f"nested deeper than {_MAX_DEPTH}")
        c = self.peek()
        if c == 0x7B:
            for _ in self.members():
                self.skip(depth + 1)
        elif c == 0x5B:
            for _ in self.elements():
                self.skip(depth + 1)
        elif c == 0x22:
            self.pos += 1
            for _ in self.raw_string():
                pass
        elif c is None:
            raise _bad("it ends too early")
        else:
            self.scalar()

    def strings(self) -> list[str]:
        if self.null():
            return []
        if self.peek() != 0x5B:
            raise _bad("expected a list of ids")
        out = []
        for _ in self.elements():
            out.append(self.small_string())
            if len(out) > MAX_TAG_IDS:
                raise _bad(f"more than {MAX_TAG_IDS} tag ids")
        return out

    def base64_into(self, sink: IO[bytes], max_bytes: int) -> bool:
        """A base64 string's bytes into ``sink`` as they arrive; False (and the rest skipped) once
        they pass ``max_bytes``."""
        self.expect(b'"')
        carry, written, fits = b"", 0, True
        for piece in self.raw_string():
            if not fits:
                continue
            if piece[:1] == b"\\":
                if piece != b"\\/":
                    raise _bad("an image's contents are not base64")
                piece = b"/"
            data = carry + piece
            cut = len(data) - len(data) % 4
            carry = data[cut:]
            try:
                decoded = base64.b64decode(data[:cut], validate=True)
            except binascii.Error as e:
                raise _bad("an image's contents are not base64") from e
            written += len(decoded)
            if written > max_bytes:
                fits = False
                continue
            sink.write(decoded)
        if fits and carry:
            raise _bad("an image's contents are not base64 (their length is not a multiple of 4)")
        return fits


def _parse_batch(reader: _Reader, max_images: int, max_image_bytes: int) -> tuple[list[NewImage], list[str]]:
    images: list[NewImage] = []
    batch_tags: list[str] = []
    if reader.peek() != 0x7B:
        raise _bad("expected a JSON object")
    try:
        for key in reader.members():
            if key == "images":
                if reader.null():
                    continue
                if reader.peek() != 0x5B:
                    raise _bad("'images' is not a list")
                for _ in reader.elements():
                    if len(images) >= max_images:
                        raise TooLarge(f"more than {max_images} images in one batch; send at most {max_images}",
                                       code="too_many_images")
                    images.append(_parse_image(reader, max_image_bytes))
            elif key == "tagIds":
                batch_tags = reader.strings()
            else:
                reader.skip()
        if reader.peek() is not None:
            raise _bad("text after the JSON object")
    except BaseException:
        for image in images:
            if image.file is not None:
                image.file.close()
        raise
    return images, batch_tags


def _parse_image(reader: _Reader, max_image_bytes: int) -> NewImage:
    image = NewImage(name="", tag_ids=[])
    if reader.peek() != 0x7B:
        raise _bad("an image is not a JSON object")
    try:
        for key in reader.members():
            if key == "name":
                image.name = "" if reader.null() else reader.small_string()
            elif key == "contents" and not reader.null():
                if image.file is not None:
                    raise _bad("an image has 'contents' twice")
                image.file = _spool()
                if not reader.base64_into(image.file, max_image_bytes):
                    image.file.close()
                    image.file, image.status = None, "ErrorImageSize"
            elif key == "tagIds":
                image.tag_ids = reader.strings()
            else:
                reader.skip(1)
    except BaseException:
        if image.file is not None:
            image.file.close()
        raise
    if image.file is None and image.status is None:
        image.status = "ErrorSource"  # no contents
    return image


async def read_image_batch(request: Request) -> tuple[list[NewImage], list[str]]:
    """create_images_from_files' body: its images (each in a temporary file the caller closes, or
    refused with a status) and the batch's tag ids."""
    limit = batch_body_limit()
    _declared_length(request, limit)
    stream = request.stream()

    def pull() -> bytes | None:  # on the parsing thread: the next chunk from the event loop
        try:
            return anyio.from_thread.run(stream.__anext__)
        except StopAsyncIteration:
            return None

    try:
        return await run_in_threadpool(_parse_batch, _Reader(pull, limit), MAX_BATCH_IMAGES, MAX_IMAGE_BYTES)
    finally:
        await stream.aclose()


# --- multipart, or a raw body ---------------------------------------------------------------


@dataclass
class Part:
    file: IO[bytes]
    size: int = 0
    fits: bool = True  # False: over the part limit, its data dropped


async def read_parts(request: Request, *, max_parts: int, max_part_bytes: int) -> list[Part]:
    """The body's parts (multipart/form-data), or the raw body as one part. Each part's bytes go
    to a temporary file up to ``max_part_bytes`` (past it the part is marked and the rest dropped);
    more than ``max_parts`` parts is refused (413). The caller closes the files."""
    limit = parts_body_limit(max_parts, max_part_bytes)
    _declared_length(request, limit)
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    parts: list[Part] = []
    seen = 0

    def write(part: Part, data: bytes) -> None:
        if part.fits and part.size + len(data) <= max_part_bytes:
            part.file.write(data)
        else:
            part.fits = False
        part.size += len(data)

    def begin() -> None:
        if len(parts) >= max_parts:
            raise TooLarge(f"more than {max_parts} images in one request", code="too_many_images")
        parts.append(Part(_spool()))

    try:
        if content_type == b"multipart/form-data":
            boundary = options.get(b"boundary")
            if not boundary:
                raise InvalidRequest("the multipart body has no boundary", code="invalid_multipart")
            parser = MultipartParser(boundary, {
                "on_part_begin": begin,
                "on_part_data": lambda data, start, end: write(parts[-1], data[start:end]),
            })
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > limit:
                    raise TooLarge(f"the request body is over the limit of {limit} bytes", code="request_too_large")
                parser.write(chunk)
            parser.finalize()
        else:  # application/octet-stream (or unlabeled): the body is the image
            begin()
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > limit:
                    raise TooLarge(f"the request body is over the limit of {limit} bytes", code="request_too_large")
                write(parts[0], chunk)
        for part in parts:
            part.file.seek(0)
        return [p for p in parts if p.size or not p.fits]
    except MultipartParseError as e:
        _close(parts)
        raise InvalidRequest(f"unreadable multipart body: {e}", code="invalid_multipart") from e
    except BaseException:
        _close(parts)
        raise


def _close(parts: list[Part]) -> None:
    for part in parts:
        part.file.close()
