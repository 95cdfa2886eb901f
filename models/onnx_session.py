"""ONNX Runtime sessions on CPU, and the metadata felis stores in its graphs. No torch here: the
API serves predictions with this and numpy alone."""

from __future__ import annotations

import json


def onnx_session(onnx: bytes, threads: int, spin: bool = True):
    """A CPU ONNX Runtime session: `threads` intra-op threads, one graph node at a time.

    spin=False: idle intra-op threads sleep instead of busy-waiting for the next run. Right when
    the process has other work for the same cores (the API decodes images and speaks HTTP between
    batches: +17 % predict throughput at concurrency 32 on 2 cores); spinning is faster when
    inference is all the process does (training's feature extraction)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Memory patterns are planned per input shape; micro-batches vary in size, so each new size
    # would pin another plan's worth of buffers (1 GB after a few sizes at 288 px here).
    opts.enable_mem_pattern = False
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(onnx, opts, providers=["CPUExecutionProvider"])


def has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401

        return True
    except ImportError:
        return False


def felis_metadata(session) -> dict | None:
    """labels and preprocessing stored by export.export_onnx, or None for a graph without them."""
    props = session.get_modelmeta().custom_metadata_map
    if "felis.labels" not in props or "felis.preprocessing" not in props:
        return None
    return {"labels": json.loads(props["felis.labels"]), "preprocessing": json.loads(props["felis.preprocessing"])}
