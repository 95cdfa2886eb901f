"""Temperature scaling: one scalar T so that softmax(logits / T) is calibrated.

T is fitted on out-of-fold (cross-validated) logits over the whole training split: fitted on a
small validation split instead, a near-perfect model leaves 0-2 errors to learn from and T
collapses (T ~ 0.08 measured on 1,200 photos), making the model overconfident.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .runtime import torch_threads

T_MIN, T_MAX = 0.05, 20.0  # clamp: a temperature outside this range means too little data
LOG_T_PRIOR_STD = 0.5  # Gaussian prior on log T: with few errors to learn from, T stays near 1


def fit_temperature(logits: np.ndarray, y: np.ndarray, prior_std: float | None = LOG_T_PRIOR_STD) -> float:
    """T > 0 maximising the posterior of softmax(logits / T): mean NLL + (log T)^2 / (2 prior_std^2 N).

    Without the prior, a validation set the model gets (nearly) all right drives T towards 0
    (measured: T = 0.057 after fine-tuning on catvnoncat, test log-loss 0.22 -> 0.55).
    With 1,000 cross-validated logits the prior moves T by less than 1%.
    """
    penalty = 0.0 if not prior_std else 1.0 / (2 * prior_std**2 * max(len(y), 1))
    z = torch.from_numpy(np.asarray(logits, dtype=np.float64))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), yt) + penalty * log_t**2
        loss.backward()
        return loss

    with torch_threads(1):
        opt.step(closure)
    t = float(log_t.detach().exp())
    return float(np.clip(t, T_MIN, T_MAX)) if np.isfinite(t) else 1.0


def log_loss(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    z = torch.from_numpy(np.asarray(logits, dtype=np.float64)) / temperature
    return float(F.cross_entropy(z, torch.from_numpy(np.asarray(y, dtype=np.int64))))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def cross_fitted_temperature(logits: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[float, np.ndarray]:
    """Temperature from a validation set, with an honest estimate of its effect.

    The set is halved (stratified); each half is scaled with the T fitted on the other half.
    Returns (T fitted on all rows, cross-fitted probabilities). If cross-fitting does not lower
    the log-loss, T = 1 and the plain softmax is returned: a T fitted on a handful of errors
    would do more harm than good.
    """
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    half = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        half[idx[: len(idx) // 2]] = True
    if half.all() or not half.any():
        return 1.0, softmax(logits)
    probs = np.zeros((len(y), logits.shape[1]))
    for part in (half, ~half):
        probs[part] = softmax(logits[part], fit_temperature(logits[~part], y[~part]))
    crossed = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1)).mean())
    if crossed >= log_loss(logits, y):
        return 1.0, softmax(logits)
    return fit_temperature(logits, y), probs
