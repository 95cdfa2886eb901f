"""A linear training's held-out predictions of its own images, and the label-error report over them (issue 15).

    report = label_report(X, y, tr, va, folds, cv_logits, head, l2, temperature, ...)
      pass 1: every image's held-out probabilities as the training already has them (the train
              split's out-of-fold logits at the chosen l2, the train-split head's for validation),
              confident learning names the suspects (label_issues.first_pass)
      pass 2: the same folds and l2 once more, every head fitted without the suspects (which are
              still predicted), the temperature refitted on the rows kept; the report is
              label_issues.find_label_issues over these probabilities (margin at the estimated count)
      policy: "keep" reports only; "drop" leaves the flagged images out of the shipped head; "auto"
              drops them when cross-validation says it helps: the pass-2 heads' calibrated log-loss
              on the train split's unflagged images is lower than the pass-1 heads'.

Why two passes, and the figures (recall 0.978, precision 0.937 on photos/train with 5% of its labels
flipped, 20 seeds): models/label_issues.py and bench/label_issues.py. The cost is one more
cross-validation at one l2 (folds + 1 fits of the head), only when pass 1 names a suspect; each
pass-2 fit warm-starts from its pass-1 head (`fold_heads`: the fold's own, which never saw that
fold's rows, so the held-out logits stay honest), all in the same passes over the rows (linear.fit_joint).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import calibrate, linear
from .label_issues import estimated_issue_count, find_label_issues, first_pass


@dataclass
class LabelReport:
    probabilities: np.ndarray  # (N, K) float32: every image's held-out probabilities (pass 2; pass 1 without suspects)
    issues: list[tuple[int, int, float]]  # (row, suggested label index, score), most likely first
    suspects: int  # images pass 1 left out of pass 2's heads
    estimated: int  # confident learning's estimate of the number of wrong labels (on pass 2)
    dropped: np.ndarray | None  # (N,) bool: the rows the shipped head leaves out, None when it keeps every row
    temperature: float  # the temperature of `probabilities` (and of the shipped head when it drops)
    policy: str
    cv_loss_all: float | None  # calibrated out-of-fold log-loss on the unflagged train-split images: heads with every image
    cv_loss_without: float | None  # ... heads without the suspects (None when there were none)

    def summary(self) -> dict:
        """What the evaluation reports about it."""
        return {"count": len(self.issues), "estimated": self.estimated, "suspects": self.suspects, "policy": self.policy,
                "dropped": int(self.dropped.sum()) if self.dropped is not None else 0,
                "cv_loss_all": self.cv_loss_all, "cv_loss_without": self.cv_loss_without,
                "method": "two-pass confident learning, margin at the estimated count"}


def label_report(X: np.ndarray, y: np.ndarray, tr: np.ndarray, va: np.ndarray, folds: np.ndarray, cv_logits: np.ndarray,
                 head: linear.LinearHead, l2: float, temperature: float, *, num_classes: int, calibrated: bool = True,
                 policy: str = "auto", should_stop: Callable[[], None] = lambda: None, fold_heads: dict | None = None,
                 preconditioner: linear.Preconditioner | None = None) -> LabelReport:
    """The report over every image (rows of X): `tr`/`va` the split, `folds` the train split's folds,
    `cv_logits` their out-of-fold logits at `l2`, `head` the train-split head, `fold_heads` {fold:
    the head that produced that fold's cv_logits} (warm starts; None: from zero); see the module docstring."""
    logits = np.zeros((len(y), num_classes))
    logits[tr] = cv_logits
    if len(va):
        logits[va] = head.logits(X, va)
    probs = calibrate.softmax(logits, temperature)
    suspects = first_pass(probs, y)
    temp2, logits2 = temperature, logits
    if suspects.any():
        logits2 = _without(X, y, tr, va, folds, suspects, l2, num_classes, should_stop, fold_heads or {}, head, preconditioner)
        kept = ~suspects
        temp2 = calibrate.fit_temperature(logits2[kept], y[kept]) if calibrated else 1.0
        probs = calibrate.softmax(logits2, temp2)
    issues = find_label_issues(probs, y)
    flagged = np.zeros(len(y), bool)
    flagged[[i for i, _, _ in issues]] = True
    loss_all = loss_without = None
    clean = tr[~(flagged | suspects)[tr]]
    position = np.full(len(y), -1)
    position[tr] = np.arange(len(tr))
    if len(clean):
        loss_all = calibrate.log_loss(cv_logits[position[clean]], y[clean], temperature)
        if suspects.any():
            loss_without = calibrate.log_loss(logits2[clean], y[clean], temp2)
    helps = loss_without is not None and loss_without < loss_all
    drop = flagged.any() and (policy == "drop" or policy == "auto" and helps)
    return LabelReport(probs.astype(np.float32), issues, int(suspects.sum()), estimated_issue_count(probs, y),
                       flagged if drop else None, temp2 if drop else temperature, policy, loss_all, loss_without)


def _without(X, y, tr, va, folds, exclude, l2, num_classes, should_stop, fold_heads, head, pre) -> np.ndarray:
    """Held-out logits of every row again, same folds and l2, every head fitted without `exclude`
    (each warm-started from the pass-1 head of the same rows: the fold's own, the train split's)."""
    logits = np.zeros((len(y), num_classes))
    keep = ~exclude[tr]
    k = int(folds.max()) + 1

    specs = [linear.Spec(tr[(folds != f) & keep], l2, fold_heads.get(f)) for f in range(k)]
    if len(va):
        specs.append(linear.Spec(tr[keep], l2, head))
    heads = linear.fit_joint(X, y, num_classes, specs, should_stop=should_stop, preconditioner=pre)  # every pass shared
    for f in range(k):
        logits[tr[folds == f]] = heads[f].logits(X, tr[folds == f])
    if len(va):
        logits[va] = heads[k].logits(X, va)
    return logits
