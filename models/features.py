"""Frozen-backbone features: image bytes -> pooled ImageNet features, computed once per image.

Features depend only on (backbone weights, preprocessing, pooling, precision) -- all in the
`extractor_id` -- and on the image bytes (their sha256), so the worker caches them and a
retrain with new labels or a few new images only runs the network on what is new.
"""

from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from . import networks
from .features_graph import fp32_features_onnx, frozen_classifier
from .onnx_session import has_onnxruntime, onnx_session
from .networks import normalizer
from .preprocess import Preprocessing, preprocess, preprocess_uint8
from .quantize import RECIPE, load_table, quantize_features, sha256_file, table_id
from .runtime import cpu_count, use_bf16

FEATURE_VERSION = 1  # bump when decoding/preprocessing code changes what a cached feature means


class FeatureCache(Protocol):
    def get_many(self, extractor_id: str, sha256s: list[str]) -> dict[str, np.ndarray]: ...

    def put_many(self, extractor_id: str, features: dict[str, np.ndarray]) -> None: ...


class MemoryFeatureCache:
    """A dict-backed FeatureCache (tests, benchmarks, single-process use)."""

    def __init__(self):
        self.store: dict[tuple[str, str], np.ndarray] = {}

    def get_many(self, extractor_id, sha256s):
        return {s: self.store[(extractor_id, s)] for s in sha256s if (extractor_id, s) in self.store}

    def put_many(self, extractor_id, features):
        self.store.update({(extractor_id, s): np.asarray(f) for s, f in features.items()})


def warm_extractor(arch: dict, prep: Preprocessing, device: torch.device, weights_path: str | None = None,
                   batch_size: int = 32, precision: str = "fp32") -> "FeatureExtractor":
    """The process's extractor for this backbone, built once and kept: a worker's later trainings
    skip rebuilding the network, loading the weights, moving them to the GPU and exporting the
    ONNX session. The extractor is frozen, so sharing it between trainings changes nothing."""
    key = (tuple(sorted((k, v) for k, v in arch.items() if k != "num_classes")), prep, str(device),
           weights_path, batch_size, precision)
    extractor = _WARM.get(key)
    if extractor is None:
        _WARM.clear()  # one backbone at a time: a worker keeps only the latest (memory)
        extractor = _WARM[key] = FeatureExtractor(arch, prep, device, weights_path, batch_size=batch_size, precision=precision)
    head = extractor.model.head
    if head.out_features != arch["num_classes"]:  # a training with another number of labels than the last one
        extractor.model.head = torch.nn.Linear(head.in_features, arch["num_classes"]).to(head.weight.device)
    return extractor


_WARM: dict[tuple, "FeatureExtractor"] = {}


class FeatureExtractor:
    """Pretrained backbone + pooling, in eval mode, batch by batch.

    backend "onnx" (default on CPU): ONNX Runtime -- the features graph that the exported model
    starts with, so validation metrics describe exactly what is deployed. precision "int8" runs
    its INT8 version (quantize.py; always ONNX Runtime on CPU, even in a GPU worker: the graph
    is the one served), "fp32" the float32 one. backend "torch" (CUDA, or no onnxruntime):
    float32 weights under bf16 autocast where the hardware has native bf16.
    """

    def __init__(self, arch: dict, prep: Preprocessing, device: torch.device, weights_path: str | None = None,
                 batch_size: int = 32, backend: str = "auto", precision: str = "fp32", decode_workers: int | None = None):
        self.arch, self.prep, self.device, self.batch_size = arch, prep, device, batch_size
        self.decode_workers = decode_workers  # None: a pool on CUDA, inline on CPU (see extract)
        weights_path = weights_path or networks.default_weights_path(arch["name"])
        self.model = frozen_classifier(arch, weights_path)
        self.table = None
        if precision == "int8":
            self.table = load_table(arch["name"], weights_path)  # NoRangeTable: no int8 for these weights
            backend = "onnx"
        if backend == "auto":
            backend = "onnx" if device.type == "cpu" and has_onnxruntime() else "torch"
        self.backend, self.precision, self.bf16 = backend, precision, False
        self._session, self._features_onnx, self._normalise = None, None, None
        if self.table is not None:
            kind = f"ort-int8{RECIPE}-{table_id(self.table)}"
        elif backend == "onnx":  # the session is built on first use: not at all when the cache has everything
            kind = "ort-fp32"
        else:
            self.model.to(device=device, memory_format=torch.channels_last)
            self.bf16 = use_bf16(device)
            kind = "torch-bf16" if self.bf16 else "torch-fp32"
        p = prep
        self.extractor_id = (
            f"{arch['name']}-{p.image_size}px-{p.resize}{p.crop_fraction:g}-{arch.get('pooling', 'avg')}"
            f"-{kind}-w{sha256_file(weights_path)[:12] if weights_path else 'none'}-v{FEATURE_VERSION}"
        )
        self.dim = self.model.head.in_features

    @property
    def features_onnx(self) -> bytes:
        """The ONNX features graph this extractor runs (float32, or INT8 with precision int8)."""
        if self._features_onnx is None:
            graph = fp32_features_onnx(self.model, self.prep.image_size)
            if self.table is not None:
                graph = quantize_features(graph, self.table)
            self._features_onnx = graph
        return self._features_onnx

    def _run(self, x: np.ndarray) -> np.ndarray:
        if self.backend == "torch":
            return self._run_torch(x)
        if self._session is None:
            self._session = onnx_session(self.features_onnx, torch.get_num_threads())
        return self._session.run(["features"], {"images": x})[0]

    @torch.inference_mode()
    def _run_torch(self, x: np.ndarray) -> np.ndarray:
        """A batch of float32 pixels, or of uint8 ones (normalised here, on the device)."""
        xb = torch.from_numpy(x).to(self.device, non_blocking=True)
        if xb.dtype == torch.uint8:
            self._normalise = self._normalise or normalizer(self.prep, self.device)
            xb = self._normalise(xb)
        xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model.features(xb).float().cpu().numpy()

    def _prepare(self, data: bytes) -> np.ndarray:
        """One image as the backend takes it: uint8 for torch (it normalises on the device), else float32."""
        return preprocess_uint8(data, self.prep) if self.backend == "torch" else preprocess(data, self.prep)

    def extract(self, loads: Sequence[Callable[[], bytes]], progress: Callable[[int, int], None] = lambda d, t: None, should_stop: Callable[[], None] = lambda: None) -> np.ndarray:
        """Features (N, dim) float32 for the images returned by `loads`, in order.

        In a GPU worker (device cuda) images are decoded on a pool of threads (one core left),
        AHEAD_BATCHES batches ahead of the network, so every decode thread stays busy while
        batches run: decoding would otherwise dominate, whether the network runs on the GPU or,
        for INT8, in ONNX Runtime on the CPU cores. For torch the threads stop at uint8 pixels and
        the GPU normalises them. On an H200 host (16 slow vCPUs) the 50,000 CIFAR-10 features took
        72 s with 8 threads, one batch ahead, float32 on the threads (bench/RESULTS.md). On a CPU
        worker decoding runs inline: the network already keeps every core busy (a decode thread
        was measured 5% slower on 2 cores). decode_workers overrides the choice (0: inline).
        """
        n, bs = len(loads), self.batch_size
        out = np.zeros((n, self.dim), dtype=np.float32)
        workers = self.decode_workers
        if workers is None:
            workers = min(MAX_DECODE_WORKERS, max(1, cpu_count() - 1)) if self.device.type == "cuda" else 0
        if not workers:
            for start in range(0, n, bs):
                should_stop()
                x = np.stack([self._prepare(load()) for load in loads[start : start + bs]])
                out[start : start + len(x)] = self._run(x)
                progress(start + len(x), n)
            return out
        pool = ThreadPoolExecutor(max_workers=workers)  # Pillow releases the GIL while decoding and resizing
        pending: collections.deque = collections.deque()
        try:
            submitted = 0
            for start in range(0, n, bs):
                while submitted < min(n, start + (1 + AHEAD_BATCHES) * bs):
                    pending.append(pool.submit(lambda load=loads[submitted]: self._prepare(load())))
                    submitted += 1
                should_stop()
                x = np.stack([pending.popleft().result() for _ in range(min(bs, n - start))])
                out[start : start + len(x)] = self._run(x)
                progress(start + len(x), n)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # on a stop: the images not started are dropped
        return out


AHEAD_BATCHES = 4  # batches decoded ahead of the network in a GPU worker
MAX_DECODE_WORKERS = 32  # decode threads of a GPU worker, at most


FEATURE_DTYPE = np.float16  # how a training holds its features: half the bytes of float32 (512 MB at 50,000 x 2560)
CACHE_CHUNK = 4096  # images read from or written to the cache at once (the cache's float32 copies: 40 MB at 2560)


def cached_features(extractor: FeatureExtractor, sha256s: list[str], loads: list[Callable[[], bytes]], cache: FeatureCache | None, progress=lambda d, t: None, should_stop=lambda: None) -> tuple[np.ndarray, int]:
    """Features for every sample, from the cache where present; returns (features (N, dim)
    FEATURE_DTYPE, n computed). The cache is read and written CACHE_CHUNK images at a time and
    what is new is computed in chunks as large, so that besides the (N, dim) float16 result only
    one chunk's float32 rows are held at a time (the cache's, and the extractor's output)."""
    n = len(sha256s)
    X = np.zeros((n, extractor.dim), FEATURE_DTYPE)
    rows: dict[str, list[int]] = {}
    for i, s in enumerate(sha256s):
        rows.setdefault(s, []).append(i)
    unique = list(rows)
    missing = []
    for start in range(0, len(unique), CACHE_CHUNK):
        should_stop()
        part = unique[start : start + CACHE_CHUNK]
        found = cache.get_many(extractor.extractor_id, part) if cache else {}
        for s in part:
            if s in found:
                X[rows[s]] = np.asarray(found[s], dtype=np.float32)
            else:
                missing.append(s)
        del found
    done = n - sum(len(rows[s]) for s in missing)
    progress(done, n)
    for start in range(0, len(missing), CACHE_CHUNK):
        part = missing[start : start + CACHE_CHUNK]
        fresh = extractor.extract([loads[rows[s][0]] for s in part], lambda d, t: progress(done + d, n), should_stop)  # each distinct image once
        for j, s in enumerate(part):
            X[rows[s]] = fresh[j]
        if cache:
            cache.put_many(extractor.extractor_id, {s: fresh[j] for j, s in enumerate(part)})
        done += sum(len(rows[s]) for s in part)
    return X, len(missing)
