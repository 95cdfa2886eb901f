import io
import struct
import zlib
from dataclasses import astuple

import numpy as np
import pytest
from PIL import Image

from models.images import ImageInfo, InvalidImage, decode_rgb, hamming, inspect_and_hash, inspect_image, perceptual_hash

MAX_PIXELS = 50_000_000


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo(photo_bytes) -> Image.Image:
    return decode_rgb(photo_bytes[0])


def test_inspect_real_jpeg(photo_bytes):
    for data in photo_bytes:
        info = inspect_image(data, max_pixels=MAX_PIXELS)
        assert isinstance(info, ImageInfo) and info.format == "JPEG"
        with Image.open(io.BytesIO(data)) as im:
            assert (info.width, info.height) == im.size


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_inspect_supported_formats(photo, fmt):
    data = _encode(photo.resize((120, 90)), fmt)
    info = inspect_image(data, max_pixels=MAX_PIXELS)
    assert (info.format, info.width, info.height) == (fmt, 120, 90)
    assert decode_rgb(data).size == (120, 90)


def test_exotic_modes_decode_to_rgb(photo):
    small = photo.resize((64, 48))
    grey16 = Image.fromarray((np.asarray(small.convert("L"), dtype=np.uint16) * 257).astype("<u2"))
    assert grey16.mode.startswith("I;16")
    cases = {
        "16-bit grey": _encode(grey16, "PNG"),
        "CMYK JPEG": _encode(small.convert("CMYK"), "JPEG"),
        "palette": _encode(small.convert("P"), "PNG"),
        "RGBA": _encode(small.convert("RGBA"), "PNG"),
        "LA": _encode(small.convert("LA"), "PNG"),
    }
    for name, data in cases.items():
        inspect_image(data, max_pixels=MAX_PIXELS)
        rgb = decode_rgb(data)
        assert rgb.mode == "RGB" and rgb.size == (64, 48), name
    # 16-bit values are scaled, not clipped to white
    grey = np.asarray(decode_rgb(cases["16-bit grey"]))[..., 0].astype(int)
    assert np.abs(grey - np.asarray(small.convert("L"))).max() <= 1


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    rgba.paste((200, 10, 10, 255), (0, 0, 8, 16))
    arr = np.asarray(decode_rgb(_encode(rgba, "PNG")))
    assert tuple(arr[0, 0]) == (200, 10, 10) and tuple(arr[0, 15]) == (255, 255, 255)


def test_exif_orientation_is_applied(photo):
    img = photo.resize((80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = _encode(img, "JPEG", exif=exif.tobytes())
    assert decode_rgb(data).size == (40, 80)  # as displayed
    # the sides an image row and the API show are the displayed ones too, as the thumbnail's and
    # what training sees (before: 80 x 40, as stored, for a photo every viewer shows 40 x 80)
    info, _ = inspect_and_hash(data, max_pixels=MAX_PIXELS)
    assert (info.width, info.height) == (40, 80) == astuple(inspect_image(data, max_pixels=MAX_PIXELS))[1:3]
    plain = _encode(img, "JPEG")
    assert astuple(inspect_image(plain, max_pixels=MAX_PIXELS))[1:3] == (80, 40)


def test_draft_mode_decodes_big_jpeg_smaller_but_not_below_hint(photo_bytes):
    big = max(photo_bytes, key=len)
    full = decode_rgb(big)
    small = decode_rgb(big, size_hint=100)
    assert min(small.size) >= 100
    if min(full.size) >= 200:
        assert small.size[0] < full.size[0]


@pytest.mark.parametrize(
    "data, code",
    [
        (b"", "empty_file"),
        (b"this is not an image at all" * 10, "not_an_image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not_an_image"),
    ],
)
def test_bad_bytes(data, code):
    with pytest.raises(InvalidImage) as e:
        inspect_image(data, max_pixels=MAX_PIXELS)
    assert e.value.code == code and e.value.message


def test_truncated_jpeg_and_png(photo_bytes, photo):
    for data in (photo_bytes[0][: len(photo_bytes[0]) // 2], _encode(photo, "PNG")[:5000]):
        with pytest.raises(InvalidImage) as e:
            inspect_image(data, max_pixels=MAX_PIXELS)
        assert e.value.code in ("truncated_image", "not_an_image")
        with pytest.raises(InvalidImage):
            decode_rgb(data)
    with pytest.raises(InvalidImage) as e:
        inspect_image(photo_bytes[0][: len(photo_bytes[0]) // 2], max_pixels=MAX_PIXELS)
    assert e.value.code == "truncated_image"


@pytest.mark.parametrize("fraction", [0.3, 0.9])
def test_a_truncated_webp_is_truncated_not_unknown(photo, fraction):
    """Pillow cannot even open a cut WebP ('could not create decoder object'): it answered not_an_image,
    as if the bytes were no image at all. Its RIFF header says how long it should be."""
    data = _encode(photo, "WEBP")
    for check in (lambda d: inspect_image(d, max_pixels=MAX_PIXELS), lambda d: inspect_and_hash(d, max_pixels=MAX_PIXELS), decode_rgb):
        with pytest.raises(InvalidImage) as e:
            check(data[: int(len(data) * fraction)])
        assert e.value.code == "truncated_image" and "WebP" in e.value.message
    with pytest.raises(InvalidImage) as e:  # a RIFF file of another kind is still no image of ours
        inspect_image(b"RIFF" + (100).to_bytes(4, "little") + b"WAVEfmt " + bytes(20), max_pixels=MAX_PIXELS)
    assert e.value.code == "not_an_image"


def _png_claiming(width: int, height: int) -> bytes:
    """A valid small PNG whose IHDR claims another size (CRC fixed): a decompression bomb header."""
    data = bytearray(_encode(Image.new("RGB", (8, 8)), "PNG"))
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    return bytes(data)


def test_decompression_bomb_is_refused_from_the_header():
    with pytest.raises(InvalidImage) as e:
        inspect_image(_png_claiming(100_000, 100_000), max_pixels=MAX_PIXELS)
    # past twice Pillow's own limit its guard fires first: the message quoted Pillow's 178956970
    assert e.value.code == "image_too_large" and e.value.message == f"10000000000 pixels exceeds {MAX_PIXELS}"
    with pytest.raises(InvalidImage) as e:
        decode_rgb(_png_claiming(100_000, 100_000))  # Pillow's own bomb guard
    assert e.value.code == "image_too_large"


def test_decode_refuses_over_max_pixels_from_the_header(photo_bytes):
    """The prediction path's limit: checked before any pixel is decoded (this PNG's pixel data
    is 8x8, so decoding it would fail as truncated, not as too large)."""
    with pytest.raises(InvalidImage) as e:
        decode_rgb(_png_claiming(10_000, 10_000), max_pixels=MAX_PIXELS)
    assert e.value.code == "image_too_large" and "10000x10000" in e.value.message
    with Image.open(io.BytesIO(photo_bytes[0])) as im:
        w, h = im.size
    with pytest.raises(InvalidImage) as e:  # the stored size, not the reduced JPEG draft's
        decode_rgb(photo_bytes[0], size_hint=8, max_pixels=w * h - 1)
    assert e.value.code == "image_too_large"
    assert decode_rgb(photo_bytes[0], max_pixels=w * h).size in ((w, h), (h, w))  # the limit itself passes


def test_limits(photo_bytes):
    with pytest.raises(InvalidImage) as e:
        inspect_image(photo_bytes[0], max_pixels=1000)
    assert e.value.code == "image_too_large"
    with pytest.raises(InvalidImage) as e:
        inspect_image(_encode(Image.new("RGB", (4, 40)), "PNG"), max_pixels=MAX_PIXELS, min_side=8)
    assert e.value.code == "image_too_small"


def test_unsupported_format(photo):
    for fmt in ("ICO", "PPM"):
        with pytest.raises(InvalidImage) as e:
            inspect_image(_encode(photo.resize((32, 32)), fmt), max_pixels=MAX_PIXELS)
        assert e.value.code == "unsupported_format"


@pytest.mark.parametrize("data, named", [
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64, "HEIC"),  # an iPhone photo
    (b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1heixmiaf" + b"\x00" * 64, "HEIC"),
    (b'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "SVG"),
    (b'  <svg xmlns="http://www.w3.org/2000/svg"><rect width="5" height="5"/></svg>', "SVG"),
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n" + b"\x00" * 64, "PDF"),
])
def test_well_known_formats_felis_does_not_read_are_named(data, named):
    """A HEIC photo, an SVG or a PDF is an image file to its user: 'unsupported_format', naming it,
    where Pillow cannot tell it from junk (before: not_an_image, 'not a recognised image format')."""
    with pytest.raises(InvalidImage) as e:
        inspect_image(data, max_pixels=MAX_PIXELS)
    assert e.value.code == "unsupported_format" and named in e.value.message
    with pytest.raises(InvalidImage) as e:
        inspect_image(b"not an image" * 10, max_pixels=MAX_PIXELS)
    assert e.value.code == "not_an_image"


def test_perceptual_hash_finds_near_duplicates(photo_bytes, photo):
    h = perceptual_hash(photo_bytes[0])
    assert len(h) == 16 and int(h, 16) >= 0
    copy = _encode(photo.resize((photo.width // 3, photo.height // 3)), "JPEG", quality=60)
    assert hamming(h, perceptual_hash(copy)) <= 6
    others = [hamming(h, perceptual_hash(d)) for d in photo_bytes[1:]]
    assert min(others) > 10


def test_inspect_and_hash_answers_as_inspect_image_and_perceptual_hash(datasets, photo_bytes, photo):
    """One decode for both (uploads): the same info, hash and error codes as the two calls, on
    real photos, CIFAR and catvnoncat images, every supported format, exotic modes, EXIF
    rotation, and broken, truncated, oversized and undersized files."""
    from models.images import inspect_and_hash

    real = [p.read_bytes() for folder, n in (("photos/train/cat", 40), ("photos/train/noncat", 40), ("catvnoncat/train/cat", 10))
            for p in sorted((datasets / folder).iterdir())[:n]]
    real += [p.read_bytes() for p in sorted((datasets / "cifar-cat").rglob("*.*"))[:20] if p.is_file()]
    small = photo.resize((64, 48))
    exif = Image.Exif()
    exif[0x0112] = 6
    made = [_encode(photo.resize((120, 90)), fmt) for fmt in ("PNG", "WEBP", "BMP", "GIF", "TIFF")]
    made += [_encode(small.convert(m), f) for m, f in (("CMYK", "JPEG"), ("L", "JPEG"), ("P", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"))]
    made += [_encode(photo.resize((80, 40)), "JPEG", exif=exif.tobytes())]
    bad = [b"", b"not an image" * 10, photo_bytes[0][: len(photo_bytes[0]) // 2], _encode(photo, "PNG")[:5000],
           _png_claiming(100_000, 100_000), _encode(Image.new("RGB", (4, 40)), "PNG"), _encode(photo.resize((32, 32)), "ICO")]
    assert len(real) >= 100
    for data in [*photo_bytes, *real, *made, *bad]:
        try:
            expected = (inspect_image(data, max_pixels=MAX_PIXELS), perceptual_hash(data))
        except InvalidImage as e:
            expected = e.code
        try:
            got = inspect_and_hash(data, max_pixels=MAX_PIXELS)
        except InvalidImage as e:
            got = e.code
        assert got == expected
