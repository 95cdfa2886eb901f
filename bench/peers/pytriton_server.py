"""felis's INT8 graph behind NVIDIA PyTriton: Triton's C++ HTTP front end and dynamic batcher,
calling ONNX Runtime in a Python function (bench/serve.py --peers pytriton).

The documented pattern: @batch on the inference function, triton.bind(...,
config=ModelConfig(max_batch_size=..., batcher=DynamicBatcher(max_queue_delay_microseconds=...))),
one model instance. Input "image": one BYTES element per request (the JPEG file); outputs
"probabilities" (float32) and "label" (BYTES). Clients send KServe v2 / Open Inference Protocol
infer requests with the binary tensor data extension, as tritonclient (PyTriton's ModelClient) does.
"""

from __future__ import annotations

import numpy as np

import common

from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

if __name__ == "__main__":
    opts = common.args()
    predictor = common.load(opts.model, opts.threads)
    labels = np.array([s.encode() for s in predictor.labels], dtype=object)

    @batch
    def infer(image: np.ndarray):
        x = np.stack([predictor.preprocess(bytes(row[0])) for row in image])
        probs = predictor.infer(x)
        return {"probabilities": probs.astype(np.float32),
                "label": labels[probs.argmax(axis=1)].reshape(-1, 1)}

    config = TritonConfig(http_address="127.0.0.1", http_port=opts.port, grpc_port=opts.grpc_port or opts.port + 1,
                          metrics_port=opts.metrics_port or opts.port + 2, log_verbose=0)
    with Triton(config=config) as triton:
        triton.bind(
            model_name="felis",
            infer_func=[infer] * opts.workers,
            inputs=[Tensor(name="image", dtype=np.bytes_, shape=(1,))],
            outputs=[Tensor(name="probabilities", dtype=np.float32, shape=(-1,)),
                     Tensor(name="label", dtype=np.bytes_, shape=(1,))],
            config=ModelConfig(max_batch_size=opts.max_batch,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=int(opts.delay_ms * 1000))),
            strict=False,
        )
        triton.serve()
