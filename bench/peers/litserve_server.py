"""felis's INT8 graph behind LitServe, batching on (bench/serve.py --peers litserve).

LitServe's documented batching: LitAPI(max_batch_size=..., batch_timeout=...) and the
decode_request -> batch -> predict -> unbatch -> encode_response hooks; one inference worker
(workers_per_device=1) on CPU; the image arrives as multipart field "content", as its docs' image
example sends it.
"""

from __future__ import annotations

import numpy as np

import common

import litserve as ls


class FelisAPI(ls.LitAPI):
    def __init__(self, opts):
        super().__init__(max_batch_size=opts.max_batch, batch_timeout=opts.delay_ms / 1000)
        self.opts = opts

    def setup(self, device):
        self.predictor = common.load(self.opts.model, self.opts.threads)

    def decode_request(self, request):
        upload = request["content"]
        data = upload.file.read() if hasattr(upload, "file") else upload
        return self.predictor.preprocess(data)

    def batch(self, inputs):
        return np.stack(inputs)

    def predict(self, x):
        return self.predictor.infer(x)

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output):
        return common.answer(self.predictor, output)


if __name__ == "__main__":
    opts = common.args()
    server = ls.LitServer(FelisAPI(opts), accelerator="cpu", workers_per_device=opts.workers, timeout=120)
    server.run(port=opts.port, host="127.0.0.1", generate_client_file=False)
