"""What can be trained, and its defaults: plain Python, no torch, so the API can validate a
training request (and serve predictions) without loading PyTorch."""

from __future__ import annotations

# torchvision classifiers usable as backbones (torchvision 0.29); tests/models/test_catalog.py
# checks this list against torchvision itself
TORCHVISION_BACKBONES = frozenset({
    "convnext_base", "convnext_large", "convnext_small", "convnext_tiny",
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_b4",
    "efficientnet_b5", "efficientnet_b6", "efficientnet_b7", "efficientnet_v2_l", "efficientnet_v2_m",
    "efficientnet_v2_s", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small",
    "regnet_x_16gf", "regnet_x_1_6gf", "regnet_x_32gf", "regnet_x_3_2gf", "regnet_x_400mf", "regnet_x_800mf",
    "regnet_x_8gf", "regnet_y_128gf", "regnet_y_16gf", "regnet_y_1_6gf", "regnet_y_32gf", "regnet_y_3_2gf",
    "regnet_y_400mf", "regnet_y_800mf", "regnet_y_8gf", "resnet101", "resnet152", "resnet18", "resnet34",
    "resnet50", "resnext101_32x8d", "resnext101_64x4d", "resnext50_32x4d", "wide_resnet101_2", "wide_resnet50_2",
})
TORCHVISION_FAMILIES = ("resnet", "resnext", "wide_resnet", "mobilenet_v2", "mobilenet_v3", "efficientnet_b",
                        "efficientnet_v2", "convnext", "regnet")

SIMPLE_CNN_DEFAULTS = dict(  # used by train.py when the TrainConfig field is None (image size: 64 px)
    width=32,  # channels of the first block
    epochs=40,  # passes over the training split
    learning_rate=3e-3,  # AdamW peak learning rate (OneCycle schedule)
    weight_decay=5e-4,  # AdamW decoupled weight decay
    batch_size=64,  # images per step
    label_smoothing=0.1,  # cross-entropy target smoothing
)


def is_supported(name: str) -> bool:
    return name in ("efficientnet_lite0", "simple_cnn") or name in TORCHVISION_BACKBONES


def default_image_size(name: str, mode: str = "linear") -> int:
    if name == "simple_cnn":
        return 64
    if name == "efficientnet_lite0":
        return 288 if mode == "linear" else 224
    return 224


# backbones with a shipped INT8 activation-range table (models/quant/<name>.json, see quantize.py)
INT8_BACKBONES = frozenset({"efficientnet_lite0"})


def default_precision(name: str, mode: str) -> str:
    """int8 where a range table ships (frozen features, linear mode), float32 otherwise."""
    return "int8" if mode == "linear" and name in INT8_BACKBONES else "fp32"
