"""Predictions: find the version, take it from the model cache, then preprocess -> batch -> answer.

A promotion takes effect on the next request: the default version is read from the database
each time (off the event loop, so an unreachable database never stalls other requests or
/healthz), and the cache (service.serving.cache) is keyed by version, not by dataset. When the
database is unreachable, the version it last answered for that dataset is served (the model is
in memory already); a version this process never looked up answers 503.

Each file is read where it is decoded (a decode thread, or the inference thread for a lone
image), at most FELIS_MAX_FILE_BYTES + 1 bytes of it, and an image whose header says more than
FELIS_MAX_IMAGE_PIXELS is refused before its pixels are decoded: a request holds about one
image per decode thread, whatever it carries (uploads have the same limits).

Each image's row from the model is its probabilities and then its open-set score
(Predictor.infer_scored); the score is compared with the version's open-set threshold, read with
the version on each request, so a moved threshold applies to the next request. A flagged image
(`ood`) gets no `decision`; a version without an index answers `ood_score: null, ood: false`.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, NamedTuple

import numpy as np
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool

from models.images import InvalidImage
from service.config import Settings
from service.domain import customvision, versions
from service.errors import InvalidRequest, TooLarge, Unavailable
from service.limits import cpu_budget
from service.serving.cache import LoadedModel, ModelCache
from service.store.db import get_engine

log = logging.getLogger("felis.predict")

_DECODE_POOL = ThreadPoolExecutor(max_workers=cpu_budget(), thread_name_prefix="decode")  # the cgroup CPU quota, not the node's cores


class Upload(NamedTuple):
    """One file of a predict request, not read yet: the multipart parser's spooled temp file (in
    memory up to 1 MB, on disk above), read synchronously off the event loop."""
    filename: str
    file: BinaryIO  # at its start
    size: int | None = None  # bytes, when the multipart parser counted them


def _read(upload: Upload, max_bytes: int) -> bytes:
    """The file's bytes, never more than max_bytes + 1 of them read; InvalidImage past max_bytes."""
    if upload.size is not None and upload.size > max_bytes:
        raise InvalidImage("file_too_large", f"{upload.size} bytes exceeds the limit of {max_bytes} bytes per file")
    data = upload.file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InvalidImage("file_too_large", f"the file exceeds the limit of {max_bytes} bytes per file")
    return data


def _preprocess(model: LoadedModel, upload: Upload, settings: Settings) -> np.ndarray:
    """Read, check and decode one file (on a decode or the inference thread). Raises InvalidImage."""
    return model.predictor.preprocess(_read(upload, settings.max_file_bytes), settings.max_image_pixels,
                                      settings.min_image_side)


async def _predict_alone(model: LoadedModel, upload: Upload, settings: Settings) -> list[np.ndarray | InvalidImage]:
    """One image while nothing else is in flight: read, decode and infer in one trip to the inference
    thread, in the session that spins within its run (0.5-1 ms sooner at concurrency 1)."""
    def job() -> np.ndarray | InvalidImage:
        try:
            x = _preprocess(model, upload, settings)
        except InvalidImage as e:
            return e
        return model.predictor.infer_scored(x[None], alone=True)[0]

    return [await model.batcher.run_alone(job)]


async def _predict_batched(model: LoadedModel, files: list[Upload], settings: Settings) -> list[np.ndarray | InvalidImage]:
    """Read and decode on the decode threads, then join the micro-batcher's queue."""
    loop = asyncio.get_running_loop()

    async def prepare(upload: Upload) -> np.ndarray | InvalidImage:
        try:  # as many threads as cores: more only holds more files and image buffers
            return await loop.run_in_executor(_DECODE_POOL, _preprocess, model, upload, settings)
        except InvalidImage as e:
            return e

    with model.batcher.expecting(len(files)):  # the batcher waits for company only while some is on its way
        prepared = await asyncio.gather(*(prepare(upload) for upload in files))
        good = [x for x in prepared if isinstance(x, np.ndarray)]
        if not good:
            return prepared
        pending = model.batcher.enqueue(good)
    probs = iter(await asyncio.gather(*pending))
    return [x if isinstance(x, InvalidImage) else next(probs) for x in prepared]


def _lookup(cache: ModelCache, dataset_name: str, version: int | None, alias: str | None = None) -> versions.Serving:
    """The version to serve, from the database; its last answer when the database is unreachable."""
    try:
        with get_engine().connect() as conn:
            if alias is not None:  # a publish name (service.domain.customvision): the version it aliases now
                version = customvision.alias_version(conn, dataset_name, alias)
            serving = versions.for_serving(conn, dataset_name, version)
    except DBAPIError as e:
        known = cache.last_lookup(dataset_name, version) if alias is None else None
        if known is None:
            raise Unavailable("the metadata store is unavailable and this version is not loaded here",
                              code="database_unavailable") from e
        log.warning("predict: the database is unreachable (%s); serving %s version %s as last seen",
                    type(e.orig).__name__, dataset_name, known.version)
        return known
    cache.remember_lookup(dataset_name, version, serving)
    return serving


async def _acquire(cache: ModelCache, key: str, version: int, onnx_key: str | None) -> LoadedModel:
    """Load (off the event loop) and hold the model; if the request is cancelled meanwhile, the
    hold taken in the thread is released when the load finishes, so none leaks."""
    future = asyncio.get_running_loop().run_in_executor(None, cache.acquire, key, version, onnx_key)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(lambda f: cache.release(f.result()) if not f.cancelled() and f.exception() is None else None)
        raise


def decide(probs: dict[str, float], thresholds: dict[str, float]) -> str | None:
    """The thresholded decision: a thresholded label that clears its threshold (the likeliest, if
    several), else the likeliest label without a threshold; None when every label has one and none clears it."""
    passing = [label for label, t in thresholds.items() if label in probs and probs[label] >= t]
    if passing:
        return max(passing, key=probs.__getitem__)
    free = [label for label in probs if label not in thresholds]
    return max(free, key=probs.__getitem__) if free else None


def _none_readable(files: list[Upload], errors: list[InvalidImage]) -> InvalidRequest:
    """The 422 of a request none of whose images could be read: the first one's code, and why
    for each (in the message, the first few; in details, every one)."""
    first, name = errors[0], files[0].filename
    each = [{"filename": f.filename, "code": e.code, "message": e.message} for f, e in zip(files, errors, strict=True)]
    if len(files) == 1:
        return InvalidRequest(f"{name}: {first.message}", code=first.code, details={"filename": name, "files": each})
    shown = "; ".join(f"{e['filename']}: {e['message']}" for e in each[:3]) + (f"; and {len(each) - 3} more" if len(each) > 3 else "")
    return InvalidRequest(f"none of the {len(files)} images could be read: {shown}", code=first.code,
                          details={"filename": name, "files": each})


async def predict(cache: ModelCache, dataset_name: str, version: int | None,
                  files: list[Upload], settings: Settings, *, alias: str | None = None) -> dict[str, Any]:
    """``version``, or the version the publish name ``alias`` names, else the dataset's default."""
    if not files:
        raise InvalidRequest("send at least one image as 'files'", code="empty_upload")
    if len(files) > settings.max_predict_files:
        raise TooLarge(f"{len(files)} images in one request; the limit is {settings.max_predict_files}",
                       code="too_many_files")
    serving = await run_in_threadpool(_lookup, cache, dataset_name, version, alias)
    key, number, thresholds, ood_threshold = serving.checkpoint_key, serving.version, serving.thresholds, serving.ood_threshold
    model = cache.acquire_loaded(key) or await _acquire(cache, key, number, serving.onnx_key)
    try:  # held until answered: an eviction meanwhile closes it only after the last holder
        # per file, in order: its probabilities, or why it could not be read
        if len(files) == 1 and model.batcher.idle():
            results = await _predict_alone(model, files[0], settings)
        else:
            results = await _predict_batched(model, files, settings)
    finally:
        cache.release(model)
    if all(isinstance(r, InvalidImage) for r in results):
        raise _none_readable(files, results)
    out = []
    for upload, r in zip(files, results):
        name = upload.filename
        if isinstance(r, InvalidImage):
            out.append({"filename": name, "error": {"code": r.code, "message": r.message}})
            continue
        p = {label: float(v) for label, v in zip(model.labels, r)}
        score = float(r[len(model.labels)])
        score = score if ood_threshold is not None and np.isfinite(score) else None  # a version without an index
        ood = score is not None and score > ood_threshold
        out.append({"filename": name, "label": max(p, key=p.__getitem__), "probabilities": p,
                    "decision": None if ood else decide(p, thresholds), "ood_score": score, "ood": ood})
    return {"dataset": dataset_name, "model_version": number, "predictions": out}
