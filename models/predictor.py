"""A trained model ready to answer: load once, then preprocess -> infer -> postprocess, batch-shaped.

Backends: ONNX Runtime on CPU (default: fastest here, no autograd machinery), or torch under
inference_mode (fallback, and for CUDA). Both compute softmax(logits / temperature).
`from_onnx` needs the exported graph alone and never imports torch (an API process stays small);
`from_checkpoint` loads torch. For an int8 version (checkpoint["precision"]) the ONNX backend
rebuilds the served INT8 graph from the checkpoint; the torch backend runs the float32 weights it
was quantized from (close, not identical: tests/models/test_quantize.py).

The open-set score (models/ood.py: higher = less like the training images) comes with the
probabilities when the version has an index: the graph's "ood_score" output, or under torch
OodIndex.score over the same features. `infer` answers probabilities (N, L) as it always has;
`infer_scored` answers (N, L + 1), the last column the score (NaN for a version without an
index, or a graph exported before it), so one array per batch still splits by rows.
"""

from __future__ import annotations

import os

import numpy as np

from .onnx_session import felis_metadata, has_onnxruntime, onnx_session
from .preprocess import Preprocessing, preprocess, preprocess_batch, preprocess_uint8


class Predictor:
    def __init__(self, labels: list[str], preprocessing: Preprocessing, run, backend: str, run_alone=None,
                 ood: dict | None = None, concurrent_runs: int = 1):
        self.labels = list(labels)
        self.preprocessing = preprocessing
        self.backend = backend  # "onnx" | "torch"
        self._run = run  # float32 NCHW numpy -> (N, L + 1) numpy: probabilities, then the open-set score or NaN
        self._run_alone = run_alone or run  # the same, for a small batch with the cores to itself
        self.ood = ood  # the open-set calibration (export.ood_metadata) when it scores, else None
        self.concurrent_runs = concurrent_runs  # batches `infer` runs well at the same time, each on its caller's thread
        self.uint8_input = False  # torch on a GPU: `preprocess` stops at uint8 pixels, the device normalises them

    @classmethod
    def from_onnx(cls, onnx: bytes, threads: int = 0, shared_cores: bool = False,
                  batch_threads: int = 0) -> "Predictor | None":
        """From a graph made by export.export_onnx (labels and preprocessing in its metadata);
        None for a graph without that metadata.

        shared_cores (the API): the process has other work for the same cores (decoding, HTTP),
        so batches run in a session of one thread (`batch_threads`, 0: one), `threads` of them
        at once (concurrent_runs, each on its caller's thread: ONNX Runtime's Run is
        thread-safe). A batch then never waits at a node for a second core that is busy
        decoding, nor wakes a sleeping pool thread per node: at concurrency 32 on 2 cores (AMD EPYC) predict served 6-14% more images a second
        than with one two-thread session (bench/RESULTS.md). `infer(alone=True)` runs in a second
        session of `threads` threads that spin only inside its runs ("in_run"): lower latency for
        a lone request, no core held between runs. Else one session of `threads` that spins ("always")."""
        threads = threads or len(os.sched_getaffinity(0))
        batch_threads = min(batch_threads or (1 if shared_cores else threads), threads)
        session = onnx_session(onnx, batch_threads, "never" if shared_cores else "always")
        meta = felis_metadata(session)
        if meta is None:
            return None
        alone = _onnx_runner(onnx_session(onnx, threads, "in_run")) if shared_cores else None
        ood = meta["ood"] if _scores(session) else None
        return cls(meta["labels"], Preprocessing.from_dict(meta["preprocessing"]), _onnx_runner(session), "onnx", alone, ood,
                   concurrent_runs=max(1, threads // batch_threads))

    @classmethod
    def from_checkpoint(cls, ckpt: dict, onnx: bytes | None = None, backend: str = "auto", device: str = "cpu", threads: int = 0) -> "Predictor":
        """backend: auto (ONNX Runtime on CPU when available, else torch) | onnx | torch.
        threads: CPU threads for inference (0: one per core)."""
        from .checkpoint import ood_index
        from .export import export_onnx, ood_metadata
        from .runtime import cpu_count, resolve_device

        dev = resolve_device(device)
        threads = threads or cpu_count()
        if backend == "auto":
            backend = "onnx" if dev.type == "cpu" and has_onnxruntime() else "torch"
        if backend == "onnx":
            if dev.type != "cpu":
                raise ValueError("the onnx backend runs on CPU; use backend='torch' for CUDA")
            onnx = onnx if onnx is not None else export_onnx(ckpt)
            session = onnx_session(onnx, threads)
            run, scores = _onnx_runner(session), _scores(session)
        elif backend == "torch":
            run, scores = _torch_runner(ckpt, dev, threads), ood_index(ckpt) is not None
        else:
            raise ValueError(f"unknown backend {backend!r}")
        index = ood_index(ckpt) if scores else None
        predictor = cls(ckpt["labels"], Preprocessing.from_dict(ckpt["preprocessing"]), run, backend,
                        ood=ood_metadata(index) if index is not None else None)
        predictor.uint8_input = backend == "torch" and dev.type != "cpu"
        return predictor

    def preprocess(self, data: bytes, max_pixels: int | None = None, min_side: int = 0) -> np.ndarray:
        """One image's bytes -> float32 (3, S, S), or uint8 for torch on a GPU (uint8_input). Raises
        images.InvalidImage, also for an image of more than max_pixels (width * height, from its
        header, before decoding) or with a side under min_side."""
        if self.uint8_input:
            return preprocess_uint8(data, self.preprocessing, max_pixels, min_side)
        return preprocess(data, self.preprocessing, max_pixels, min_side)

    def preprocess_batch(self, images: list[bytes]) -> np.ndarray:
        return preprocess_batch(images, self.preprocessing)

    def infer(self, batch: np.ndarray, alone: bool = False) -> np.ndarray:
        """float32 (N, 3, S, S) -> probabilities (N, len(labels)).

        alone: the caller knows nothing else in the process wants the cores while this runs
        (see from_onnx's shared_cores); same probabilities, sooner."""
        return self.infer_scored(batch, alone)[:, : len(self.labels)]

    def infer_scored(self, batch: np.ndarray, alone: bool = False) -> np.ndarray:
        """float32 (N, 3, S, S) -> (N, len(labels) + 1): the probabilities, then the open-set score
        (float32, higher = less like the training images; NaN when the version has no index)."""
        if len(batch) == 0:
            return np.zeros((0, len(self.labels) + 1), np.float32)
        dtype = np.uint8 if self.uint8_input and batch.dtype == np.uint8 else np.float32  # uint8: `preprocess`'s pixels
        return (self._run_alone if alone else self._run)(np.ascontiguousarray(batch, dtype=dtype))

    def postprocess(self, probs: np.ndarray) -> list[dict[str, float]]:
        return [{label: float(p) for label, p in zip(self.labels, row)} for row in probs]

    def predict(self, images: list[bytes]) -> list[dict[str, float]]:
        return self.postprocess(self.infer(self.preprocess_batch(images)))


def _scores(session) -> bool:
    return "ood_score" in {o.name for o in session.get_outputs()}


def _with_score(probs: np.ndarray, score: np.ndarray | None) -> np.ndarray:
    score = np.full(len(probs), np.nan, np.float32) if score is None else score.astype(np.float32, copy=False)
    return np.concatenate([probs.astype(np.float32, copy=False), score[:, None]], axis=1)


def _onnx_runner(session):
    if _scores(session):
        return lambda x: _with_score(*session.run(["probabilities", "ood_score"], {"images": x}))
    return lambda x: _with_score(session.run(["probabilities"], {"images": x})[0], None)


def _torch_runner(ckpt: dict, device, threads: int, score_on_device: bool | None = None):
    """float32 NCHW, or uint8 pixels normalised on the device -> (N, L + 1); on a GPU (or with
    score_on_device) the open-set score runs there too (OodIndex.score's operations in torch), so a
    batch costs the host one copy each way."""
    import torch

    from .checkpoint import build_network, ood_index
    from .networks import normalizer
    from .ood import MAX_DISTANCE

    if device.type == "cpu" and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    net = build_network(ckpt).to(device=device, memory_format=torch.channels_last)
    index = ood_index(ckpt)
    normalise = normalizer(Preprocessing.from_dict(ckpt["preprocessing"]), device)
    if score_on_device is None:
        score_on_device = device.type != "cpu"
    vectors = torch.from_numpy(index.vectors).to(device) if index is not None and score_on_device else None

    def score(features):
        if vectors is None:
            return index.score(features.float().cpu().numpy())
        x = features.float()[:, : index.dims]
        sims = (x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ vectors.T
        if sims.shape[1] < index.k:
            return np.full(len(sims), MAX_DISTANCE, np.float32)
        kth = sims.topk(index.k, dim=1).values[:, -1]
        return (1.0 - kth).clamp(max=MAX_DISTANCE).cpu().numpy()

    @torch.inference_mode()
    def run(x: np.ndarray) -> np.ndarray:
        xb = torch.from_numpy(x).to(device)
        if xb.dtype == torch.uint8:
            xb = normalise(xb)
        features = net.features(xb.contiguous(memory_format=torch.channels_last))
        probs = torch.softmax(net.head(features) / net.temperature, dim=1).float().cpu().numpy()  # = net(xb)
        return _with_score(probs, score(features) if index is not None else None)

    return run
