"""ONNX: a checkpoint -> a self-contained graph that outputs calibrated probabilities.

Input "images": float32 (N, 3, S, S), already preprocessed (checkpoint["preprocessing"]);
output "probabilities": float32 (N, K) = softmax(logits / temperature). N is dynamic.
ONNX Runtime also extracts the frozen features during training on CPU (features.py), from the
same features graph (features_graph.py), so the features are exactly those the exported model computes.

A checkpoint with precision "int8" (linear mode, see quantize.py) exports as its INT8 features
graph followed by the float32 head: the graph training scored, not the float32 network.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from .checkpoint import build_network
from .features_graph import fp32_features_onnx, module_to_onnx
from .quantize import quantize_features


class _Probabilities(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images):
        return torch.softmax(self.net(images), dim=1)


def export_onnx(ckpt: dict, features_onnx: bytes | None = None) -> bytes:
    """The probabilities graph, carrying its labels and preprocessing as metadata, so that serving
    needs this file alone (and ONNX Runtime, not torch).

    features_onnx: for an int8 checkpoint, its quantized features graph when the caller has it
    already (the training's extractor); built from the checkpoint and the range table otherwise.
    """
    net = build_network(ckpt).eval()
    size = ckpt["architecture"]["image_size"]
    if ckpt.get("precision", "fp32") == "int8":
        if features_onnx is None:
            features_onnx = quantize_features(fp32_features_onnx(net, size), ckpt["quantization"])
        graph = append_head(features_onnx, net.head.weight.detach().numpy(), net.head.bias.detach().numpy(),
                            float(ckpt["temperature"]))
    else:
        graph = module_to_onnx(_Probabilities(net), size, "probabilities")
    return with_metadata(graph, {"felis.labels": json.dumps(list(ckpt["labels"])),
                                 "felis.preprocessing": json.dumps(ckpt["preprocessing"]),
                                 "felis.precision": ckpt.get("precision", "fp32")})


def append_head(features_onnx: bytes, weight: np.ndarray, bias: np.ndarray, temperature: float) -> bytes:
    """features graph (output "features", N x D) -> probabilities = softmax((features W^T + b) / T)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load_from_string(features_onnx)
    g = model.graph
    (out,) = [o.name for o in g.output]
    g.initializer.extend([numpy_helper.from_array((weight / temperature).astype(np.float32), "head.weight"),
                          numpy_helper.from_array((bias / temperature).astype(np.float32), "head.bias")])
    g.node.extend([helper.make_node("Gemm", [out, "head.weight", "head.bias"], ["logits"], transB=1, name="head"),
                   helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1, name="softmax")])
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", int(weight.shape[0])]))
    return model.SerializeToString()


def with_metadata(graph: bytes, props: dict[str, str]) -> bytes:
    import onnx

    model = onnx.load_from_string(graph)
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model.SerializeToString()
