"""Metrics of a trained model on held-out images, as one JSON-able dict.

`evaluate` takes calibrated probabilities (N, K) and integer labels; the service stores the
dict with the model version and `threshold_for_precision` answers "which cut-off gives at
least 99% precision for `cat`?" from it.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15  # equal-width confidence bins
THRESHOLDS = sorted({round(t, 4) for t in np.linspace(0, 1, 101)} | {0.995, 0.999, 0.9995, 0.9999})


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties count half); None if one class is absent."""
    pos, neg = int(positive.sum()), int((~positive).sum())
    if pos == 0 or neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    s = scores[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[positive].sum() - pos * (pos + 1) / 2) / (pos * neg))


def calibration(probs: np.ndarray, y: np.ndarray, n_bins: int = ECE_BINS) -> dict:
    """Top-label expected calibration error, multi-class Brier score and the reliability bins."""
    conf, correct = probs.max(1), probs.argmax(1) == y
    edges = np.linspace(0, 1, n_bins + 1)
    bins, ece = [], 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if m.any():
            c, a = float(conf[m].mean()), float(correct[m].mean())
            ece += m.mean() * abs(a - c)
            bins.append({"lower": float(lo), "upper": float(hi), "confidence": c, "accuracy": a, "count": int(m.sum())})
    onehot = np.eye(probs.shape[1])[y]
    return {"ece": float(ece), "brier": float(((probs - onehot) ** 2).sum(1).mean()), "bins": bins}


def _threshold_curve(p: np.ndarray, positive: np.ndarray) -> list[dict]:
    curve = []
    for t in THRESHOLDS:
        pred = p >= t
        tp = int((pred & positive).sum())
        curve.append({"threshold": t, "precision": tp / int(pred.sum()) if pred.any() else None, "recall": tp / max(1, int(positive.sum()))})
    return curve


def evaluate(probs: np.ndarray, y: np.ndarray, labels: list[str], history: list[dict] | None = None) -> dict:
    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(y, dtype=np.int64)
    k = len(labels)
    pred = probs.argmax(1) if len(y) else np.zeros(0, np.int64)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    per_label, aucs, curves = {}, {}, {}
    for i, name in enumerate(labels):
        tp, support, predicted = int(cm[i, i]), int(cm[i].sum()), int(cm[:, i].sum())
        p, r = (tp / predicted if predicted else 0.0), (tp / support if support else 0.0)
        per_label[name] = {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "support": support}
        aucs[name] = roc_auc(probs[:, i], y == i)
        curves[name] = _threshold_curve(probs[:, i], y == i)
    valid = [a for a in aucs.values() if a is not None]
    return {
        "n": int(len(y)),
        "accuracy": float((pred == y).mean()) if len(y) else None,
        "loss": float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1)).mean()) if len(y) else None,
        "per_label": per_label,
        # binary: AUC is the same whichever label is called positive; multi-class: one-vs-rest macro
        "roc_auc": (aucs[labels[0]] if k == 2 else float(np.mean(valid)) if len(valid) == k else None),
        "roc_auc_per_label": aucs,
        "confusion_matrix": {"labels": list(labels), "matrix": cm.tolist()},  # rows: true, columns: predicted
        "threshold_curve": curves,
        "calibration": calibration(probs, y) if len(y) else None,
        "history": list(history or []),
    }


def threshold_for_precision(evaluation: dict, label: str, min_precision: float) -> float | None:
    """Lowest threshold on P(label) whose held-out precision is >= min_precision (most recall)."""
    for point in evaluation["threshold_curve"][label]:
        if point["precision"] is not None and point["precision"] >= min_precision and point["recall"] > 0:
            return point["threshold"]
    return None
