"""Computing suggested labels: what the worker's `felis.suggest` task, and a training once its
version is recorded, run (issue 15). Worker side: it loads a checkpoint (torch), like pipeline.py.

    run_suggestions(dataset_id, version=None)
      the version (default: the dataset's default) -> its checkpoint -> the unlabeled images it has
      not suggested for, 256 at a time in id order -> models.suggest (the cached frozen features for
      a linear version, filling the cache; the network otherwise) -> suggestions.record, committed
      per batch

Idempotent and resumable: a batch already recorded is not asked again, a worker killed midway
leaves the batches it committed, and the next request (upload, promotion, training) does the rest.
Images deleted meanwhile are skipped; one that cannot be decoded any more is logged and skipped.
"""

from __future__ import annotations

import logging

import numpy as np

from models.checkpoint import load_checkpoint
from models.images import InvalidImage
from models.suggest import suggest
from service.config import Settings, get_settings
from service.domain import extraction, suggestions
from service.errors import NotFound
from service.store.blobs import BlobStore, get_store, image_key
from service.store.db import session_scope
from service.store.features import BlobFeatureCache
from service.store.tables import Dataset, ModelVersion

log = logging.getLogger("felis.suggestions")

BATCH = 256


def run_suggestions(dataset_id: int, version: int | None = None, *, settings: Settings | None = None,
                    store: BlobStore | None = None) -> int:
    """Suggest labels for the dataset's unlabeled images that `version` has none for; returns how many it recorded."""
    settings, store = settings or get_settings(), store or get_store()
    with session_scope() as s:
        dataset = s.get(Dataset, dataset_id)
        if dataset is None or dataset.deleted_at is not None:
            return 0
        version = version or dataset.default_version
        row = s.query(ModelVersion).filter_by(dataset_id=dataset_id, version=version).one_or_none() if version else None
        if row is None:
            return 0
        checkpoint_key, onnx_key = row.checkpoint_key, row.onnx_key
        if not suggestions.pending(s, dataset_id, version, limit=1):
            return 0
    ckpt = load_checkpoint(store.get(checkpoint_key))
    onnx = store.get(onnx_key) if onnx_key and ckpt.get("mode") != "linear" else None
    labels, cache, after, done = list(ckpt["labels"]), BlobFeatureCache(store, settings), "", 0
    weights = extraction.weights_path(settings)
    while True:
        with session_scope() as s:
            todo = suggestions.pending(s, dataset_id, version, after=after, limit=BATCH)
        if not todo:
            return done
        after = todo[-1][0]
        rows = _suggest_batch(ckpt, todo, labels, store, cache, onnx, settings.device, weights)
        with session_scope() as s:
            suggestions.record(s, dataset_id, version, rows)
            s.commit()
        done += len(rows)


def _suggest_batch(ckpt, todo, labels, store, cache, onnx, device, weights) -> list[tuple[str, str, float, float | None]]:
    def loader(sha):
        return lambda: store.get(image_key(sha))

    try:
        probs, scores = suggest(ckpt, [sha for _, sha in todo], [loader(sha) for _, sha in todo], cache=cache, onnx=onnx,
                                device=device, weights=weights)
        answered = list(zip(todo, probs, scores))
    except (InvalidImage, NotFound):  # one bad or missing image must not stop the others: one at a time, skipping it
        answered = []
        for item in todo:
            try:
                p, sc = suggest(ckpt, [item[1]], [loader(item[1])], cache=cache, onnx=onnx, device=device, weights=weights)
                answered.append((item, p[0], sc[0]))
            except (InvalidImage, NotFound) as e:
                log.warning("image %s: no suggestion (%s)", item[0], e)
    return [(image_id, labels[int(np.argmax(p))], float(np.max(p)), None if np.isnan(sc) else float(sc))
            for (image_id, _), p, sc in answered]
