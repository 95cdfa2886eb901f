"""Training entry point for the worker and bench/train.py: labelled samples + config -> model.

    samples --pHash--> near-duplicate groups --> stratified train/val split (split.py)
      linear   (default, fit_linear.py): frozen pretrained features, cached per image, held as float16 (features.py)
               -> L2 strength chosen by k-fold CV on the train split (on a stratified selection of
                  SELECT_ROWS of its images when it has more), then every train-split image's
                  out-of-fold logits at that l2 and the softmax temperature fitted on them
               -> head fitted on the train split, scored on val (honest metrics)
               -> every image's held-out probabilities and the label-error report; the flagged
                  images left out of the shipped head when cross-validation says it helps (heldout.py)
               -> head refitted on train+val for the shipped model (linear.py)
      finetune (fit_finetune.py): the whole network trained end to end on resident uint8 images (finetune.py)
    -> open-set index over the training images' features, threshold at 1% of them flagged (ood.py)
    -> checkpoint (weights + everything to rebuild them) -> ONNX (export.py)

Cost (issue 17; bench/train_scale.py): the linear head's fits share their passes over the
features on every core (linear.fit_joint: the folds and the train split's head at once), each
warm-started from a head that never saw the rows it will predict, on
features read by row (no copy of the (N, D) matrix), so a warm retraining costs a fixed number
of passes over the features: linear in the images, and its memory is the features' float16
bytes plus a working set that does not grow with them. should_stop is called at least every
CHUNK_ROWS rows of every pass (cancelling takes well under 2 s at 50,000 images).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import calibrate, linear, networks
from .checkpoint import build_checkpoint
from .config import InvalidTrainConfig, TrainConfig
from .evaluate import evaluate
from .features import CACHE_CHUNK, FeatureCache, FeatureExtractor, cached_features, warm_extractor
from .fit_finetune import fit_finetune
from .fit_linear import fit_linear
from .heldout import LabelReport
from .images import perceptual_hash
from .job import Job, Sample
from .networks import WeightsUnavailable
from .ood import OodIndex
from .preprocess import Preprocessing
from .quantize import NoRangeTable, load_table, table_path
from .runtime import resolve_device
from .split import near_duplicate_groups, train_val_split

__all__ = ["TrainConfig", "InvalidTrainConfig", "Sample", "FeatureCache", "TrainingCancelled", "TrainResult", "WeightsUnavailable", "train",
           "feature_extractor", "extract_features"]


class TrainingCancelled(Exception):
    """should_stop() returned True; nothing was produced."""


@dataclass
class TrainResult:
    checkpoint: dict  # see checkpoint.py; save with save_checkpoint
    metrics: dict  # small summary (deterministic: no timings)
    evaluation: dict  # evaluate.evaluate(...) on the validation split, plus calibration details
    onnx: bytes | None  # export.export_onnx(checkpoint) when config.export_onnx
    timings: dict = field(default_factory=dict)  # seconds per phase
    label_report: LabelReport | None = None  # linear with cross-validation: held-out probabilities of every sample, label errors


def _resolve(config: TrainConfig, pretrained_weights: str | None) -> TrainConfig:
    """The config with its defaults filled in; precision auto falls back to float32 for weights
    the shipped int8 range table does not describe (int8 asked for explicitly: InvalidTrainConfig)."""
    cfg = config.resolved()
    if cfg.precision == "int8":
        try:
            tabled = table_path(cfg.architecture).is_file()  # no table: no need to find (or download) the weights
            load_table(cfg.architecture, pretrained_weights or (networks.default_weights_path(cfg.architecture) if tabled else None))
        except NoRangeTable as e:
            if config.precision != "auto":
                raise InvalidTrainConfig("precision", str(e)) from None
            cfg.precision = "fp32"
    return cfg


def _architecture(cfg: TrainConfig, num_classes: int) -> dict:
    arch = {"name": cfg.architecture, "image_size": cfg.image_size, "pooling": cfg.pooling, "num_classes": num_classes}
    if cfg.width:
        arch["width"] = cfg.width
    return arch


def _preprocessing(cfg: TrainConfig) -> Preprocessing:
    return networks.default_preprocessing(cfg.architecture, cfg.image_size, cfg.resize, cfg.crop_fraction)


def feature_extractor(config: TrainConfig, *, device: str = "cpu", pretrained_weights: str | None = None) -> FeatureExtractor | None:
    """The frozen extractor a linear training with this config computes its features with (the
    process's warm one: train() then reuses it), None for a fine-tuning config (no cached features)."""
    cfg = _resolve(config, pretrained_weights)
    if cfg.mode != "linear":
        return None
    return warm_extractor(_architecture(cfg, 2), _preprocessing(cfg), resolve_device(device), pretrained_weights,
                          batch_size=cfg.batch_size, precision=cfg.precision)


def extract_features(extractor: FeatureExtractor, sha256s: list[str], loads: list[Callable[[], bytes]], cache: FeatureCache, *,
                     progress: Callable[[dict], None] = lambda p: None, should_stop: Callable[[], bool] = lambda: False) -> int:
    """Compute and cache the features of the images the cache lacks (one shard of a training's
    images, service.domain.extraction), CACHE_CHUNK at a time: memory bounded by a chunk whatever
    the number of images. Returns how many were computed. Raises TrainingCancelled."""
    def stop():
        if should_stop():
            raise TrainingCancelled()

    computed = 0
    for start in range(0, len(sha256s), CACHE_CHUNK):
        stop()
        part = slice(start, start + CACHE_CHUNK)
        _, n = cached_features(extractor, sha256s[part], loads[part], cache,
                               lambda d, t: progress({"phase": "features", "done": start + d, "total": len(sha256s)}), stop)
        computed += n
    return computed


def train(samples: list[Sample], config: TrainConfig, *, device: str = "cpu", feature_cache: FeatureCache | None = None, progress: Callable[[dict], None] = lambda p: None, should_stop: Callable[[], bool] = lambda: False, pretrained_weights: str | None = None, dataset: dict | None = None) -> TrainResult:
    """Train a classifier over the samples' labels (sorted). Raises InvalidTrainConfig, TrainingCancelled.
    The config is used as given (validated by whoever built it: TrainConfig.from_dict); its defaults
    are resolved here for callers that did not. ``dataset`` goes into the checkpoint as it is."""
    cfg = _resolve(config, pretrained_weights)
    dev = resolve_device(device)
    labels = sorted({s.label for s in samples})
    y = np.array([labels.index(s.label) for s in samples], dtype=np.int64)
    counts = np.bincount(y, minlength=len(labels))
    if len(labels) < 2 or counts.min() < 2:
        raise InvalidTrainConfig("samples", f"need at least 2 labels with 2 images each, got {dict(zip(labels, counts.tolist()))}")

    def stop():
        if should_stop():
            raise TrainingCancelled()

    def emit(p: dict):
        progress({k: v for k, v in p.items() if v is not None})

    timings, t0 = {}, time.perf_counter()
    torch.manual_seed(cfg.seed)

    # 1. near-duplicate groups (pHash, computed here if the caller has none) and the split
    phashes = [s.phash for s in samples]
    missing = [i for i, h in enumerate(phashes) if not h]
    for n, i in enumerate(missing):
        if n % 32 == 0:
            stop()
            emit({"phase": "preparing", "done": n, "total": len(missing)})
        phashes[i] = perceptual_hash(samples[i].load())
    groups = near_duplicate_groups([s.sha256 for s in samples], phashes, cfg.near_duplicate_bits)
    tr, va = train_val_split(y, groups, cfg.val_fraction, cfg.seed)
    timings["split"] = time.perf_counter() - t0

    # 2. the model: frozen features + linear head, or end-to-end training
    arch, prep = _architecture(cfg, len(labels)), _preprocessing(cfg)
    job = Job(samples, y, tr, va, groups, cfg, arch, prep, dev, emit, stop, timings)
    with linear.passes_on(dev if dev.type == "cuda" else None):  # a GPU worker fits the head there too
        fitted = fit_linear(job, feature_cache, pretrained_weights) if cfg.mode == "linear" else fit_finetune(job, pretrained_weights)

    # 3. honest metrics on held-out images, before and after the temperature
    t = time.perf_counter()
    emit({"phase": "evaluating"})
    f = fitted
    evaluation = evaluate(f.eval_probs, f.eval_y, labels, f.history)
    before = evaluate(calibrate.softmax(f.eval_logits), f.eval_y, labels)["calibration"] if len(f.eval_y) else None
    pred = f.eval_probs.argmax(1) if len(f.eval_y) else np.zeros(0, np.int64)
    evaluation.update(
        source=f.source,
        temperature=f.temperature,
        ece_before_calibration=before and before["ece"],
        validation_image_ids=[samples[i].image_id for i in va],
        mistakes=[{"image_id": f.eval_ids[i], "label": labels[f.eval_y[i]], "predicted": labels[pred[i]], "confidence": float(f.eval_probs[i, pred[i]])}
                  for i in np.flatnonzero(pred != f.eval_y)],
    )
    metrics = {
        "accuracy": evaluation["accuracy"],
        "loss": evaluation["loss"],
        "ece": evaluation["calibration"] and evaluation["calibration"]["ece"],
        "ece_before_calibration": evaluation["ece_before_calibration"],
        "roc_auc": evaluation["roc_auc"],
        "temperature": f.temperature,
        "n_train": int(len(tr)),
        "n_val": int(len(va)),
        "n_groups": int(groups.max() + 1),
        "labels": labels,
        "mode": cfg.mode,
        "precision": cfg.precision,
        **f.extra,
    }
    if f.label_report is not None:
        evaluation["label_issues"] = f.label_report.summary()
        metrics["label_issues"] = len(f.label_report.issues)
    if f.ood is not None:
        evaluation["ood"] = _ood_summary(f.ood, f.ood_report)
        metrics["ood"] = {k: evaluation["ood"][k] for k in ("threshold", "flagged_fraction", "index_vectors", "validation_flagged")}
    timings["evaluate"] = time.perf_counter() - t

    # 4. the checkpoint: everything needed to predict, nothing from this module
    net = f.net.cpu().to(memory_format=torch.contiguous_format)
    net.temperature.fill_(f.temperature)
    checkpoint = build_checkpoint(
        net=net, architecture=arch, mode=cfg.mode, labels=labels, preprocessing=prep.to_dict(),
        precision=cfg.precision, quantization=f.quantization, temperature=f.temperature,
        training_config=cfg.to_dict(), metrics=metrics, dataset=dataset, ood=f.ood,
    )
    onnx = None
    if cfg.export_onnx:
        stop()
        emit({"phase": "exporting"})
        t = time.perf_counter()
        from .export import export_onnx

        onnx = export_onnx(checkpoint, features_onnx=f.features_onnx if cfg.precision == "int8" else None)
        timings["export"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    return TrainResult(checkpoint, metrics, evaluation, onnx, timings, f.label_report)


def _ood_summary(index: OodIndex, report: dict) -> dict:
    """The open-set calibration as the evaluation reports it: the graph's metadata (export.ood_metadata)
    without the quantiles (they stay in the checkpoint), and how it was calibrated."""
    from .export import ood_metadata

    summary = {k: v for k, v in ood_metadata(index).items() if k != "quantiles"}
    return {**summary, "validation_flagged": report.get("validation_flagged"),
            "validation_images": report.get("validation_images", 0), "calibration": report["calibration"]}
