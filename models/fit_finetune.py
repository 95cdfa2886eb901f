"""The fine-tuning mode's fit: every image decoded once, the whole network trained end to end,
the temperature from the validation split; the open-set index over its own features."""

from __future__ import annotations

import time

import numpy as np
import torch

from . import calibrate, networks
from .finetune import FinetuneParams, predict_features, predict_logits, train_network
from .job import Fitted, Job, ood_dims
from .ood import fit_ood
from .preprocess import uint8_batch


def fit_finetune(job: Job, weights: str | None) -> Fitted:
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
    ood = fit_ood(feats[fitted], y[fitted], seed=cfg.seed, dims=ood_dims(cfg, feats.shape[1]), groups=job.groups[fitted], held_out=held_out)
    report = {"calibration": "validation" if len(va) else "leave_one_out"}
    if len(va):  # by construction near flagged_fraction: the same images set the threshold
        report.update(validation_flagged=float((ood.score(held_out) > ood.threshold).mean()), validation_images=int(len(va)))
    job.timings["ood"] = time.perf_counter() - t
    return Fitted(net, logits, probs, y[va], [job.samples[i].image_id for i in va], "validation" if len(va) else "none",
                   temperature, history, {"epochs_run": len(history), "best_epoch": best_epoch}, ood=ood, ood_report=report)
