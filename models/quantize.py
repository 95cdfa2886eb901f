"""INT8 backbones for CPU: the frozen feature extractor quantized once, from a shipped range table.

Why: on the 2-core machines felis targets, EfficientNet-Lite0 (built for integer inference:
ReLU6, no squeeze-excite) runs 2-2.5x faster in ONNX Runtime's INT8 kernels (VNNI) than in
float32, with the same linear-probe accuracy (photos, catvnoncat, cifar-cat: see
bench/RESULTS.md). Both training (features) and predict run the same INT8 graph, so a version's
validation metrics describe exactly what is served.

How: static QDQ quantization (per-channel int8 weights, uint8 activations with MinMax ranges).
Activation ranges are a property of the backbone and of natural images, not of one user's
dataset, so they are measured once (`python -m models.quantize calibrate FOLDER`) and shipped
as a small JSON table per architecture in models/quant/. Quantizing with a known table takes
about 2 s and needs no images; a worker does it once per process (features.warm_extractor).
A table is valid only for the weights it was measured with (their sha256 is in it).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import os
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

TABLES = Path(__file__).with_name("quant")
FORMAT = 1


class NoRangeTable(ValueError):
    """INT8 was asked for a backbone without a matching range table."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read once per process while its size and mtime stay the same (the
    weights file is hashed for the training's precision check, the range table and the feature id)."""
    st = os.stat(path)
    return _sha256_file(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_file(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def table_path(arch_name: str) -> Path:
    return TABLES / f"{arch_name}.json"


def load_table(arch_name: str, weights_path: str | None) -> dict:
    """The range table for this backbone and weights file; NoRangeTable when there is none."""
    path = table_path(arch_name)
    if weights_path is None or not path.is_file():
        raise NoRangeTable(f"no INT8 range table for {arch_name}; use precision fp32")
    table = json.loads(path.read_text())
    if table.get("format") != FORMAT or table.get("weights_sha256") != sha256_file(weights_path):
        raise NoRangeTable(f"the INT8 range table for {arch_name} was measured with other weights; use precision fp32")
    return table


def table_id(table: dict) -> str:
    """Short, stable name of a table's contents (part of the feature-cache key)."""
    return hashlib.sha256(json.dumps(table["ranges"], sort_keys=True).encode()).hexdigest()[:12]


def quantize_features(fp32_onnx: bytes, table: dict) -> bytes:
    """A float32 features graph (features_graph.fp32_features_onnx) -> the same graph in INT8 (QDQ)."""
    from onnxruntime.quantization import CalibrationMethod, quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    ranges = TensorsData(CalibrationMethod.MinMax, {
        name: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for name, (lo, hi) in table["ranges"].items()})
    with _workdir(fp32_onnx) as d:
        save_tensors_data(ranges, d / "ranges.json")
        quantize_static(d / "pre.onnx", d / "int8.onnx", None, calibration_cache_path=d / "ranges.json", **_options())
        return (d / "int8.onnx").read_bytes()


@contextlib.contextmanager
def _workdir(fp32_onnx: bytes) -> Iterator[Path]:
    """A temporary folder holding pre.onnx: the float32 graph after ONNX Runtime's quantization
    pre-processing, which folds constants so tensor names match the range table's."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="felis-quant-") as tmp:
        d = Path(tmp)
        (d / "fp32.onnx").write_bytes(fp32_onnx)
        quant_pre_process(d / "fp32.onnx", d / "pre.onnx", skip_symbolic_shape=True)
        yield d


RECIPE = "w7"  # in the feature-cache key (features.Extractor): features of another recipe are other features


def _options() -> dict:
    """The one quantization recipe (calibration and quantization must agree).

    Weights in 7 bits (reduce_range): without VNNI (AVX2, AVX-512 before Cascade Lake; AMD before
    Zen 4) ONNX Runtime's u8 x s8 kernels add pairs of products in int16 (VPMADDUBSW), which
    saturates with 8-bit weights: on an AVX2-only EPYC the features' cosine to float32 fell to 0.92
    and served probabilities moved by up to 0.29 from the float32 network's. 7-bit weights cannot
    saturate (2 x 255 x 64 < 32767), cost the same time (13.4-14.5 against 13.9-15.1 ms an image,
    one thread, batch 8, that machine), and a graph made on one CPU serves the same on any other."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    return dict(quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax, reduce_range=True)


def calibrate(fp32_onnx: bytes, batches, weights_path: str, about: dict) -> dict:
    """Measure activation ranges of a float32 features graph on batches of preprocessed images
    ({"images": float32 NCHW} dicts) -> a range table (see load_table)."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static
    from onnxruntime.quantization.calibrate import load_tensors_data

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            return next(self.it, None)

    with _workdir(fp32_onnx) as d:
        quantize_static(d / "pre.onnx", d / "int8.onnx", Reader(), calibration_cache_path=d / "ranges.json", **_options())
        measured = load_tensors_data(d / "ranges.json")
    ranges = {name: [float(np.asarray(t.range_value[0]).item()), float(np.asarray(t.range_value[1]).item())]
              for name, t in sorted(measured.data.items())}
    return {"format": FORMAT, "weights_sha256": sha256_file(weights_path), "calibration": about, "ranges": ranges}


def _calibrate_cli(argv: list[str] | None = None) -> None:
    """python -m models.quantize calibrate FOLDER [--images 128] [--arch efficientnet_lite0]"""
    from . import networks
    from .features_graph import fp32_features_onnx, frozen_classifier
    from .images import InvalidImage
    from .preprocess import preprocess_batch

    p = argparse.ArgumentParser(prog="python -m models.quantize")
    p.add_argument("command", choices=["calibrate"])
    p.add_argument("folder", type=Path, help="natural photos (searched recursively)")
    p.add_argument("--arch", default="efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=288)
    p.add_argument("--images", type=int, default=128, help="how many, drawn with a fixed seed")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    files = sorted(f for f in args.folder.rglob("*") if f.is_file())
    rng = np.random.default_rng(args.seed)
    chosen = [files[i] for i in sorted(rng.choice(len(files), min(args.images, len(files)), replace=False))]
    arch = {"name": args.arch, "image_size": args.image_size, "pooling": "avgmax", "num_classes": 2}
    prep = networks.default_preprocessing(args.arch, args.image_size)
    weights = networks.default_weights_path(args.arch)
    graph = fp32_features_onnx(frozen_classifier(arch, weights), prep.image_size)  # the float32 graph the extractor runs

    def batches():
        for i in range(0, len(chosen), 16):
            try:
                yield {"images": preprocess_batch([f.read_bytes() for f in chosen[i : i + 16]], prep)}
            except InvalidImage:
                continue

    about = {"images": len(chosen), "image_size": args.image_size, "seed": args.seed, "folder": str(args.folder),
             "method": "MinMax, QDQ, per-channel int8 weights, uint8 activations"}
    table = calibrate(graph, batches(), weights, about)
    TABLES.mkdir(exist_ok=True)
    table_path(args.arch).write_text(json.dumps(table, indent=0, sort_keys=True) + "\n")
    print(f"{table_path(args.arch)}: {len(table['ranges'])} tensors from {len(chosen)} images")


if __name__ == "__main__":
    _calibrate_cli()
