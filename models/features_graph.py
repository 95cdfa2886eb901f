"""The frozen backbone's features as an ONNX graph, and the one torch -> ONNX conversion.

    frozen_classifier   a Classifier with its pretrained backbone loaded, in eval mode
    FeaturesOnly        its pooled features (N, D) as a module; fp32_features_onnx: as ONNX bytes
    module_to_onnx      any (N, 3, S, S) images module -> ONNX (opset OPSET, dynamic batch; one
                        output, or several: the open-set score reads the features beside the probabilities)

Shared by export.py (an int8 model's graph starts with the features graph; the float32
probabilities graph goes through module_to_onnx too), features.py (training extracts features
with this graph in ONNX Runtime) and quantize.py (its range tables are measured on it). Imports
point one way (tests/test_layers.py): export and features import quantize and this module,
quantize imports only this module (in its calibrate command), and this module none of them.

Input "images": float32 (N, 3, S, S), already preprocessed; N is dynamic.
"""

from __future__ import annotations

import io
import warnings

import torch
from torch import nn

from . import networks

OPSET = 17


def frozen_classifier(arch: dict, weights_path: str | None) -> networks.Classifier:
    """networks.build_classifier(arch) with the backbone's pretrained weights loaded, in eval mode:
    the network whose features the extractor computes and the range tables are measured on."""
    model = networks.build_classifier(arch)
    networks.load_pretrained(model.backbone, arch["name"], weights_path)
    return model.eval()


class FeaturesOnly(nn.Module):
    """The pooled features of a Classifier (N, D): what the frozen backbone contributes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model.features(images)


def module_to_onnx(module: nn.Module, image_size: int, output_name: str | tuple[str, ...]) -> bytes:
    """Any eval-mode module taking (N, 3, S, S) images -> ONNX bytes with a dynamic batch; a
    tuple of names for a module that returns a tuple of (N, ...) tensors."""
    names = [output_name] if isinstance(output_name, str) else list(output_name)
    buf = io.BytesIO()
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(
            module,
            (torch.zeros(2, 3, image_size, image_size),),
            buf,
            dynamo=False,  # TorchScript-based exporter: no onnxscript dependency
            opset_version=OPSET,
            input_names=["images"],
            output_names=names,
            dynamic_axes={"images": {0: "batch"}, **{name: {0: "batch"} for name in names}},
            do_constant_folding=True,
        )
    return buf.getvalue()


def fp32_features_onnx(model: nn.Module, image_size: int) -> bytes:
    """The float32 features graph of an eval-mode Classifier: output "features" (N, D)."""
    return module_to_onnx(FeaturesOnly(model), image_size, "features")
