"""Predictions: load a version once per process (LRU-bounded), then preprocess -> batch -> answer.

A promotion takes effect on the next request: the default version is read from the database
each time, and the cache is keyed by version, not by dataset.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from models.images import InvalidImage
from service import versions
from service.config import Settings
from service.db import get_engine
from service.errors import InvalidRequest, TooLarge
from service.storage import BlobStore
from service.batching import MicroBatcher


_DECODE_POOL = ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0)), thread_name_prefix="decode")


@dataclass
class LoadedModel:
    version: int
    labels: list[str]
    predictor: Any  # models.predictor.Predictor
    batcher: MicroBatcher


class ModelCache:
    """The loaded versions of this process, least recently used evicted first."""

    def __init__(self, store: BlobStore, settings: Settings):
        self.store, self.settings = store, settings
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def loaded(self, key: str) -> LoadedModel | None:
        """The model if it is in memory already (no thread hop needed), else None."""
        with self._lock:
            model = self._models.get(key)
            if model is not None:
                self._models.move_to_end(key)
            return model

    def get(self, key: str, version: int, onnx_key: str | None) -> LoadedModel:
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            load_lock = self._loading.setdefault(key, threading.Lock())
        with load_lock:  # one load per version, however many requests ask at once
            with self._lock:
                if key in self._models:
                    return self._models[key]
            model = self._load(key, version, onnx_key)
            with self._lock:
                self._models[key] = model
                while len(self._models) > max(1, self.settings.model_cache_size):
                    _, old = self._models.popitem(last=False)
                    old.batcher.close()
                self._loading.pop(key, None)
            return model

    def _load(self, key: str, version: int, onnx_key: str | None) -> LoadedModel:
        """The exported ONNX graph alone when there is one (no torch in this process: it stays
        small); the checkpoint and torch otherwise, or when the torch backend is asked for."""
        from models.predictor import Predictor

        predictor = None
        if onnx_key and self.settings.predict_backend != "torch":
            predictor = Predictor.from_onnx(self.store.get(onnx_key), threads=self.settings.torch_threads, shared_cores=True)
        if predictor is None:
            from models.checkpoint import load_checkpoint

            predictor = Predictor.from_checkpoint(load_checkpoint(self.store.get(key)),
                                                  backend=self.settings.predict_backend,
                                                  threads=self.settings.torch_threads)
        batcher = MicroBatcher(predictor.infer, self.settings.predict_max_batch, self.settings.predict_max_wait_ms / 1000,
                               infer_alone=functools.partial(predictor.infer, alone=True))
        return LoadedModel(version=version, labels=list(predictor.labels), predictor=predictor, batcher=batcher)

    def close(self) -> None:
        with self._lock:
            for m in self._models.values():
                m.batcher.close()
            self._models.clear()


async def _predict_alone(model: LoadedModel, data: bytes) -> list[np.ndarray | InvalidImage]:
    """One image while nothing else is in flight: decode and infer in one trip to the inference
    thread, in the session that spins within its run (0.5-1 ms sooner at concurrency 1)."""
    def job() -> np.ndarray | InvalidImage:
        try:
            x = model.predictor.preprocess(data)
        except InvalidImage as e:
            return e
        return model.predictor.infer(x[None], alone=True)[0]

    return [await model.batcher.run_alone(job)]


async def _predict_batched(model: LoadedModel, files: list[tuple[str, bytes]]) -> list[np.ndarray | InvalidImage]:
    """Decode on the decode threads, then join the micro-batcher's queue."""
    loop = asyncio.get_running_loop()

    async def prepare(data: bytes) -> np.ndarray | InvalidImage:
        try:  # decoding on as many threads as cores: more only holds more image buffers
            return await loop.run_in_executor(_DECODE_POOL, model.predictor.preprocess, data)
        except InvalidImage as e:
            return e

    with model.batcher.expecting(len(files)):  # the batcher waits for company only while some is on its way
        prepared = await asyncio.gather(*(prepare(data) for _, data in files))
        good = [x for x in prepared if isinstance(x, np.ndarray)]
        if not good:
            return prepared
        pending = model.batcher.enqueue(np.stack(good))
    probs = iter(await asyncio.gather(*pending))
    return [x if isinstance(x, InvalidImage) else next(probs) for x in prepared]


def decide(probs: dict[str, float], thresholds: dict[str, float]) -> str | None:
    """The thresholded decision: a thresholded label that clears its threshold (the likeliest, if
    several), else the likeliest label without a threshold; None when every label has one and none clears it."""
    passing = [label for label, t in thresholds.items() if label in probs and probs[label] >= t]
    if passing:
        return max(passing, key=probs.__getitem__)
    free = [label for label in probs if label not in thresholds]
    return max(free, key=probs.__getitem__) if free else None


async def predict(cache: ModelCache, dataset_name: str, version: int | None,
                  files: list[tuple[str, bytes]], settings: Settings) -> dict[str, Any]:
    if not files:
        raise InvalidRequest("send at least one image as 'files'", code="empty_upload")
    if len(files) > settings.max_predict_files:
        raise TooLarge(f"{len(files)} images in one request; the limit is {settings.max_predict_files}",
                       code="too_many_files")
    with get_engine().connect() as conn:
        serving = versions.for_serving(conn, dataset_name, version)
    key, number, thresholds = serving.checkpoint_key, serving.version, serving.thresholds
    model = cache.loaded(key) or await run_in_threadpool(cache.get, key, number, serving.onnx_key)

    # per file, in order: its probabilities, or why it could not be read
    if len(files) == 1 and model.batcher.idle():
        results = await _predict_alone(model, files[0][1])
    else:
        results = await _predict_batched(model, files)
    if all(isinstance(r, InvalidImage) for r in results):
        first = results[0]
        raise InvalidRequest(f"{files[0][0]}: {first.message}", code=first.code, details={"filename": files[0][0]})
    out = []
    for (name, _), r in zip(files, results):
        if isinstance(r, InvalidImage):
            out.append({"filename": name, "error": {"code": r.code, "message": r.message}})
            continue
        p = {label: float(v) for label, v in zip(model.labels, r)}
        out.append({"filename": name, "label": max(p, key=p.__getitem__), "probabilities": p,
                    "decision": decide(p, thresholds)})
    return {"dataset": dataset_name, "model_version": number, "predictions": out}
