"""A linear softmax head on frozen features: L2-regularised multinomial logistic regression.

Features are standardised (per-dimension mean and scale from the training rows), the convex
loss  mean cross-entropy + l2/2 * ||W||^2  is minimised full-batch with L-BFGS (float32: as accurate here, 4x faster),
and the result folds back into a plain nn.Linear on the raw features for the checkpoint.
The regularisation strength is chosen by cross-validated log-loss (see `select_l2`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .runtime import torch_threads

L2_GRID = (1.0, 0.3, 0.1, 0.03, 0.01)  # candidate l2 strengths, strongest first (warm-start path)


@dataclass
class LinearHead:
    mean: np.ndarray  # (D,) feature means of the training rows
    scale: np.ndarray  # (D,) feature standard deviations (1 where constant)
    weight: np.ndarray  # (K, D) on standardised features
    bias: np.ndarray  # (K,)

    def logits(self, X: np.ndarray) -> np.ndarray:
        return ((X - self.mean) / self.scale) @ self.weight.T + self.bias

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the equivalent nn.Linear on raw features, float32."""
        w = self.weight / self.scale
        return torch.from_numpy(w).float(), torch.from_numpy(self.bias - w @ self.mean).float()


def fit(X: np.ndarray, y: np.ndarray, num_classes: int, l2: float, init: LinearHead | None = None, max_iter: int = 300) -> LinearHead:
    """Minimise mean cross-entropy + l2/2 ||W||^2 (bias not penalised) on standardised X."""
    with torch_threads(1):
        return _fit(X, y, num_classes, l2, init, max_iter)


def _fit(X, y, num_classes, l2, init, max_iter) -> LinearHead:
    mean = X.mean(0, dtype=np.float64)
    std = X.std(0, dtype=np.float64)
    scale = np.where(std > 1e-6, std, 1.0)
    Xs = torch.from_numpy(((X - mean) / scale).astype(np.float32))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    W = torch.zeros(num_classes, X.shape[1])
    b = torch.zeros(num_classes)
    if init is not None:  # warm start (same rows, neighbouring l2)
        W, b = torch.from_numpy(init.weight).float(), torch.from_numpy(init.bias).float()
    W.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-6, tolerance_change=1e-10, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(Xs @ W.T + b, yt) + 0.5 * l2 * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LinearHead(mean, scale, W.detach().double().numpy(), b.detach().double().numpy())


def cross_val_logits(X: np.ndarray, y: np.ndarray, num_classes: int, folds: np.ndarray, l2_grid=L2_GRID, should_stop: Callable[[], None] = lambda: None, progress: Callable[[int, int], None] = lambda done, total: None) -> dict[float, np.ndarray]:
    """Out-of-fold logits for every l2 in the grid: each row predicted by a head that never saw it."""
    out = {l2: np.zeros((len(y), num_classes)) for l2 in l2_grid}
    k = int(folds.max()) + 1
    for f in range(k):
        tr, te = folds != f, folds == f
        head = None
        for l2 in l2_grid:  # strongest first: each fit warm-starts the next
            should_stop()
            head = fit(X[tr], y[tr], num_classes, l2, init=head)
            out[l2][te] = head.logits(X[te])
        progress(f + 1, k)
    return out
