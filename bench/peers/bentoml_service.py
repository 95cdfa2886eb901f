"""felis's INT8 graph as a BentoML service, adaptive batching on (bench/serve.py --peers bentoml).

`bentoml serve bentoml_service:Felis --port N` (cwd bench/peers), settings from the environment
(FELIS_PEER_MODEL, FELIS_PEER_MAX_BATCH, FELIS_PEER_MAX_LATENCY_MS, FELIS_PEER_THREADS,
FELIS_PEER_WORKERS) because `bentoml serve` takes no script arguments. The documented batching:
@bentoml.api(batchable=True, max_batch_size=..., max_latency_ms=...); the image arrives as a
multipart file field named after the parameter ("images"), typed pathlib.Path so that felis's own
decoder (draft-mode JPEG decoding) reads the bytes, not a PIL image decoded by BentoML.
"""

from __future__ import annotations

import os
from pathlib import Path

import bentoml
import numpy as np

import common

MODEL = Path(os.environ.get("FELIS_PEER_MODEL", "felis.onnx"))
MAX_BATCH = int(os.environ.get("FELIS_PEER_MAX_BATCH", "32"))
MAX_LATENCY_MS = int(os.environ.get("FELIS_PEER_MAX_LATENCY_MS", "1000"))
THREADS = int(os.environ.get("FELIS_PEER_THREADS", "2"))
WORKERS = int(os.environ.get("FELIS_PEER_WORKERS", "1"))


@bentoml.service(workers=WORKERS, resources={"cpu": "2"}, traffic={"timeout": 120})
class Felis:
    def __init__(self) -> None:
        self.predictor = common.load(MODEL, THREADS)

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH, max_latency_ms=MAX_LATENCY_MS)
    def predict(self, images: list[Path]) -> list[dict]:
        x = np.stack([self.predictor.preprocess(p.read_bytes()) for p in images])
        return [common.answer(self.predictor, row) for row in self.predictor.infer(x)]
