"""The default mode's fit: frozen features -> the linear head, its l2 and temperature chosen by
cross-validation, scored on the validation split, refitted on every image; the open-set index."""

from __future__ import annotations

import time

import numpy as np
import torch

from . import calibrate, linear
from .evaluate import calibration
from .features import FeatureCache, cached_features, warm_extractor
from .heldout import label_report
from .job import Fitted, Job, ood_dims
from .ood import fit_ood
from .split import kfold

PRECONDITION_ROWS = 4096  # train-split images from which the head's solver is preconditioned (linear.Preconditioner)
SELECT_ROWS = 4096  # images of the train split the l2 grid is cross-validated on, at most (issue 17)


def fit_linear(job: Job, cache: FeatureCache | None, weights: str | None) -> Fitted:
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
    dims = ood_dims(cfg, X.shape[1])
    job.stop()
    ood = fit_ood(X, y, seed=cfg.seed, dims=dims, groups=job.groups, should_stop=job.stop)
    ood_report = {"calibration": "leave_one_out"}
    if len(va) and len(tr) >= 2:
        part = fit_ood(X, y, seed=cfg.seed, dims=dims, groups=job.groups, rows=tr, should_stop=job.stop)
        ood_report.update(validation_flagged=float((part.score(X[va]) > part.threshold).mean()), validation_images=int(len(va)))
    job.timings["ood"] = time.perf_counter() - t
    extra.update(l2=l2, cv_folds=folds_k if folds_k >= 2 else 0, features_computed=computed, feature_extractor=extractor.extractor_id, refit_full=refit)
    return Fitted(net, logits, calibrate.softmax(logits, temperature), eval_y, [job.samples[i].image_id for i in idx], source, temperature, history, extra,
                   features_onnx=extractor.features_onnx if extractor.table is not None else None, quantization=extractor.table,
                   ood=ood, ood_report=ood_report, label_report=report)


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
