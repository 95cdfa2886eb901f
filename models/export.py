"""ONNX: a checkpoint -> a self-contained graph that outputs calibrated probabilities.

Input "images": float32 (N, 3, S, S), already preprocessed (checkpoint["preprocessing"]);
output "probabilities": float32 (N, K) = softmax(logits / temperature). N is dynamic.
With an open-set index in the checkpoint (checkpoint["ood"], models/ood.py), a second output
"ood_score": float32 (N,), computed in the graph from the same features (append_ood); its
calibration is in the metadata ("felis.ood"). Graphs exported before it have no such output.
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

from .checkpoint import build_network, ood_index
from .features_graph import fp32_features_onnx, module_to_onnx
from .ood import OodIndex
from .quantize import quantize_features


class _Probabilities(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images):
        return torch.softmax(self.net(images), dim=1)


class _ProbabilitiesAndFeatures(nn.Module):
    """Both outputs of one pass: the probabilities and the pooled features the open-set score reads."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images):
        features = self.net.features(images)
        return torch.softmax(self.net.head(features) / self.net.temperature, dim=1), features


def export_onnx(ckpt: dict, features_onnx: bytes | None = None) -> bytes:
    """The probabilities graph, carrying its labels and preprocessing as metadata, so that serving
    needs this file alone (and ONNX Runtime, not torch).

    features_onnx: for an int8 checkpoint, its quantized features graph when the caller has it
    already (the training's extractor); built from the checkpoint and the range table otherwise.
    """
    net = build_network(ckpt).eval()
    size = ckpt["architecture"]["image_size"]
    ood = ood_index(ckpt)
    if ood is not None and not ood.dims == ood.codes.shape[1] <= net.head.in_features:
        raise ValueError(f"the checkpoint's open-set index ({ood.dims} columns) does not fit its network's "
                         f"{net.head.in_features} features")
    if ckpt.get("precision", "fp32") == "int8":
        if features_onnx is None:
            features_onnx = quantize_features(fp32_features_onnx(net, size), ckpt["quantization"])
        graph = append_head(features_onnx, net.head.weight.detach().numpy(), net.head.bias.detach().numpy(),
                            float(ckpt["temperature"]), ood=ood)
    elif ood is not None:
        graph = append_ood(module_to_onnx(_ProbabilitiesAndFeatures(net), size, ("probabilities", "features")), "features", ood)
    else:
        graph = module_to_onnx(_Probabilities(net), size, "probabilities")
    meta = {"felis.labels": json.dumps(list(ckpt["labels"])), "felis.preprocessing": json.dumps(ckpt["preprocessing"]),
            "felis.precision": ckpt.get("precision", "fp32")}
    if ood is not None:
        meta["felis.ood"] = json.dumps(ood_metadata(ood))
    return with_metadata(graph, meta)


def ood_metadata(index: OodIndex) -> dict:
    """The calibration a served graph carries ("felis.ood"): enough to re-threshold the version
    (quantiles: of the training scores at models.ood.QUANTILE_GRID) without its checkpoint."""
    return {"method": "knn_cosine", "k": index.k, "dims": index.dims, "threshold": index.threshold,
            "flagged_fraction": index.flagged_fraction, "quantiles": [round(float(q), 6) for q in index.quantiles],
            "index_vectors": int(len(index.codes)), "n_train": index.n_train}


def append_head(features_onnx: bytes, weight: np.ndarray, bias: np.ndarray, temperature: float,
                ood: OodIndex | None = None) -> bytes:
    """features graph (output "features", N x D) -> probabilities = softmax((features W^T + b) / T),
    and with an open-set index, "ood_score" from the same features (append_ood)."""
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
    if ood is not None:
        _add_ood(g, out, ood)
    return model.SerializeToString()


def append_ood(graph: bytes, features: str, index: OodIndex) -> bytes:
    """Add output "ood_score" (N,) computed from the graph's output `features` (N, D), which stops
    being an output: what OodIndex.score computes, to float32 rounding."""
    import onnx

    model = onnx.load_from_string(graph)
    outputs = [o for o in model.graph.output if o.name != features]
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    _add_ood(model.graph, features, index)
    return model.SerializeToString()


def _add_ood(g, features: str, index: OodIndex) -> None:
    """features -> Slice(:dims) -> L2-normalise -> MatMul(int8 codes^T, cast to float32) x 1/|code|
    (= the index's unit vectors) -> TopK(k) -> k-th largest cosine similarity -> min(1 - it, 2).

    The codes ship as int8 (1 byte a value); ONNX Runtime folds the Cast into a float32 initializer
    when the session loads (4 bytes a value in memory, as OodIndex.vectors). A DequantizeLinear
    instead was fused by ONNX Runtime 1.32 into an 8-bit MatMulNBits that also quantizes the
    features (scores off by up to 7e-4), and float16 + Cast doubles the file: measured in
    bench/RESULTS.md, "Open set"."""
    from onnx import TensorProto, helper, numpy_helper

    q = index.codes.astype(np.float32)
    inv_norm = (1.0 / np.maximum(np.linalg.norm(q, axis=1), 1e-12)).astype(np.float32)  # unit(q * scale) == q / |q|
    const = lambda name, value: numpy_helper.from_array(np.asarray(value), f"ood.{name}")  # noqa: E731
    g.initializer.extend([
        const("starts", np.array([0], np.int64)), const("ends", np.array([index.dims], np.int64)),
        const("axes", np.array([1], np.int64)), const("k", np.array([index.k], np.int64)),
        const("eps", np.float32(1e-12)), const("one", np.float32(1.0)), const("max", np.float32(2.0)),
        const("codes_t", np.ascontiguousarray(index.codes.T)), const("inv_norm", inv_norm),
    ])
    n = "ood."  # every name this part adds starts with it
    g.node.extend(helper.make_node(op, ins, outs, name=outs[0], **kw) for op, ins, outs, kw in (
        ("Slice", [features, n + "starts", n + "ends", n + "axes"], [n + "x"], {}),
        ("ReduceL2", [n + "x"], [n + "norm"], {"axes": [1], "keepdims": 1}),
        ("Max", [n + "norm", n + "eps"], [n + "norm_eps"], {}),
        ("Div", [n + "x", n + "norm_eps"], [n + "unit"], {}),
        ("Cast", [n + "codes_t"], [n + "codes_f"], {"to": TensorProto.FLOAT}),
        ("MatMul", [n + "unit", n + "codes_f"], [n + "dots"], {}),
        ("Mul", [n + "dots", n + "inv_norm"], [n + "sims"], {}),  # (N, M) cosine similarities
        ("TopK", [n + "sims", n + "k"], [n + "top", n + "top_idx"], {"axis": 1, "largest": 1, "sorted": 1}),
        ("ReduceMin", [n + "top"], [n + "kth"], {"axes": [1], "keepdims": 0}),
        ("Sub", [n + "one", n + "kth"], [n + "distance"], {}),
        ("Min", [n + "distance", n + "max"], ["ood_score"], {}),
    ))
    g.output.append(helper.make_tensor_value_info("ood_score", TensorProto.FLOAT, ["batch"]))


def with_metadata(graph: bytes, props: dict[str, str]) -> bytes:
    import onnx

    model = onnx.load_from_string(graph)
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model.SerializeToString()
