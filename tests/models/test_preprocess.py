import io

import numpy as np
import pytest
from PIL import Image

from models.images import decode_rgb
from models.preprocess import Preprocessing, preprocess, preprocess_batch, uint8_batch

LITE = Preprocessing(image_size=96, resize="center_crop", crop_fraction=0.875, mean=127.0, std=128.0)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_shape_dtype_and_range(photo_bytes):
    x = preprocess(photo_bytes[0], LITE)
    assert x.shape == (3, 96, 96) and x.dtype == np.float32 and x.flags["C_CONTIGUOUS"]
    assert x.min() >= (0 - 127) / 128 and x.max() <= (255 - 127) / 128
    assert x.std() > 0.05  # a real photo, not a flat image
    batch = preprocess_batch(photo_bytes[:3], LITE)
    assert batch.shape == (3, 3, 96, 96)
    np.testing.assert_array_equal(batch[0], x)
    assert preprocess_batch([], LITE).shape == (0, 3, 96, 96)


def test_normalisation_values_per_channel():
    img = Image.new("RGB", (40, 40), (255, 127, 0))
    prep = Preprocessing(16, "squash", 1.0, (123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
    x = preprocess(_png(img), prep)
    np.testing.assert_allclose(x[:, 5, 5], [(255 - 123.675) / 58.395, (127 - 116.28) / 57.12, (0 - 103.53) / 57.375], rtol=1e-6)


def test_center_crop_keeps_the_middle_and_squash_keeps_everything():
    img = Image.new("RGB", (300, 100), (255, 0, 0))  # red, with a green centre square
    img.paste((0, 255, 0), (100, 0, 200, 100))
    crop = preprocess(_png(img), Preprocessing(32, "center_crop", 1.0, 0.0, 1.0))
    # only green survives (the outermost columns may blend with the neighbouring red: filter support)
    assert crop[1, :, 1:-1].min() > 250 and crop[0, :, 1:-1].max() < 5 and crop[0].max() < 40
    squash = preprocess(_png(img), Preprocessing(30, "squash", 1.0, 0.0, 1.0))
    assert squash[0, 15, 0] > 250 and squash[1, 15, 15] > 250 and squash[0, 15, 29] > 250


def test_crop_fraction_drops_the_border():
    img = Image.new("RGB", (100, 100), (0, 0, 255))
    img.paste((255, 255, 255), (8, 8, 92, 92))  # a 8 px blue frame
    x = preprocess(_png(img), Preprocessing(32, "center_crop", 0.8, 0.0, 1.0))
    assert x[:, 1:-1, 1:-1].min() > 250 and x[2].min() > 200  # the frame is outside the central 80 %


def test_pil_input_equals_bytes_input(photo_bytes):
    img = decode_rgb(photo_bytes[1], size_hint=LITE.decode_size)
    np.testing.assert_array_equal(preprocess(img, LITE), preprocess(photo_bytes[1], LITE))


def test_uint8_batch_matches_preprocess(photo_bytes):
    u8 = uint8_batch(photo_bytes[:2], LITE)
    assert u8.dtype == np.uint8 and u8.shape == (2, 3, 96, 96)
    np.testing.assert_allclose((u8.astype(np.float32) - 127.0) / 128.0, preprocess_batch(photo_bytes[:2], LITE), atol=1e-6)


def test_max_pixels_refuses_big_images(photo_bytes):
    from models.images import InvalidImage

    with Image.open(io.BytesIO(photo_bytes[0])) as im:
        w, h = im.size
    np.testing.assert_array_equal(preprocess(photo_bytes[0], LITE, max_pixels=w * h), preprocess(photo_bytes[0], LITE))
    with pytest.raises(InvalidImage) as e:
        preprocess(photo_bytes[0], LITE, max_pixels=w * h - 1)
    assert e.value.code == "image_too_large"


def test_dict_roundtrip_and_validation():
    for prep in (LITE, Preprocessing(224, "squash", 1.0, (1.0, 2.0, 3.0), (4.0, 5.0, 6.0))):
        assert Preprocessing.from_dict(prep.to_dict()) == prep
    with pytest.raises(ValueError):
        Preprocessing(96, "stretch")
    with pytest.raises(ValueError):
        Preprocessing(96, crop_fraction=0.1)
