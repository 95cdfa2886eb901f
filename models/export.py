"""ONNX: a checkpoint -> a self-contained graph that outputs calibrated probabilities.

Input "images": float32 (N, 3, S, S), already preprocessed (checkpoint["preprocessing"]);
output "probabilities": float32 (N, K) = softmax(logits / temperature). N is dynamic.
ONNX Runtime also extracts the frozen features during training on CPU (features.py): as fast
as torch with bf16 there, and the features are exactly those the exported model computes.
"""

from __future__ import annotations

import io
import json
import warnings

import torch
from torch import nn

from .checkpoint import build_network

OPSET = 17


class _Probabilities(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images):
        return torch.softmax(self.net(images), dim=1)


def module_to_onnx(module: nn.Module, image_size: int, output_name: str) -> bytes:
    """Any eval-mode module taking (N, 3, S, S) images -> ONNX bytes with a dynamic batch."""
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
            output_names=[output_name],
            dynamic_axes={"images": {0: "batch"}, output_name: {0: "batch"}},
            do_constant_folding=True,
        )
    return buf.getvalue()


def export_onnx(ckpt: dict) -> bytes:
    """The probabilities graph, carrying its labels and preprocessing as metadata, so that serving
    needs this file alone (and ONNX Runtime, not torch)."""
    graph = module_to_onnx(_Probabilities(build_network(ckpt)).eval(), ckpt["architecture"]["image_size"], "probabilities")
    return with_metadata(graph, {"felis.labels": json.dumps(list(ckpt["labels"])),
                                 "felis.preprocessing": json.dumps(ckpt["preprocessing"])})


def with_metadata(graph: bytes, props: dict[str, str]) -> bytes:
    import onnx

    model = onnx.load_from_string(graph)
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model.SerializeToString()
