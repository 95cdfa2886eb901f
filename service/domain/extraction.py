"""A training's features fanned out over the worker pool, as shards (issue 17).

    pipeline: a claimed linear training with more than FELIS_FEATURE_SHARD_IMAGES images whose
      features are not cached, the first time -> fan_out: the missing sha256s, sorted, cut into
      ranges of about that many -> trainings.start_extraction (EXTRACTING, one shard row per
      range; no worker held) -> each shard's message, after that commit
    run_shard (task felis.extract, on any worker): claim the shard -> the range's labeled images
      -> models.train.extract_features into the blob feature cache (only what is missing), a
      heartbeat with its progress -> finish_shard; the last shard queues the training again,
      and the run that claims it finds every feature cached and fits the head

Every state change goes through service.domain.trainings. A worker killed mid-shard costs that
shard: its lease runs out, the sweep queues it again, and what it had cached stays cached. With
one worker (embedded mode) the shards run one after another. The features are the same whichever
worker computes them (one extractor id per backbone, weights and precision), so the head fitted
afterwards is the one a training on one worker would fit.
"""

from __future__ import annotations

import enum
import logging
import math
import socket
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from models.train import TrainConfig, TrainingCancelled, extract_features, feature_extractor
from service.config import Settings, get_settings
from service.domain import trainings
from service.domain.heartbeat import Heartbeat, heartbeat_interval
from service.store.blobs import BlobStore, get_store, image_key
from service.store.db import session_scope
from service.store.features import BlobFeatureCache
from service.store.tables import Image, Training

log = logging.getLogger("felis.extraction")

STOP_CHECK_SECONDS = 1.0  # a running shard reads whether it is still wanted at most this often (between batches)


class Outcome(enum.StrEnum):
    """What became of one delivery of a shard's message (run_shard)."""

    DONE = trainings.ShardStatus.DONE.value
    FAILED = trainings.ShardStatus.FAILED.value  # and its training with it
    STOPPED = "stopped"  # its training was cancelled, or another worker took the shard over
    SKIPPED = "skipped"  # not ours to run: done already, running elsewhere, or its training no longer waits


def plan(missing: list[str], shard_images: int) -> list[tuple[str, str | None, int]] | None:
    """(lo, hi, images) per shard: the sorted sha256s cut into ranges of at most shard_images,
    as even as possible, covering every sha256 ('' to None); None when one shard would do."""
    unique = sorted(set(missing))
    if shard_images <= 0 or len(unique) <= shard_images:
        return None
    k = math.ceil(len(unique) / shard_images)
    bounds = [round(i * len(unique) / k) for i in range(k + 1)]
    return [("" if i == 0 else unique[bounds[i]], unique[bounds[i + 1]] if i + 1 < k else None, bounds[i + 1] - bounds[i])
            for i in range(k)]


def fan_out(training_id: str, token: str, sha256s: list[str], config: TrainConfig, settings: Settings, store: BlobStore,
            device: str, *, write: Callable[[Callable[[], Any], str], Any]) -> bool:
    """When this run's features are many and uncached, hand them to shards: True when the
    training now waits for them (EXTRACTING), False when this run goes on to train itself (few
    missing, fine-tuning, shards disabled, or this training fanned out once already)."""
    if settings.feature_shard_images <= 0 or len(sha256s) <= settings.feature_shard_images or trainings.has_shards(training_id):
        return False
    extractor = feature_extractor(config, device=device, pretrained_weights=weights_path(settings))
    if extractor is None:
        return False
    missing = BlobFeatureCache(store, settings).missing(extractor.extractor_id, sha256s)
    ranges = plan(missing, settings.feature_shard_images)
    if ranges is None:
        return False
    from service.store.queue import enqueue_shard

    ids = write(lambda: trainings.start_extraction(training_id, token, ranges), "fanning out its features")
    if ids is None:
        raise TrainingCancelled("cancelled before its features were fanned out")
    log.info("training %s: %d images' features in %d shards", training_id, len(missing), len(ids))
    for shard_id in ids:
        if not trainings.send_shard(shard_id, enqueue_shard):
            break  # the broker is down: the sweep sends the rest
    return True


def run_shard(shard_id: int, *, settings: Settings | None = None, store: BlobStore | None = None,
              device: str | None = None, worker_name: str | None = None) -> Outcome:
    """Compute one shard's features; returns what became of this delivery (Outcome)."""
    settings = settings or get_settings()
    store = store or get_store()
    claimed = trainings.retrying(lambda: trainings.claim_shard(shard_id, worker_name or socket.gethostname(),
                                                               settings.training_lease_seconds),
                                 seconds=settings.db_retry_seconds, what=f"claiming shard {shard_id}")
    if claimed is None:
        return Outcome.SKIPPED
    token, shard = claimed
    state = {"done": 0, "checked": time.monotonic()}
    beat = Heartbeat(lambda: trainings.shard_progress(shard_id, token, state["done"]), heartbeat_interval(settings),
                     f"shard {shard_id}")

    def should_stop() -> bool:
        """Between batches, at most once a second: the progress written, and whether the shard is
        still wanted (its training cancelled: stop now, not at the heartbeat's next beat)."""
        if not beat.lost.is_set() and time.monotonic() - state["checked"] >= STOP_CHECK_SECONDS:
            state["checked"] = time.monotonic()
            if not trainings.retrying(lambda: trainings.shard_progress(shard_id, token, state["done"]),
                                      seconds=settings.db_retry_seconds, what=f"shard {shard_id}: progress"):
                beat.lost.set()
        return beat.lost.is_set()

    beat.start()
    try:
        with session_scope() as s:
            training = s.get(Training, shard.training_id)
            options, dataset_id = dict(training.options), training.dataset_id
            which = select(Image.sha256).where(Image.dataset_id == dataset_id, Image.label.is_not(None), Image.sha256 >= shard.lo)
            if shard.hi is not None:
                which = which.where(Image.sha256 < shard.hi)
            sha256s = sorted(set(s.scalars(which)))
        extractor = feature_extractor(TrainConfig.from_stored(options), device=device or settings.device,
                                      pretrained_weights=weights_path(settings))
        computed = extract_features(extractor, sha256s, [loader(store, sha) for sha in sha256s], BlobFeatureCache(store, settings),
                                    progress=lambda p: state.update(done=p["done"]), should_stop=should_stop)
        last = trainings.retrying(lambda: trainings.finish_shard(shard_id, token), seconds=settings.db_retry_seconds,
                                  what=f"finishing shard {shard_id}")
        log.info("shard %s of training %s: %d features computed of %d images", shard_id, shard.training_id, computed, len(sha256s))
        if last is not None:
            from service.store.queue import enqueue_training

            trainings.send(last, enqueue_training)  # the head fit; the sweep sends it if this fails
        return Outcome.DONE
    except TrainingCancelled:
        log.info("shard %s stops: its training %s is no longer waiting for it", shard_id, shard.training_id)
        return Outcome.STOPPED
    except Exception as e:
        log.exception("shard %s of training %s failed", shard_id, shard.training_id)
        trainings.fail_shard(shard_id, token, "feature_error", f"{type(e).__name__}: {e}")
        return Outcome.FAILED
    finally:
        beat.stop()


def weights_path(settings: Settings) -> str | None:
    """FELIS_PRETRAINED_WEIGHTS as models.train takes it (None: the architecture's default,
    models.networks.default_weights_path: a torchvision backbone's from torch.hub's cache)."""
    return str(settings.pretrained_weights) if settings.pretrained_weights else None


def loader(store: BlobStore, sha: str) -> Callable[[], bytes]:
    """A Sample's load: the image's bytes from the blob store, read only when called."""
    return lambda: store.get(image_key(sha))
