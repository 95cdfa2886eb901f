"""A training's peak memory on a worker, estimated from its resolved TrainConfig and the dataset's
size, without torch: the API refuses options that cannot fit before anything is queued.

    peak = runtime + network + data + batch + decode

- runtime: the worker's libraries (PyTorch, ONNX Runtime), the ONNX export at the end, and in
  fine-tuning autograd's and oneDNN's workspaces.
- network: the parameters (float32), and in fine-tuning their gradients and AdamW's two moments.
- data: linear mode keeps n_images x feature_dim float16 features, once (models/features.py
  fills them from the cache CACHE_CHUNK images at a time; the head's solver reads them by row, in
  chunks: models/linear.py), a few KB per image besides (the samples, their ids and hashes, the
  held-out logits and probabilities), and a fixed working set: the solver's preconditioner
  (feature_dim^2 float32, with one Cholesky factor per l2 tried), the cache's and the
  extractor's float32 chunk; fine-tuning keeps every image decoded as uint8 (3 x S^2 bytes), twice (all, and the splits).
- batch: fine-tuning keeps, per image of a batch, what autograd saves for the backward pass
  (per architecture, measured at 224 px, scaling with the pixels: S^2); linear mode's feature
  batches need the float32 input and the network's activations, without the backward pass.
- decode: the largest stored image, decoded at full size before it is resized.

The constants are fitted to the peak RSS of real trainings (bench/training_memory.py; table and
machine in bench/RESULTS.md), float32 throughout (CPUs with native bf16 need less), then rounded
up; each term stays above what was measured. A GPU worker keeps the batch on the GPU: there the
estimate is an upper bound of the host's memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import TrainConfig

MIB = 1 << 20


@dataclass(frozen=True)
class Architecture:
    params: int  # parameters of the backbone
    channels: int  # channels of its feature map (the head's input per pooling)
    saved_mb: float  # MB (10^6 bytes) autograd saves for the backward pass per image at 224 px, float32
    largest_mb: float  # MB of its largest activation per image at 224 px, float32


# `python bench/training_memory.py --table` (PyTorch's meta device: no weights, no compute);
# simple_cnn at its default width 32 (params scale with width^2, activations with width)
ARCHITECTURES: dict[str, Architecture] = {
    "efficientnet_lite0": Architecture(3371008, 1280, 82.4, 4.9),
    "simple_cnn": Architecture(1173216, 256, 57.6, 6.4),
    "convnext_base": Architecture(87564416, 1024, 232.0, 6.4),
    "convnext_large": Architecture(196227264, 1536, 347.6, 9.6),
    "convnext_small": Architecture(49453152, 768, 174.2, 4.8),
    "convnext_tiny": Architecture(27818592, 768, 109.2, 4.8),
    "efficientnet_b0": Architecture(4007548, 1280, 88.4, 4.8),
    "efficientnet_b1": Architecture(6513184, 1280, 123.1, 4.8),
    "efficientnet_b2": Architecture(7700994, 1408, 129.1, 4.8),
    "efficientnet_b3": Architecture(10696232, 1536, 170.8, 7.2),
    "efficientnet_b4": Architecture(17548616, 1792, 225.5, 7.2),
    "efficientnet_b5": Architecture(28340784, 2048, 310.5, 7.2),
    "efficientnet_b6": Architecture(40735704, 2304, 397.4, 9.6),
    "efficientnet_b7": Architecture(63786960, 2560, 533.1, 9.6),
    "efficientnet_v2_l": Architecture(117234272, 1280, 442.3, 3.2),
    "efficientnet_v2_m": Architecture(52858356, 1280, 251.8, 2.4),
    "efficientnet_v2_s": Architecture(20177488, 1280, 154.7, 2.4),
    "mobilenet_v2": Architecture(2223872, 1280, 78.3, 4.8),
    "mobilenet_v3_large": Architecture(2971952, 960, 44.2, 3.2),
    "mobilenet_v3_small": Architecture(927008, 576, 16.2, 0.9),
    "regnet_x_16gf": Architecture(52229536, 2048, 199.3, 12.8),
    "regnet_x_1_6gf": Architecture(8277136, 912, 62.3, 3.6),
    "regnet_x_32gf": Architecture(105290560, 2520, 283.8, 16.9),
    "regnet_x_3_2gf": Architecture(14287552, 1008, 89.4, 4.8),
    "regnet_x_400mf": Architecture(5094976, 400, 25.3, 1.6),
    "regnet_x_800mf": Architecture(6586656, 672, 40.4, 3.2),
    "regnet_x_8gf": Architecture(37651648, 1920, 110.7, 4.0),
    "regnet_y_128gf": Architecture(637419894, 7392, 637.8, 26.5),
    "regnet_y_16gf": Architecture(80565140, 3024, 202.1, 11.2),
    "regnet_y_1_6gf": Architecture(10313430, 888, 72.0, 2.4),
    "regnet_y_32gf": Architecture(141333770, 3712, 267.0, 11.6),
    "regnet_y_3_2gf": Architecture(17923338, 1512, 100.0, 3.6),
    "regnet_y_400mf": Architecture(3903144, 440, 33.7, 2.4),
    "regnet_y_800mf": Architecture(5647512, 784, 46.9, 3.2),
    "regnet_y_8gf": Architecture(37364472, 2016, 172.1, 11.2),
    "resnet101": Architecture(42500160, 2048, 127.3, 3.2),
    "resnet152": Architecture(58143808, 2048, 178.0, 3.2),
    "resnet18": Architecture(11176512, 512, 22.2, 3.2),
    "resnet34": Architecture(21284672, 512, 32.3, 3.2),
    "resnet50": Architecture(23508032, 2048, 86.1, 3.2),
    "resnext101_32x8d": Architecture(86742336, 2048, 247.5, 6.4),
    "resnext101_64x4d": Architecture(81406272, 2048, 247.5, 6.4),
    "resnext50_32x4d": Architecture(22979904, 2048, 112.5, 3.2),
    "wide_resnet101_2": Architecture(124837696, 2048, 167.3, 3.2),
    "wide_resnet50_2": Architecture(66834240, 2048, 112.5, 3.2),
}

# --- fitted to bench/RESULTS.md ("Training memory"), rounded up ---------------------------------------
RUNTIME_BYTES = 900 * MIB  # the libraries (~700 MiB alone) and the ONNX export's (measured, linear: ~840 MiB)
FINETUNE_RUNTIME_BYTES = 512 * MIB  # finetune, besides: autograd's and oneDNN's workspaces (intercept: ~1360 MiB in all)
FINETUNE_BYTES_PER_PARAM = 24  # float32 weights, gradients, AdamW's two moments, its temporaries (measured: ~21)
LINEAR_BYTES_PER_PARAM = 48  # float32 weights, the ONNX graph, ONNX Runtime's session, the export (measured: ~40)
FEATURE_BYTES = 2  # linear: per feature element: float16, held once (issue 17; 24 bytes before: 6 float32 copies)
LINEAR_IMAGE_BYTES = 6144  # linear, per image besides its features: samples, ids, hashes, held-out logits (measured ~3,800)
SOLVER_MATRICES = 7  # linear: feature_dim^2 float32 matrices: the preconditioner's covariance, <= 5 factors, a temporary
CACHE_CHUNK_IMAGES = 4096 * 3  # linear: float32 feature rows in flight: the cache's chunk, its conversion, the extractor's
RESIDENT_IMAGE_COPIES = 2  # finetune: every decoded image, and its split's (train or val) copy
SAVED_FACTOR = 1.0  # finetune, per image of a batch: the architecture's saved_mb, plus...
GRADIENT_ACTIVATIONS = 9  # ...this many of its largest activation (the backward pass's buffers); measured
#                           per image at 224 px: lite0 93-109 MB (estimate 126), resnet50 96 (115), simple_cnn ~115 (115)
INFERENCE_FACTOR = 1.0  # linear, per image of a feature batch: the float32 input and this x largest_mb (measured: 0.73)
EVAL_BATCH = 64  # finetune: the validation pass's batch (finetune.predict_logits), no backward
DECODE_BYTES_PER_PIXEL = 12  # the largest image decoded (RGB) and converted, before the resize


@dataclass(frozen=True)
class Estimate:
    total: int  # bytes
    parts: dict[str, int]  # runtime, network, data, batch, decode: bytes each


def _architecture(config: TrainConfig) -> Architecture:
    a = ARCHITECTURES.get(config.architecture)
    if a is None:  # validated names are all in the table (tests/models/test_memory.py); be safe anyway
        a = max(ARCHITECTURES.values(), key=lambda x: x.saved_mb)
    if config.architecture == "simple_cnn" and config.width:
        scale = config.width / 32
        a = Architecture(int(a.params * scale * scale), 8 * config.width, a.saved_mb * scale, a.largest_mb * scale)
    return a


def estimate_training_memory(config: TrainConfig, n_images: int, *, largest_image_pixels: int = 0) -> Estimate:
    """The training's estimated peak resident memory on a worker, in bytes. ``config`` is resolved
    (TrainConfig.resolved: no None in image_size, batch_size, pooling); ``largest_image_pixels`` is
    the largest stored image's width x height (0: unknown, counted as none)."""
    a = _architecture(config)
    size, batch = int(config.image_size), int(config.batch_size)
    pixels = size * size
    area = pixels / (224 * 224)
    runtime = RUNTIME_BYTES
    if config.mode == "finetune":
        runtime += FINETUNE_RUNTIME_BYTES
        network = a.params * FINETUNE_BYTES_PER_PARAM
        data = n_images * 3 * pixels * RESIDENT_IMAGE_COPIES
        per_image_train = (a.saved_mb * SAVED_FACTOR + a.largest_mb * GRADIENT_ACTIVATIONS) * 1e6 * area
        per_image_eval = 3 * pixels * 4 + a.largest_mb * 1e6 * area * 2  # input, and two live activations
        batch_bytes = max(batch * per_image_train, EVAL_BATCH * per_image_eval)
    else:
        network = a.params * LINEAR_BYTES_PER_PARAM
        dim = a.channels * (2 if config.pooling == "avgmax" else 1)
        data = n_images * (dim * FEATURE_BYTES + LINEAR_IMAGE_BYTES) + dim * dim * 4 * SOLVER_MATRICES + CACHE_CHUNK_IMAGES * dim * 4
        batch_bytes = batch * (3 * pixels * 4 + a.largest_mb * 1e6 * area * INFERENCE_FACTOR)
    parts = {"runtime": runtime, "network": int(network), "data": int(data), "batch": int(batch_bytes),
             "decode": int(max(0, largest_image_pixels) * DECODE_BYTES_PER_PIXEL)}
    return Estimate(sum(parts.values()), parts)


_RANGES = {"batch_size": (2, 1024), "image_size": (16, 1024)}  # TrainConfig.validate's


def what_to_lower(config: TrainConfig, n_images: int, budget: int, *,
                  largest_image_pixels: int = 0) -> tuple[str, int | None]:
    """The option to lower so that the training fits ``budget`` bytes, and the largest value of it
    that fits (None: none does; fewer images, or a smaller architecture, might).

    batch_size when a smaller batch fits (it changes the least: same images, same network),
    else image_size."""
    def fits(**change) -> bool:
        c = TrainConfig(**{**config.to_dict(), **change})
        return estimate_training_memory(c, n_images, largest_image_pixels=largest_image_pixels).total <= budget

    for field in ("batch_size", "image_size"):
        low, high = _RANGES[field][0], int(getattr(config, field))
        if not fits(**{field: low}):
            continue
        while low < high:  # the largest value that fits (the estimate grows with each)
            mid = (low + high + 1) // 2
            low, high = (mid, high) if fits(**{field: mid}) else (low, mid - 1)
        return field, low
    return "image_size", None
