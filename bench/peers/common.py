"""What every peer server shares: felis's exported graph and felis's preprocessing, no torch.

A peer is started by bench/serve.py as `<venv>/bin/python bench/peers/<peer>.py --model felis.onnx
--port N [--max-batch 32 --delay-ms 2 --threads 2]`. It imports felis's `models.predictor` from
the repository (this file puts the repo root on sys.path), so the peer runs exactly the bytes ->
float32 NCHW code and felis's ONNX Runtime session options (`Predictor.from_onnx(...,
shared_cores=True, batch_threads=threads)`: one run at a time on `--threads` intra-op threads
whose idle threads sleep, as each peer's one model instance runs it; felis's own API instead runs
a one-thread session on each core at once).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from models.predictor import Predictor  # noqa: E402  (onnxruntime, numpy, Pillow; never torch)


def args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, required=True, help="felis's INT8 ONNX graph (GET .../download?format=onnx)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--delay-ms", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (felis: one per core)")
    p.add_argument("--workers", type=int, default=1, help="inference workers / model instances")
    p.add_argument("--grpc-port", type=int, default=0, help="PyTriton: Triton's gRPC port (0: --port + 1)")
    p.add_argument("--metrics-port", type=int, default=0, help="PyTriton: Triton's metrics port (0: --port + 2)")
    return p.parse_args(argv)


def load(model: Path, threads: int) -> Predictor:
    predictor = Predictor.from_onnx(model.read_bytes(), threads=threads, shared_cores=True, batch_threads=threads)
    if predictor is None:
        raise SystemExit(f"{model}: not a felis graph (no felis metadata)")
    return predictor


def answer(predictor: Predictor, row: np.ndarray) -> dict:
    """One image's probabilities -> the JSON body every peer answers (top label first)."""
    probs = {label: float(p) for label, p in zip(predictor.labels, row)}
    return {"label": max(probs, key=probs.__getitem__), "probabilities": probs}
