"""Training entry point for the worker and bench/train.py: labelled samples + config -> model.

    samples --pHash--> near-duplicate groups --> stratified train/val split (split.py)
      linear   (default): frozen pretrained features, cached per image, held as float16 (features.py)
               -> L2 strength chosen by k-fold CV on the train split (on a stratified selection of
                  SELECT_ROWS of its images when it has more), then every train-split image's
                  out-of-fold logits at that l2 and the softmax temperature fitted on them
               -> head fitted on the train split, scored on val (honest metrics)
               -> every image's held-out probabilities and the label-error report; the flagged
                  images left out of the shipped head when cross-validation says it helps (heldout.py)
               -> head refitted on train+val for the shipped model (linear.py)
      finetune: the whole network trained end to end on resident uint8 images (finetune.py)
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
from .evaluate import calibration, evaluate
from .features import CACHE_CHUNK, FeatureCache, FeatureExtractor, cached_features, warm_extractor
from .heldout import LabelReport, label_report
from .finetune import FinetuneParams, predict_features, predict_logits, train_network
from .images import perceptual_hash
from .ood import OodIndex, fit_ood
from .preprocess import Preprocessing, uint8_batch
from .quantize import NoRangeTable, load_table
from .runtime import resolve_device
from .split import kfold, near_duplicate_groups, train_val_split

__all__ = ["TrainConfig", "InvalidTrainConfig", "Sample", "FeatureCache", "TrainingCancelled", "TrainResult", "train",
           "feature_extractor", "extract_features"]


class TrainingCancelled(Exception):
    """should_stop() returned True; nothing was produced."""


@dataclass
class Sample:
    image_id: str  # the service's id, echoed in evaluation["mistakes"]
    sha256: str  # hex digest of the bytes: feature-cache key and exact-duplicate detection
    label: str
    load: Callable[[], bytes]  # returns the image bytes (called only when needed)
    phash: str | None = None  # 16-hex perceptual hash; computed here when missing


@dataclass
class TrainResult:
    checkpoint: dict  # see checkpoint.py; save with save_checkpoint
    metrics: dict  # small summary (deterministic: no timings)
    evaluation: dict  # evaluate.evaluate(...) on the validation split, plus calibration details
    onnx: bytes | None  # export.export_onnx(checkpoint) when config.export_onnx
    timings: dict = field(default_factory=dict)  # seconds per phase
    label_report: LabelReport | None = None  # linear with cross-validation: held-out probabilities of every sample, label errors


@dataclass
class _Job:
    """Everything one run needs, handed to the mode-specific fit (_fit_linear / _fit_finetune)."""

    samples: list[Sample]
    y: np.ndarray  # label index per sample
    tr: np.ndarray  # indices of the training split
    va: np.ndarray  # indices of the validation split
    groups: np.ndarray  # near-duplicate group per sample
    cfg: TrainConfig  # resolved: no None left
    arch: dict  # networks.build_classifier argument
    prep: Preprocessing
    device: torch.device
    progress: Callable[[dict], None]
    stop: Callable[[], None]  # raises TrainingCancelled
    timings: dict


@dataclass
class _Fitted:
    net: torch.nn.Module  # trained network (head set, temperature not yet)
    eval_logits: np.ndarray  # held-out logits before temperature
    eval_probs: np.ndarray  # held-out calibrated probabilities (honest: T not fitted on them)
    eval_y: np.ndarray
    eval_ids: list[str]
    source: str  # "validation" | "cross_validation" | "none"
    temperature: float
    history: list[dict]
    extra: dict  # mode-specific metrics
    features_onnx: bytes | None = None  # linear: the features graph the head was fitted on (reused by export)
    quantization: dict | None = None  # int8: the range table (quantize.py) the features graph was built with
    ood: OodIndex | None = None  # the open-set index over the shipped model's features of the training images
    ood_report: dict = field(default_factory=dict)  # how it was calibrated; the validation images' flagged share
    label_report: LabelReport | None = None  # linear with cross-validation (heldout.py)


def _resolve(config: TrainConfig, pretrained_weights: str | None) -> TrainConfig:
    """The config with its defaults filled in; precision auto falls back to float32 for weights
    the shipped int8 range table does not describe (int8 asked for explicitly: InvalidTrainConfig)."""
    cfg = config.resolved()
    if cfg.precision == "int8":
        try:
            load_table(cfg.architecture, pretrained_weights or networks.default_weights_path(cfg.architecture))
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
    job = _Job(samples, y, tr, va, groups, cfg, arch, prep, dev, emit, stop, timings)
    with linear.passes_on(dev if dev.type == "cuda" else None):  # a GPU worker fits the head there too
        fitted = _fit_linear(job, feature_cache, pretrained_weights) if cfg.mode == "linear" else _fit_finetune(job, pretrained_weights)

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


def _fit_linear(job: _Job, cache: FeatureCache | None, weights: str | None) -> _Fitted:
    """Frozen features -> l2 and T by k-fold CV on the train split -> head scored on val -> refit."""
    cfg, y, tr, va, t = job.cfg, job.y, job.tr, job.va, time.perf_counter()
    extractor = warm_extractor(job.arch, job.prep, job.device, weights, batch_size=cfg.batch_size, precision=cfg.precision)
    X, computed = cached_features(extractor, [s.sha256 for s in job.samples], [s.load for s in job.samples], cache,
                                  lambda d, n: job.progress({"phase": "features", "done": d, "total": n}), job.stop)
    job.timings["features"] = time.perf_counter() - t
    t = time.perf_counter()
    job.timings["head_select"] = 0.0
    k_classes = job.arch["num_classes"]
    folds_k = int(min(cfg.cv_folds, np.bincount(y[tr], minlength=k_classes).min()))
    grid = (cfg.l2,) if cfg.l2 else linear.L2_GRID
    history, temperature, l2, cv, extra, folds, fold_heads = [], 1.0, cfg.l2 or 0.03, None, {}, None, {}
    pre = linear.Preconditioner(X, tr, seed=cfg.seed, should_stop=job.stop) if len(tr) >= PRECONDITION_ROWS else None  # no labels: shared by every fit below
    if folds_k >= 2:  # out-of-fold logits for every l2 (on at most SELECT_ROWS images): pick the best calibrated log-loss
        folds = kfold(y[tr], job.groups[tr], folds_k, cfg.seed)
        sel = _selection(y[tr], folds, SELECT_ROWS, cfg.seed)
        heads: dict = {}
        y_sel, cv_sel, walk = y[tr[sel]], {}, len(sel) < len(tr)
        # every l2 of the grid at once (a small train split: the whole grid, as ever), or on a
        # selection one l2 at a time, strongest first, each warm-started from the last, until the
        # calibrated CV loss rises: the weak l2s cost the most passes (bench/train_scale.py)
        for part in ([(g,) for g in grid] if walk else [grid]):
            init = {f: heads[(f, history[-1]["l2"])] for f in range(folds_k)} if history else None
            cv_sel.update(linear.cross_val_logits(X, y, k_classes, folds[sel], part, job.stop,
                                                  lambda d, n: job.progress({"phase": "training", "step": d, "steps": n}),
                                                  rows=tr[sel], heads=heads, init=init, preconditioner=pre))
            history += [_cv_entry(g, cv_sel[g], y_sel, cfg.calibrate) for g in part]
            if walk and len(history) >= 2 and history[-1]["cv_loss_calibrated"] > min(h["cv_loss_calibrated"] for h in history[:-1]):
                break
        l2 = min(history, key=lambda h: h["cv_loss_calibrated"])["l2"]
        fold_heads = {f: heads[(f, l2)] for f in range(folds_k)}
    job.timings["head_select"] = time.perf_counter() - t
    job.progress({"phase": "calibrating"})
    # the train-split head, and (for a selection smaller than the train split) every image's
    # out-of-fold logits at the chosen l2: each fold's head warm-started from the selection's head
    # of the same fold (it never saw that fold's images either), all in the same passes over the rows
    specs = [linear.Spec(tr, l2, fold_heads.get(0))]
    full_cv = folds is not None and len(sel) < len(tr)
    if full_cv:
        specs += [linear.Spec(tr[folds != f], l2, fold_heads[f]) for f in range(folds_k)]
    fitted = linear.fit_joint(X, y, k_classes, specs, should_stop=job.stop, preconditioner=pre)
    head = fitted[0]
    if folds is not None:
        if full_cv:
            fold_heads = dict(enumerate(fitted[1:]))
            cv = _out_of_fold(X, tr, folds, fold_heads, k_classes)
            history.append(_cv_entry(l2, cv, y[tr], cfg.calibrate))
            # a selection prefers a stronger l2 than all the images would: walk to weaker ones on every
            # image (each fold's head warm-started from its own at the last l2) while the CV loss falls
            for g in grid[grid.index(l2) + 1 :]:
                fitted = linear.fit_joint(X, y, k_classes, [linear.Spec(tr, g, head)] + [linear.Spec(tr[folds != f], g, fold_heads[f]) for f in range(folds_k)],
                                          should_stop=job.stop, preconditioner=pre)
                cv_g = _out_of_fold(X, tr, folds, dict(enumerate(fitted[1:])), k_classes)
                history.append(_cv_entry(g, cv_g, y[tr], cfg.calibrate))
                if history[-1]["cv_loss_calibrated"] >= history[-2]["cv_loss_calibrated"]:
                    break
                l2, head, fold_heads, cv = g, fitted[0], dict(enumerate(fitted[1:])), cv_g
        else:
            cv = cv_sel[l2]
        temperature = calibrate.fit_temperature(cv, y[tr]) if cfg.calibrate else 1.0  # on every train-split image
        cv_ece = calibration(calibrate.softmax(cv, temperature), y[tr])["ece"]  # a second honest estimate, on more images
        extra = {"cv_accuracy": float((cv.argmax(1) == y[tr]).mean()), "cv_loss": calibrate.log_loss(cv, y[tr], temperature), "cv_ece": cv_ece}
    job.timings["head_folds"] = time.perf_counter() - t - job.timings["head_select"]
    report, keep = None, np.ones(len(y), bool)
    if cv is not None:  # every image's held-out probabilities; the label errors they reveal
        report = label_report(X, y, tr, va, folds, cv, head, l2, temperature, num_classes=k_classes, calibrated=cfg.calibrate,
                              policy=cfg.label_issues, should_stop=job.stop, fold_heads=fold_heads, preconditioner=pre)
        if report.dropped is not None:  # the shipped head, and the one scored on val, without them
            keep, temperature = ~report.dropped, report.temperature
    job.timings["label_report"] = time.perf_counter() - t - job.timings["head_select"] - job.timings["head_folds"]
    refit = bool(cfg.refit_full and len(va))
    # the head scored on val (train split, without the dropped images) and the shipped one (every
    # image kept), both warm-started from the train-split head, in the same passes
    specs = []
    if not keep.all():
        specs.append(linear.Spec(tr[keep[tr]], l2, head))
    if refit:
        specs.append(linear.Spec(np.flatnonzero(keep), l2, head))
    fitted = linear.fit_joint(X, y, k_classes, specs, should_stop=job.stop, preconditioner=pre)
    if not keep.all():
        head = fitted.pop(0)
    if len(va):
        logits, eval_y, idx, source = head.logits(X, va), y[va], va, "validation"
    elif cv is not None:
        logits, eval_y, idx, source = cv, y[tr], tr, "cross_validation"
    else:
        logits, eval_y, idx, source = np.zeros((0, k_classes)), np.zeros(0, np.int64), [], "none"
    if refit:  # the shipped head sees every image; its metrics are those of the train-split head
        head = fitted.pop(0)
    net = extractor.model
    with torch.no_grad():
        w, b = head.folded()
        net.head.weight.copy_(w)
        net.head.bias.copy_(b)
    job.timings["head"] = time.perf_counter() - t
    job.timings["head_refit"] = job.timings["head"] - job.timings["head_select"] - job.timings["head_folds"] - job.timings["label_report"]
    t = time.perf_counter()
    # open set: the index holds every image the shipped head saw, its threshold from their leave-one-out
    # scores (near-duplicates kept out of each other's); the validation images' flagged share is
    # measured with an index of the train split alone, which never saw them
    dims = _ood_dims(cfg, X.shape[1])
    job.stop()
    ood = fit_ood(X, y, seed=cfg.seed, dims=dims, groups=job.groups, should_stop=job.stop)
    ood_report = {"calibration": "leave_one_out"}
    if len(va) and len(tr) >= 2:
        part = fit_ood(X, y, seed=cfg.seed, dims=dims, groups=job.groups, rows=tr, should_stop=job.stop)
        ood_report.update(validation_flagged=float((part.score(X[va]) > part.threshold).mean()), validation_images=int(len(va)))
    job.timings["ood"] = time.perf_counter() - t
    extra.update(l2=l2, cv_folds=folds_k if folds_k >= 2 else 0, features_computed=computed, feature_extractor=extractor.extractor_id, refit_full=refit)
    return _Fitted(net, logits, calibrate.softmax(logits, temperature), eval_y, [job.samples[i].image_id for i in idx], source, temperature, history, extra,
                   features_onnx=extractor.features_onnx if extractor.table is not None else None, quantization=extractor.table,
                   ood=ood, ood_report=ood_report, label_report=report)


def _fit_finetune(job: _Job, weights: str | None) -> _Fitted:
    """Decode every image once -> train the whole network -> temperature from val (cross-fitted)."""
    cfg, y, tr, va, t = job.cfg, job.y, job.tr, job.va, time.perf_counter()
    net = networks.build_classifier(job.arch)
    if cfg.architecture != "simple_cnn":
        networks.load_pretrained(net.backbone, cfg.architecture, weights)
    size = job.prep.image_size
    images = np.zeros((len(job.samples), 3, size, size), np.uint8)
    for start in range(0, len(job.samples), 32):
        job.stop()
        images[start : start + 32] = uint8_batch([s.load() for s in job.samples[start : start + 32]], job.prep)
        job.progress({"phase": "features", "done": min(start + 32, len(job.samples)), "total": len(job.samples)})
    job.timings["decode"] = time.perf_counter() - t
    t = time.perf_counter()
    x, yt = torch.from_numpy(images), torch.from_numpy(y)
    params = FinetuneParams(cfg.epochs, cfg.learning_rate, cfg.weight_decay, cfg.batch_size, cfg.augmentation, cfg.label_smoothing, cfg.patience, cfg.time_budget_s)
    net, history = train_network(net, x[tr], yt[tr], x[va], yt[va], job.prep, params, job.device, cfg.seed, job.progress, job.stop)
    job.timings["training"] = time.perf_counter() - t
    job.progress({"phase": "calibrating"})
    logits = predict_logits(net, x[va].to(job.device), networks.normalizer(job.prep, job.device), job.device)
    if cfg.calibrate and len(va):
        temperature, probs = calibrate.cross_fitted_temperature(logits, y[va], cfg.seed)
    else:
        temperature, probs = 1.0, calibrate.softmax(logits)
    best_epoch = int(np.argmin([h.get("val_loss", h["train_loss"]) for h in history])) + 1
    # open set: the trained network's penultimate features; its training images' are fitted (too
    # familiar), so the validation split's scores set the threshold when there is one
    t = time.perf_counter()
    feats = predict_features(net, x, networks.normalizer(job.prep, job.device), job.device)
    held_out = feats[va] if len(va) else None
    fitted = tr if len(tr) >= 2 else np.arange(len(y))  # a degenerate split: every image
    ood = fit_ood(feats[fitted], y[fitted], seed=cfg.seed, dims=_ood_dims(cfg, feats.shape[1]), groups=job.groups[fitted], held_out=held_out)
    report = {"calibration": "validation" if len(va) else "leave_one_out"}
    if len(va):  # by construction near flagged_fraction: the same images set the threshold
        report.update(validation_flagged=float((ood.score(held_out) > ood.threshold).mean()), validation_images=int(len(va)))
    job.timings["ood"] = time.perf_counter() - t
    return _Fitted(net, logits, probs, y[va], [job.samples[i].image_id for i in va], "validation" if len(va) else "none",
                   temperature, history, {"epochs_run": len(history), "best_epoch": best_epoch}, ood=ood, ood_report=report)


def _cv_entry(l2: float, logits: np.ndarray, y: np.ndarray, calibrated: bool) -> dict:
    """One l2's out-of-fold figures (evaluation["history"]), on the images it was cross-validated on."""
    temp = calibrate.fit_temperature(logits, y) if calibrated else 1.0
    return {"l2": l2, "cv_accuracy": float((logits.argmax(1) == y).mean()), "cv_loss": calibrate.log_loss(logits, y),
            "cv_loss_calibrated": calibrate.log_loss(logits, y, temp), "temperature": temp, "cv_images": int(len(y))}


def _out_of_fold(X: np.ndarray, tr: np.ndarray, folds: np.ndarray, fold_heads: dict, num_classes: int) -> np.ndarray:
    """Each train-split image's logits by the head of the fold that left it out."""
    out = np.zeros((len(tr), num_classes))
    for f, h in fold_heads.items():
        out[folds == f] = h.logits(X, tr[folds == f])
    return out


PRECONDITION_ROWS = 4096  # train-split images from which the head's solver is preconditioned (linear.Preconditioner)
SELECT_ROWS = 4096  # images of the train split the l2 grid is cross-validated on, at most (issue 17)


def _selection(y: np.ndarray, folds: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Sorted positions of at most `cap` rows, the same share of every (fold, label) cell: the
    stratified subsample on which the regularisation is chosen (all rows when there are few)."""
    if len(y) <= cap:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    take = []
    for cell in np.unique(folds * (int(y.max()) + 1) + y):
        members = np.flatnonzero(folds * (int(y.max()) + 1) + y == cell)
        take.append(rng.choice(members, max(1, round(len(members) * cap / len(y))), replace=False))
    return np.sort(np.concatenate(take))


def _ood_dims(cfg: TrainConfig, width: int) -> int:
    """The feature columns the open-set score uses: the average-pooled half of avgmax features
    (the max-pooled half separated worse, bench/ood.py), else all of them."""
    return width // 2 if cfg.pooling == "avgmax" else width


def _ood_summary(index: OodIndex, report: dict) -> dict:
    """The open-set calibration as the evaluation reports it: the graph's metadata (export.ood_metadata)
    without the quantiles (they stay in the checkpoint), and how it was calibrated."""
    from .export import ood_metadata

    summary = {k: v for k, v in ood_metadata(index).items() if k != "quantiles"}
    return {**summary, "validation_flagged": report.get("validation_flagged"),
            "validation_images": report.get("validation_images", 0), "calibration": report["calibration"]}
