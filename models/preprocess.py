"""The one preprocessing used by training, evaluation, export checks and prediction.

A `Preprocessing` travels inside every checkpoint, so a model is always fed exactly the
pixels it was trained on. Values are in 0..255 pixel units: x_net = (x - mean) / std.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np
from PIL import Image

from .images import decode_rgb, to_rgb

RESIZE_MODES = ("squash", "center_crop")
TF_LITE_MEAN, TF_LITE_STD = 127.0, 128.0  # EfficientNet-Lite (converted from TensorFlow)
IMAGENET_MEAN = (123.675, 116.28, 103.53)  # torchvision models, in 0..255 units
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class Preprocessing:
    image_size: int  # pixels; the network sees image_size x image_size
    resize: str = "center_crop"  # center_crop: central square (aspect kept); squash: whole image to a square
    crop_fraction: float = 0.875  # keep this central fraction of the side(s) before resizing (1.0: all)
    mean: float | tuple[float, ...] = TF_LITE_MEAN  # per channel (R, G, B) or one for all, 0..255 units
    std: float | tuple[float, ...] = TF_LITE_STD  # same units as mean

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if not 0.25 <= self.crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must be 0.25..1.0, got {self.crop_fraction}")
        if not 8 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be 8..1024 pixels, got {self.image_size}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"] = list(self.mean) if isinstance(self.mean, tuple) else float(self.mean)
        d["std"] = list(self.std) if isinstance(self.std, tuple) else float(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        tup = lambda v: tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else float(v)  # noqa: E731
        return cls(int(d["image_size"]), str(d["resize"]), float(d["crop_fraction"]), tup(d["mean"]), tup(d["std"]))

    @property
    def decode_size(self) -> int:
        """Smallest side worth decoding: the crop must not need upsampling."""
        return math.ceil(self.image_size / self.crop_fraction)


def resize(img: Image.Image, prep: Preprocessing) -> Image.Image:
    """RGB picture of any size -> image_size x image_size (antialiased bilinear).

    center_crop: the central square of side crop_fraction * short side (ImageNet-style eval crop);
    squash: the central crop_fraction of width and of height, aspect ratio not kept.
    """
    w, h = img.size
    if prep.resize == "center_crop":
        cw = ch = prep.crop_fraction * min(w, h)
    else:
        cw, ch = prep.crop_fraction * w, prep.crop_fraction * h
    box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
    return img.resize((prep.image_size, prep.image_size), Image.BILINEAR, box=box, reducing_gap=3.0)


def to_array(img: Image.Image, prep: Preprocessing) -> np.ndarray:
    """Resized RGB picture -> normalised float32 CHW."""
    chw = np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))  # transpose the bytes, not floats
    mean = np.broadcast_to(np.asarray(prep.mean, dtype=np.float32), 3).reshape(3, 1, 1)
    std = np.broadcast_to(np.asarray(prep.std, dtype=np.float32), 3).reshape(3, 1, 1)
    out = np.subtract(chw, mean, dtype=np.float32)
    out /= std  # (x - mean) / std, the same float32 operations as before
    return out


def resized_rgb(data: bytes | Image.Image, prep: Preprocessing, max_pixels: int | None = None,
                min_side: int = 0) -> Image.Image:
    """Image bytes (or a decoded picture, assumed upright) -> image_size x image_size RGB.

    max_pixels, min_side: bytes whose header says more pixels, or a side under min_side, are
    refused before decoding (images.decode_rgb)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        img = decode_rgb(data, size_hint=prep.decode_size, max_pixels=max_pixels, min_side=min_side)
    else:
        img = to_rgb(data)
    return resize(img, prep)


def preprocess(data: bytes | Image.Image, prep: Preprocessing, max_pixels: int | None = None,
               min_side: int = 0) -> np.ndarray:
    """Image bytes (or a decoded picture) -> float32 array (3, image_size, image_size)."""
    return to_array(resized_rgb(data, prep, max_pixels, min_side), prep)


def preprocess_uint8(data: bytes | Image.Image, prep: Preprocessing, max_pixels: int | None = None,
                     min_side: int = 0) -> np.ndarray:
    """Image bytes (or a decoded picture) -> uint8 array (3, image_size, image_size): the same resized
    pixels as `preprocess`, not yet normalised. For a network on a GPU, which normalises them itself
    (networks.normalizer: the same float32 operations as to_array): a quarter of the bytes to copy,
    and no float work on the decode threads (at 288 px about half of a small image's cost)."""
    return np.ascontiguousarray(np.asarray(resized_rgb(data, prep, max_pixels, min_side), dtype=np.uint8).transpose(2, 0, 1))


def preprocess_batch(items: Iterable[bytes | Image.Image], prep: Preprocessing) -> np.ndarray:
    """Several images -> float32 NCHW batch."""
    arrays = [preprocess(x, prep) for x in items]
    if not arrays:
        return np.zeros((0, 3, prep.image_size, prep.image_size), np.float32)
    return np.stack(arrays)


def uint8_batch(items: Iterable[bytes | Image.Image], prep: Preprocessing) -> np.ndarray:
    """Several images -> uint8 NCHW batch, resized but not normalised (compact, for augmentation)."""
    arrays = [preprocess_uint8(x, prep) for x in items]
    return np.stack(arrays) if arrays else np.zeros((0, 3, prep.image_size, prep.image_size), np.uint8)
