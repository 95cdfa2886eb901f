"""ONNX Runtime sessions on CPU, and the metadata felis stores in its graphs. No torch here: the
API serves predictions with this and numpy alone."""

from __future__ import annotations

import json


SPIN_MODES = ("always", "never", "in_run")


def onnx_session(onnx: bytes, threads: int, spin: str = "always"):
    """A CPU ONNX Runtime session: `threads` intra-op threads, one graph node at a time.

    spin: how idle intra-op threads wait for work.
    - "always" (ORT's default): they busy-wait, also for a while after a run. Best when inference
      is all the process does (training's feature extraction).
    - "never": they sleep. Best when the process has other work for the same cores and a run
      has several threads (+10-17 % predict throughput at concurrency 32 on 2 cores against
      "always", bench/RESULTS.md); the API's batch session now has one thread, where it changes
      nothing (models.predictor.Predictor.from_onnx).
    - "in_run": they busy-wait between the graph's nodes and stop when the run ends
      (`session.force_spinning_stop`). Best for a lone small batch: on 2 cores (AMD EPYC), INT8
      Lite0 at 288 px ran batch 1 in 3.98 ms against 4.91 ms for "never", at the same CPU per request.
    """
    import onnxruntime as ort

    if spin not in SPIN_MODES:
        raise ValueError(f"spin must be one of {SPIN_MODES}, got {spin!r}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Memory patterns are planned per input shape; micro-batches vary in size, so each new size
    # would pin another plan's worth of buffers (1 GB after a few sizes at 288 px here).
    opts.enable_mem_pattern = False
    if spin == "never":
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    elif spin == "in_run":
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(onnx, opts, providers=["CPUExecutionProvider"])


def has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401

        return True
    except ImportError:
        return False


def felis_metadata(session) -> dict | None:
    """labels and preprocessing stored by export.export_onnx, or None for a graph without them;
    "ood": the open-set calibration (export.ood_metadata: threshold, flagged_fraction, quantiles,
    ...) of a graph with an "ood_score" output, else None."""
    props = session.get_modelmeta().custom_metadata_map
    if "felis.labels" not in props or "felis.preprocessing" not in props:
        return None
    return {"labels": json.loads(props["felis.labels"]), "preprocessing": json.loads(props["felis.preprocessing"]),
            "ood": json.loads(props["felis.ood"]) if "felis.ood" in props else None}
