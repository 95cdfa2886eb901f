"""A linear softmax head on frozen features: L2-regularised multinomial logistic regression.

Features are standardised (per-dimension mean and scale from the training rows), the convex
loss  mean cross-entropy + l2/2 * ||W||^2  is minimised full-batch with L-BFGS, and the result
folds back into a plain nn.Linear on the raw features for the checkpoint. The regularisation
strength is chosen by cross-validated log-loss (models/train.py).

Memory and time at scale (issue 17): X is never copied whole. Every pass over the rows a fit
uses (by index: a fold's rows are not sliced out either) gathers CHUNK_ROWS of them at a time,
converts them to float32 in a small buffer (the standardisation is folded into the weights),
and accumulates the loss and its gradient (float64 sums): beyond the caller's features (float16
in a training, 2 bytes an element) a fit holds O(CHUNK_ROWS x D + K x D) floats whatever the
number of rows (a fit of at most DENSE_ELEMENTS values copies its rows once instead). A pass
costs ~2 N D bytes read and 4 N D K multiply-adds (measured: 4.1 ms of one core per 1,000 rows at
D = 2560); `should_stop` is called every CHUNK_ROWS rows. With a `Preconditioner` (a training of
more than 4,096 images) a fit takes 20-40 passes instead of hundreds. `fit_many` runs independent
fits (the folds of a cross-validation) on threads, one core each: torch releases the GIL inside
its kernels.
"""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .runtime import cpu_count, torch_threads

L2_GRID = (1.0, 0.3, 0.1, 0.03, 0.01)  # candidate l2 strengths, strongest first (warm-start path)
CHUNK_ROWS = 1024  # rows gathered and converted to float32 at once (1024 x 2560 x 4 B = 10 MB)
MAX_ITER = 300  # L-BFGS iterations of one fit, at most
DENSE_ELEMENTS = 1 << 23  # a fit of at most this many values (32 MB as float32) copies its rows once instead


class Stopped(Exception):
    """A fit running on a thread of fit_many was asked to stop (another fit failed or was cancelled)."""


@dataclass
class LinearHead:
    mean: np.ndarray  # (D,) feature means of the training rows
    scale: np.ndarray  # (D,) feature standard deviations (1 where constant)
    weight: np.ndarray  # (K, D) on standardised features
    bias: np.ndarray  # (K,)

    def logits(self, X: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """(N, K) float64 logits of X's rows (all, or `rows`), in chunks: no copy of X."""
        w, b = self.folded()
        Xt, idx = torch.from_numpy(np.asarray(X)), _rows(X, rows)
        out = np.empty((len(idx), len(b)))
        for start in range(0, len(idx), CHUNK_ROWS):
            xc = Xt[torch.from_numpy(idx[start : start + CHUNK_ROWS])].float()
            out[start : start + len(xc)] = torch.addmm(b, xc, w.T).numpy()
        return out

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the equivalent nn.Linear on raw features, float32."""
        w = self.weight / self.scale
        return torch.from_numpy(w).float(), torch.from_numpy(self.bias - w @ self.mean).float()


def _rows(X: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    return np.arange(len(X), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)


def standardisation(X: np.ndarray, rows: np.ndarray | None = None, should_stop: Callable[[], None] = lambda: None) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) float64 of X's rows in one chunked pass: each chunk's mean and squared
    deviations (float32, centred on the chunk's mean), merged in float64 (Chan et al.)."""
    Xt, idx = torch.from_numpy(np.asarray(X)), _rows(X, rows)
    count, mean, m2 = 0, torch.zeros(X.shape[1], dtype=torch.float64), torch.zeros(X.shape[1], dtype=torch.float64)
    for start in range(0, len(idx), CHUNK_ROWS):
        should_stop()
        xc = Xt[torch.from_numpy(idx[start : start + CHUNK_ROWS])].float()
        c_mean = xc.mean(0)
        c_m2 = torch.square(xc - c_mean).sum(0).double()
        c = len(xc)
        delta = c_mean.double() - mean
        mean += delta * (c / (count + c))
        m2 += c_m2 + delta**2 * (count * c / (count + c))
        count += c
    std = (m2 / max(count, 1)).sqrt().numpy()
    return mean.numpy(), np.where(std > 1e-6, std, 1.0)


class Preconditioner:
    """L-BFGS in better coordinates: W = V L^-1 with L L^T = C / 4 + l2 I, C the covariance of
    standardised features (of at most `max_rows` rows), so that the loss's Hessian in V is close
    to the identity (logistic loss at p = 1/2) and the solver needs a few tens of passes, not
    hundreds. Only the path changes, never the optimum; it uses no labels, so it may be computed
    once from every row and shared by all the fits of a training, held-out ones included."""

    def __init__(self, X: np.ndarray, rows: np.ndarray | None = None, max_rows: int = 4096, seed: int = 0,
                 should_stop: Callable[[], None] = lambda: None):
        idx = _rows(X, rows)
        if len(idx) > max_rows:
            idx = np.sort(np.random.default_rng(seed).choice(idx, max_rows, replace=False))
        mean, scale = standardisation(X, idx)
        Xt, m, inv = torch.from_numpy(np.asarray(X)), torch.from_numpy(mean).float(), torch.from_numpy(1.0 / scale).float()
        self.cov = torch.zeros(X.shape[1], X.shape[1])
        for start in range(0, len(idx), 512):  # 512 rows at a time: should_stop between them
            should_stop()
            z = (Xt[torch.from_numpy(idx[start : start + 512])].float() - m) * inv
            self.cov.addmm_(z.T, z)
        self.cov /= max(len(idx), 1)
        self._factors: dict[float, torch.Tensor] = {}
        self._lock = threading.Lock()

    def factor(self, l2: float) -> torch.Tensor:
        """L (D, D) float32, lower triangular: L L^T = C / 4 + l2 I."""
        with self._lock:
            if l2 not in self._factors:
                m = self.cov / 4 + max(l2, 1e-4) * torch.eye(len(self.cov))
                self._factors[l2] = torch.linalg.cholesky(m)
            return self._factors[l2]


def fit(X: np.ndarray, y: np.ndarray, num_classes: int, l2: float, init: LinearHead | None = None, max_iter: int = MAX_ITER, *,
        rows: np.ndarray | None = None, should_stop: Callable[[], None] = lambda: None, threads: int = 1,
        preconditioner: Preconditioner | None = None) -> LinearHead:
    """Minimise mean cross-entropy + l2/2 ||W||^2 (bias not penalised) on standardised X.

    X (N, D) any float dtype (float16 in a training), y (N,) label indices; `rows`: fit on these
    rows of X and y only (None: all). `init`: warm start (a head of neighbouring rows or l2).
    `should_stop` is called before every pass over the rows (it raises to cancel)."""
    with torch_threads(threads):
        return _fit(X, np.asarray(y), num_classes, l2, init, max_iter, _rows(X, rows), should_stop, preconditioner)


def _fit(X, y, num_classes, l2, init, max_iter, idx, should_stop, pre) -> LinearHead:
    mean, scale = standardisation(X, idx, should_stop)
    Xt, n = torch.from_numpy(np.asarray(X)), len(idx)
    inv = torch.from_numpy(1.0 / scale)  # standardised x = (x - mean) * inv, folded into the weights below
    mean_t = torch.from_numpy(mean)
    chunks = [(torch.from_numpy(idx[s : s + CHUNK_ROWS]), torch.from_numpy(y[idx[s : s + CHUNK_ROWS]].astype(np.int64)))
              for s in range(0, n, CHUNK_ROWS)]
    L = pre.factor(l2) if pre is not None else None
    W0 = torch.zeros(num_classes, X.shape[1])
    b = torch.zeros(num_classes)
    if init is not None:  # warm start (neighbouring rows or l2)
        W0, b = torch.from_numpy(init.weight).float().clone(), torch.from_numpy(init.bias).float().clone()
    V = W0 @ L if L is not None else W0  # the solver's variable: W = V L^-1
    V.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([V, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-6, tolerance_change=1e-10, history_size=20, line_search_fn="strong_wolfe")
    dense = None
    if n * X.shape[1] <= DENSE_ELEMENTS:  # a small fit: its rows once as float32, one block (no gather per pass)
        dense = torch.from_numpy(np.asarray(np.asarray(X)[idx], dtype=np.float32))
        chunks = [(None, torch.from_numpy(y[idx].astype(np.int64)))]
    buf = torch.empty(min(CHUNK_ROWS, n), X.shape[1]) if dense is None else None
    raw = torch.empty(buf.shape, dtype=Xt.dtype) if dense is None else None

    def weights() -> torch.Tensor:
        v = V.detach()
        return v if L is None else torch.linalg.solve_triangular(L.T, v.T, upper=True).T  # V L^-1

    def closure():  # one pass over the rows: loss and gradient by hand, float32 chunks, float64 sums
        Wd, bd = weights(), b.detach()
        w_raw = Wd.double() * inv  # logits = x_raw @ w_raw.T + b_raw: the standardisation folded in
        b_raw = (bd.double() - w_raw @ mean_t).float()
        w_raw = w_raw.float()
        loss, gx, gb = 0.0, torch.zeros(Wd.shape, dtype=torch.float64), torch.zeros(num_classes, dtype=torch.float64)
        for ci, yc in chunks:
            should_stop()  # every CHUNK_ROWS rows: a pass over 50,000 takes seconds on a busy core
            if dense is not None:
                xc = dense
            else:
                xc = buf[: len(ci)]
                xc.copy_(torch.index_select(Xt, 0, ci, out=raw[: len(ci)]))  # gathered in the features' dtype, then float32
            z = torch.addmm(b_raw, xc, w_raw.T)
            lse = torch.logsumexp(z, 1)
            loss += float((lse - z.gather(1, yc[:, None])[:, 0]).double().sum())
            g = torch.softmax(z, 1)
            g[torch.arange(len(yc)), yc] -= 1.0
            gx += (g.T @ xc).double()
            gb += g.double().sum(0)
        # d/dW of the mean loss on standardised x: (G^T x_raw - (sum G) mean^T) * inv / n, plus the penalty's l2 W
        gw = ((gx - gb[:, None] * mean_t) * inv / n).float() + l2 * Wd
        V.grad = gw if L is None else torch.linalg.solve_triangular(L, gw.T, upper=False).T  # dW/dV: gW L^-T
        b.grad = (gb / n).float()
        return torch.tensor(loss / n + 0.5 * l2 * float((Wd.double() ** 2).sum()))

    opt.step(closure)
    return LinearHead(mean, scale, weights().double().numpy(), b.detach().double().numpy())


def fit_many(jobs: Sequence[Callable[[Callable[[], None]], object]], should_stop: Callable[[], None] = lambda: None,
             workers: int | None = None) -> list:
    """Run independent jobs (each takes a `stop` callable to call often, and returns a result) on
    up to `workers` threads (default: one per core), each with one torch thread. `should_stop` is
    called on this thread only, every 0.1 s while they run (the service's check is not
    thread-safe): when it raises, the jobs stop at their next pass and its exception is raised."""
    workers = max(1, min(workers or cpu_count(), len(jobs)))
    if workers == 1:
        with torch_threads(1):
            return [job(should_stop) for job in jobs]
    halt = threading.Event()

    def stop():
        if halt.is_set():
            raise Stopped()

    with torch_threads(1), ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(job, stop) for job in jobs]
        try:
            while True:
                done, pending = wait(futures, timeout=0.1, return_when=FIRST_EXCEPTION)
                if not pending or any(f.exception() is not None for f in done):
                    break
                should_stop()
        except BaseException:
            halt.set()
            raise
        halt.set()  # a failed job: the others stop too
        for f in futures:
            if f.exception() is not None and not isinstance(f.exception(), Stopped):
                raise f.exception()
        return [f.result() for f in futures]


def cross_val_logits(X: np.ndarray, y: np.ndarray, num_classes: int, folds: np.ndarray, l2_grid=L2_GRID, should_stop: Callable[[], None] = lambda: None,
                     progress: Callable[[int, int], None] = lambda done, total: None, *, rows: np.ndarray | None = None,
                     heads: dict | None = None, init: dict | None = None, preconditioner: Preconditioner | None = None) -> dict[float, np.ndarray]:
    """Out-of-fold logits for every l2 in the grid: each row predicted by a head that never saw it.

    `rows` (None: all of X): the rows cross-validated, `folds` one fold id per row of them, `y`
    one label per row of X. `heads`, when given, receives {(fold, l2): LinearHead}. `init`:
    {fold: LinearHead} to warm-start each fold's first fit from (a head that never saw that fold's
    rows, so its held-out logits stay honest). The folds run in parallel (fit_many)."""
    idx, y = _rows(X, rows), np.asarray(y)
    folds = np.asarray(folds)
    out = {l2: np.zeros((len(idx), num_classes)) for l2 in l2_grid}
    k = int(folds.max()) + 1

    def job(f):
        def run(stop):
            head = (init or {}).get(f)
            fitted = {}
            for l2 in l2_grid:  # strongest first: each fit warm-starts the next
                head = fit(X, y, num_classes, l2, init=head, rows=idx[folds != f], should_stop=stop, preconditioner=preconditioner)
                fitted[l2] = head
            return fitted
        return run

    results = fit_many([job(f) for f in range(k)], should_stop)
    for f, fitted in enumerate(results):
        te = folds == f
        for l2, head in fitted.items():
            out[l2][te] = head.logits(X, idx[te])
            if heads is not None:
                heads[(f, l2)] = head
        progress(f + 1, k)
    return out
