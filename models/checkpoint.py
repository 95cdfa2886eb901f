"""Checkpoints: one plain dict that is enough to rebuild and run a trained model.

    format_version  int, bumped on incompatible changes
    architecture    arch dict for networks.build_classifier (name, image_size, pooling, num_classes, ...)
    mode            "linear" | "finetune"
    labels          class names, index i = output i
    preprocessing   Preprocessing.to_dict()
    precision       "int8" | "fp32": what the exported graph's features run in
    quantization    the INT8 range table the export needs (None for fp32)
    state_dict      the whole network (backbone + head + temperature), so no pretrained file is needed
    temperature     float, softmax temperature (authoritative; also in the state_dict buffer)
    training_config the resolved TrainConfig.to_dict() (no None where a default applied); seed
    metrics         small dict of validation metrics
    versions        {"torch", "torchvision", "felis"}
    dataset         what it was trained on: {"name", "image_count", "label_counts", "hash", "images"}
                    (the caller's snapshot; absent when trained outside the service)
    ood             the open-set index (models.ood.OodIndex.to_dict(), its arrays as tensors; absent
                    in checkpoints made before it): ood_index(ckpt) rebuilds it, export puts it in the graph

``build_checkpoint`` is the one place that assembles this dict.

Saved with torch.save and loaded with torch.load(weights_only=True): only plain Python values
and tensors, never pickled classes. This module never imports the training code.
"""

from __future__ import annotations

import io
from typing import IO, Any

import numpy as np
import torch

from . import networks
from .ood import OodIndex

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "architecture", "mode", "labels", "preprocessing", "state_dict", "temperature")


def felis_version() -> str:
    try:
        from importlib.metadata import version

        return version("felis")
    except Exception:  # not installed as a distribution (running from a checkout)
        return "0+unknown"


def library_versions() -> dict:
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "felis": felis_version()}


def _plain(x: Any) -> Any:
    """numpy scalars/arrays -> Python values so that weights_only loading accepts them."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, str):  # str subclasses such as torch's TorchVersion are not weights_only-safe
        return str(x)
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    return x


def build_checkpoint(*, net: "networks.Classifier", architecture: dict, mode: str, labels: list[str],
                     preprocessing: dict, precision: str, quantization: dict | None, temperature: float,
                     training_config: dict, metrics: dict, dataset: dict | None = None,
                     ood: OodIndex | None = None) -> dict:
    """The checkpoint of a trained network (see the module docstring for every key)."""
    ckpt = {
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "mode": mode,
        "labels": list(labels),
        "preprocessing": preprocessing,
        "precision": precision,  # int8: export runs the quantized features graph (quantize.py)
        "quantization": quantization,
        "state_dict": {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()},
        "temperature": float(temperature),
        "training_config": training_config,
        "seed": training_config.get("seed", 0),
        "metrics": metrics,
        "versions": library_versions(),
    }
    if dataset is not None:
        ckpt["dataset"] = dataset
    if ood is not None:  # arrays as tensors: _plain would turn numpy arrays into (large) Python lists
        ckpt["ood"] = {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
                       for k, v in ood.to_dict().items()}
    return ckpt


def ood_index(ckpt: dict) -> OodIndex | None:
    """The checkpoint's open-set index, or None for one made without (before issue 15)."""
    d = ckpt.get("ood")
    if not d:
        return None
    return OodIndex.from_dict({k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in d.items()})


def save_checkpoint(ckpt: dict, f: str | IO[bytes]) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint lacks {missing}")
    torch.save(_plain(ckpt), f)


def checkpoint_bytes(ckpt: dict) -> bytes:
    buf = io.BytesIO()
    save_checkpoint(ckpt, buf)
    return buf.getvalue()


def load_checkpoint(f: str | bytes | IO[bytes]) -> dict:
    if isinstance(f, (bytes, bytearray, memoryview)):
        f = io.BytesIO(bytes(f))
    ckpt = torch.load(f, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise ValueError("not a felis checkpoint")
    if ckpt["format_version"] > FORMAT_VERSION:
        raise ValueError(f"checkpoint format {ckpt['format_version']} is newer than this code ({FORMAT_VERSION})")
    return ckpt


def build_network(ckpt: dict) -> networks.Classifier:
    """The trained network, in eval mode on CPU: images -> logits / temperature."""
    net = networks.build_classifier(ckpt["architecture"])
    net.load_state_dict(ckpt["state_dict"])
    net.temperature.fill_(float(ckpt["temperature"]))
    return net.eval()
