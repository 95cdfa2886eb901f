"""The model cache: each version loaded once per API process, least recently used evicted first.

A loaded version is its predictor (the exported ONNX graph, or the checkpoint under torch when
asked for) and the micro-batcher in front of it. Requests hold a model between ``acquire`` and
``release``; an evicted model leaves the cache at once but is closed only when the last request
holding it lets go, so eviction never strands a queued image.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from service.config import Settings
from service.limits import cpu_budget
from service.serving.batching import MicroBatcher
from service.store.blobs import BlobStore


@dataclass
class LoadedModel:
    version: int
    labels: list[str]
    predictor: Any  # models.predictor.Predictor
    batcher: MicroBatcher
    users: int = 0  # requests holding it (acquire .. release)
    evicted: bool = False  # out of the cache: closed when the last user releases it


class ModelCache:
    """The loaded versions of this process, least recently used evicted first."""

    def __init__(self, store: BlobStore, settings: Settings):
        self.store, self.settings = store, settings
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._lookups: dict[tuple[str, int | None], Any] = {}  # (dataset, version asked) -> versions.Serving

    def remember_lookup(self, dataset: str, version: int | None, serving: Any) -> None:
        """The database's last answer for this (dataset, version asked), kept while its model is
        loaded, to serve through a database outage."""
        with self._lock:
            self._lookups[(dataset, version)] = serving
            if len(self._lookups) > 4096:  # bounded: keep only the answers whose model is in memory
                self._lookups = {k: v for k, v in self._lookups.items() if v.checkpoint_key in self._models}

    def last_lookup(self, dataset: str, version: int | None) -> Any | None:
        with self._lock:
            serving = self._lookups.get((dataset, version))
            return serving if serving is not None and serving.checkpoint_key in self._models else None

    def acquire_loaded(self, key: str) -> LoadedModel | None:
        """The model, held for this request, if it is in memory already (no thread hop), else None."""
        with self._lock:
            model = self._models.get(key)
            if model is not None:
                self._models.move_to_end(key)
                model.users += 1
            return model

    def acquire(self, key: str, version: int, onnx_key: str | None) -> LoadedModel:
        """The model, loaded if need be (blocking: call it off the event loop), held for this request."""
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                model = self._models[key]
                model.users += 1
                return model
            load_lock = self._loading.setdefault(key, threading.Lock())
        with load_lock:  # one load per version, however many requests ask at once
            with self._lock:
                if key in self._models:
                    model = self._models[key]
                    model.users += 1
                    return model
            model = self._load(key, version, onnx_key)
            with self._lock:
                model.users += 1
                self._models[key] = model
                while len(self._models) > max(1, self.settings.model_cache_size):
                    old_key, old = self._models.popitem(last=False)
                    old.evicted = True
                    self._lookups = {k: v for k, v in self._lookups.items() if v.checkpoint_key != old_key}
                    if old.users == 0:
                        old.batcher.close()
                self._loading.pop(key, None)
            return model

    def release(self, model: LoadedModel) -> None:
        with self._lock:
            model.users -= 1
            close = model.evicted and model.users == 0
        if close:
            model.batcher.close()

    def _load(self, key: str, version: int, onnx_key: str | None) -> LoadedModel:
        """The exported ONNX graph alone when there is one (no torch in this process: it stays
        small); the checkpoint and torch otherwise, or when the torch backend is asked for."""
        from models.predictor import Predictor

        predictor, threads = None, cpu_budget(self.settings.torch_threads)  # the cgroup quota, as the decode pool
        if onnx_key and self.settings.predict_backend != "torch":
            predictor = Predictor.from_onnx(self.store.get(onnx_key), threads=threads, shared_cores=True)
        if predictor is None:
            from models.checkpoint import load_checkpoint

            predictor = Predictor.from_checkpoint(load_checkpoint(self.store.get(key)),
                                                  backend=self.settings.predict_backend,
                                                  threads=threads)
        # rows of probabilities with the open-set score as a last column (NaN: none): one array a batch
        batcher = MicroBatcher(predictor.infer_scored, self.settings.predict_max_batch, self.settings.predict_max_wait_ms / 1000,
                               infer_alone=functools.partial(predictor.infer_scored, alone=True),
                               parallel=predictor.concurrent_runs)
        return LoadedModel(version=version, labels=list(predictor.labels), predictor=predictor, batcher=batcher)

    def close(self) -> None:
        with self._lock:
            for m in self._models.values():
                m.batcher.close()
            self._models.clear()
