"""Image bytes -> validated metadata, RGB pictures and perceptual hashes.

One place decides what counts as an image, shared by upload (inspect_image, or with the
perceptual hash in one decode: inspect_and_hash), training and prediction (decode_rgb) and
near-duplicate detection (perceptual_hash). No torch here, so the upload path does not load it.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO")  # MPO: JPEG from cameras


class InvalidImage(Exception):
    """Bytes that are not a usable image; `code` is stable and machine-readable."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        # not_an_image | truncated_image | unsupported_format | image_too_large | image_too_small | empty_file,
        # and file_too_large (over a byte limit, refused by the caller before it gets here)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ImageInfo:
    format: str  # Pillow format name, e.g. "JPEG"
    width: int  # pixels, as displayed (EXIF orientation applied, as decode_rgb does)
    height: int  # pixels
    mode: str  # Pillow mode as stored, e.g. "RGB", "L", "CMYK", "I;16", "P"


_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}


def _known_unsupported(data: bytes) -> str | None:
    """The name of a well-known format Pillow does not read here, from its first bytes: what a
    user sends as an image (iPhone photos are HEIC) deserves to hear which."""
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return "HEIC/HEIF"
    if data.startswith(b"%PDF-"):
        return "PDF"
    head = data[:1024].lstrip().lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head):
        return "SVG"
    return None


def _open(data: bytes, max_pixels: int | None = None) -> Image.Image:
    if not data:
        raise InvalidImage("empty_file", "the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise InvalidImage("image_too_large", _too_large(str(e), max_pixels)) from None
    except UnidentifiedImageError:
        known = _known_unsupported(data)
        if known:
            raise InvalidImage("unsupported_format", f"{known} is not supported: convert it to JPEG or PNG") from None
        raise InvalidImage("not_an_image", "not a recognised image format") from None
    except (OSError, ValueError, SyntaxError) as e:  # broken headers
        if _riff_webp_cut_short(data):
            raise InvalidImage("truncated_image", f"the WebP file is truncated: {len(data)} of the "
                               f"{int.from_bytes(data[4:8], 'little') + 8} bytes its header announces") from None
        raise InvalidImage("not_an_image", f"unreadable image header: {e}") from None


def _too_large(pillow_message: str, max_pixels: int | None) -> str:
    """Pillow's bomb guard fires at twice its own limit, before felis's check can: its message
    names Pillow's limit (178956970), not the one the caller set, which is the one to quote."""
    found = re.search(r"\((\d+) pixels\)", pillow_message)
    if max_pixels is None or not found:
        return pillow_message
    return f"{found.group(1)} pixels exceeds {max_pixels}"


def _riff_webp_cut_short(data: bytes) -> bool:
    """A WebP (RIFF....WEBP) shorter than its RIFF header's size: Pillow cannot open it at all."""
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) < int.from_bytes(data[4:8], "little") + 8


def _load(img: Image.Image) -> None:
    """Decode the pixels, mapping Pillow's many failure types to InvalidImage."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except Image.DecompressionBombError as e:
        raise InvalidImage("image_too_large", str(e)) from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, MemoryError) as e:
        msg = str(e)
        code = "truncated_image" if ("truncated" in msg or isinstance(e, EOFError)) else "not_an_image"
        raise InvalidImage(code, f"cannot decode image: {msg or type(e).__name__}") from None


def _check_pixels(img: Image.Image, max_pixels: int) -> None:
    """From the header (img.size as stored), before any pixel is decoded: decompression bombs."""
    w, h = img.size
    if w * h > max_pixels:
        raise InvalidImage("image_too_large", f"{w}x{h} = {w * h} pixels exceeds {max_pixels}")


def inspect_image(data: bytes, *, max_pixels: int, min_side: int = 8) -> ImageInfo:
    """Check that `data` is a supported, fully decodable image of sane size.

    The size is checked from the header before any pixel is decoded (decompression bombs).
    JPEGs are decoded at reduced DCT scale: every byte is still read, but no big buffer is made.
    """
    img = _open(data, max_pixels)
    with img:
        info = _checked_header(img, max_pixels, min_side)
        if img.format in ("JPEG", "MPO"):
            img.draft(img.mode, (min_side, min_side))
        _load(img)
    return info


def inspect_and_hash(data: bytes, *, max_pixels: int, min_side: int = 8) -> tuple[ImageInfo, str]:
    """inspect_image(data) and perceptual_hash(data) with one decode instead of two (what an
    upload checks of every file): the same answers and the same InvalidImage codes, the pixels
    decoded once at the perceptual hash's scale (every byte is still read)."""
    img = _open(data, max_pixels)
    with img:
        info = _checked_header(img, max_pixels, min_side)
        return info, _phash(_decoded_rgb(img, PHASH_DECODE_SIDE))


def _checked_header(img: Image.Image, max_pixels: int, min_side: int) -> ImageInfo:
    """What inspect_image checks before decoding: a supported format, the pixel bound, the sides."""
    fmt, (w, h), mode = img.format or "", img.size, img.mode
    _check_format_and_size(img, max_pixels, min_side)
    if _orientation(img) in _QUARTER_TURNS:
        w, h = h, w
    return ImageInfo(format="JPEG" if fmt == "MPO" else fmt, width=w, height=h, mode=mode)


_ORIENTATION = 0x0112  # the EXIF tag exif_transpose follows
_QUARTER_TURNS = (5, 6, 7, 8)  # the orientations whose display swaps width and height


def _orientation(img: Image.Image) -> int | None:
    """The EXIF orientation from what the header holds, decoding no pixel (a PNG's eXIf chunk
    after its pixels is not looked for: Pillow would decode them to find it). None when absent or
    unreadable: the decode that follows says what is wrong with the file."""
    if img.format == "PNG" and "exif" not in img.info:
        return None
    try:
        return img.getexif().get(_ORIENTATION)
    except Exception:  # a truncated or malformed EXIF block: Pillow raises struct, OS or value errors
        return None


def _check_format_and_size(img: Image.Image, max_pixels: int | None, min_side: int) -> None:
    """From the header alone: a supported format, the pixel bound (None: none), the smallest side."""
    if img.format not in SUPPORTED_FORMATS:
        raise InvalidImage("unsupported_format", f"format {img.format or 'unknown'} is not supported")
    if max_pixels is not None:
        _check_pixels(img, max_pixels)
    w, h = img.size
    if min(w, h) < min_side:
        raise InvalidImage("image_too_small", f"{w}x{h}: a side is below {min_side} pixels")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited over white."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):  # 16/32-bit grey: scale, don't clip
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a * (255.0 / hi), 0, 255).round().astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_rgb(data: bytes, size_hint: int | None = None, max_pixels: int | None = None, min_side: int = 0) -> Image.Image:
    """Decode to an upright (EXIF-transposed) 8-bit RGB image, of a supported format only
    (InvalidImage "unsupported_format" from the header: Pillow never decodes the others, so an
    EPS file never reaches Ghostscript).

    size_hint: the side the caller will resize to; JPEGs are then decoded at the smallest DCT
    scale (1/2, 1/4, 1/8) that still gives at least size_hint pixels per side (much faster).
    max_pixels: width * height as stored, checked from the header before any pixel is decoded
    (InvalidImage "image_too_large" past it); None: Pillow's own bomb guard only.
    min_side: "image_too_small" under it (predict checks what upload checks; stored images were
    checked when they came in, under the setting of that day, so training passes 0).
    """
    img = _open(data, max_pixels)
    _check_format_and_size(img, max_pixels, min_side)
    return _decoded_rgb(img, size_hint)


def _decoded_rgb(img: Image.Image, size_hint: int | None) -> Image.Image:
    if size_hint and img.format in ("JPEG", "MPO"):
        img.draft("RGB", (size_hint, size_hint))
    _load(img)
    try:  # in place: an upright picture (most) is not copied, 0.3 ms saved per 500x375 photo
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # a corrupt EXIF block must not lose an otherwise fine picture
        pass
    return to_rgb(img)


PHASH_DECODE_SIDE = 64  # JPEGs are decoded for the perceptual hash at the smallest DCT scale keeping this many pixels a side


def perceptual_hash(data: bytes) -> str:
    """64-bit DCT perceptual hash as 16 hex chars; near-duplicates differ in few bits."""
    return _phash(decode_rgb(data, size_hint=PHASH_DECODE_SIDE))


def _phash(rgb: Image.Image) -> str:
    import imagehash  # imported lazily: only training/upload need it

    return str(imagehash.phash(rgb))


def hamming(a: str, b: str) -> int:
    """Number of differing bits between two hex hashes."""
    return bin(int(a, 16) ^ int(b, 16)).count("1")
