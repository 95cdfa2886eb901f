"""A linear softmax head on frozen features: L2-regularised multinomial logistic regression.

Features are standardised (per-dimension mean and scale from the training rows), the convex
loss  mean cross-entropy + l2/2 * ||W||^2  is minimised full-batch with L-BFGS, and the result
folds back into a plain nn.Linear on the raw features for the checkpoint. The regularisation
strength is chosen by cross-validated log-loss (models/train.py).

Memory and time at scale (issue 17): X is never copied whole. Every pass over the rows a fit
uses (by index: a fold's rows are not sliced out either) gathers CHUNK_ROWS of them at a time,
converts them to float32 in a small buffer (the standardisation is folded into the weights),
and accumulates the loss and its gradient (float64 sums): beyond the caller's features (float16
in a training, 2 bytes an element) a fit holds O(CHUNK_ROWS x D + K x D) floats a head whatever
the number of rows (a fit of at most DENSE_ELEMENTS values copies its rows once instead).
`fit_joint` fits several heads (the folds of a cross-validation and the train split's head) in
the same passes: a chunk is gathered and converted once for all of them and its logits and
gradients are one GEMM each, (K - 1) columns a head, each head masking out the rows it does not
use; each head keeps its own L-BFGS, so each is exactly the fit `fit` would make alone. A pass
costs ~2 N D bytes read and 4 N D (K - 1) H multiply-adds for H heads, on every core (disjoint
chunks); `should_stop` is called every CHUNK_ROWS rows (or 0.1 s). With a `Preconditioner` (a
training of more than 4,096 images) a fit takes 20-45 passes instead of hundreds; a joint fit
takes as many as its slowest head.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .runtime import torch_threads

L2_GRID = (1.0, 0.3, 0.1, 0.03, 0.01)  # candidate l2 strengths, strongest first (warm-start path)
CHUNK_ROWS = 256  # rows gathered and converted to float32 at once (256 x 2560 x 4 B = 2.6 MB: the GEMMs read it from cache)
MAX_ITER = 300  # L-BFGS iterations of one fit, at most
TOLERANCE_GRAD = 1e-6  # L-BFGS stops when every gradient entry (preconditioned coordinates) is below this...
TOLERANCE_CHANGE = 1e-10  # ... or when an iteration changes the loss (or any parameter) by less than this
DENSE_ELEMENTS = 1 << 23  # a fit of at most this many values (32 MB as float32) copies its rows once instead
TRACE: list[dict] | None = None  # a list: every fit_joint appends {heads, rows, passes, seconds} (bench/train_scale.py --trace)
DEVICE_ROWS = 8192  # rows of a device pass's GEMM at once (float32 sums within, float64 across)
_PASSES_DEVICE: contextvars.ContextVar[torch.device | None] = contextvars.ContextVar("passes_device", default=None)


@contextlib.contextmanager
def passes_on(device: torch.device | None):
    """The fits started on this thread inside the block run their passes on `device` (a training on
    a GPU: models/train.py), the rows copied there once a fit; None: on the CPU workers (_Passes).
    On an H200 host, whose 16 vCPUs gave the CPU passes less than this machine's 2 do, the head of
    the 50,000-image training took 26 s of 104 (bench/RESULTS.md)."""
    token = _PASSES_DEVICE.set(device)
    try:
        yield
    finally:
        _PASSES_DEVICE.reset(token)


class Stopped(Exception):
    """A pass running on a worker thread was asked to stop (another failed, or the fit was cancelled)."""


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


@dataclass
class Spec:
    """One head of a joint fit (fit_joint): the rows of X it is fitted on, its l2, its warm start."""

    rows: np.ndarray | None
    l2: float
    init: LinearHead | None = None


def fit(X: np.ndarray, y: np.ndarray, num_classes: int, l2: float, init: LinearHead | None = None, max_iter: int = MAX_ITER, *,
        rows: np.ndarray | None = None, should_stop: Callable[[], None] = lambda: None, threads: int = 1,
        preconditioner: Preconditioner | None = None) -> LinearHead:
    """Minimise mean cross-entropy + l2/2 ||W||^2 (bias not penalised) on standardised X.

    X (N, D) any float dtype (float16 in a training), y (N,) label indices; `rows`: fit on these
    rows of X and y only (None: all). `init`: warm start (a head of neighbouring rows or l2).
    `should_stop` is called before every pass over the rows (it raises to cancel)."""
    return fit_joint(X, y, num_classes, [Spec(rows, l2, init)], max_iter, should_stop=should_stop, workers=threads,
                     preconditioner=preconditioner)[0]


def fit_joint(X: np.ndarray, y: np.ndarray, num_classes: int, specs: Sequence[Spec], max_iter: int = MAX_ITER, *,
              should_stop: Callable[[], None] = lambda: None, workers: int | None = None,
              preconditioner: Preconditioner | None = None) -> list[LinearHead]:
    """Independent fits (each as `fit` would make it: its rows, l2, warm start) sharing every pass
    over X: each chunk of the union of their rows is gathered and converted once, and the logits
    and gradients of every head come from one GEMM each (a few columns cost about what one
    costs), each head counting only its own rows. Each head keeps its own L-BFGS (on a thread of
    its own, the steps are tiny); a pass evaluates every head still running, at the point its
    solver asks for. The passes run on `workers` threads (default: the process's torch threads, which
    the worker sets from its CPU budget, the cgroup quota included) over disjoint
    chunks; `should_stop` is called on this thread only, at least every CHUNK_ROWS rows or 0.1 s."""
    specs = list(specs)
    if not specs:
        return []
    y = np.asarray(y)
    workers, started = max(1, workers or torch.get_num_threads()), time.perf_counter()
    for l2 in {s.l2 for s in specs} if preconditioner is not None else ():
        preconditioner.factor(l2)  # a Cholesky of D x D (0.1-0.2 s at D = 2560), on the process's threads
    device = _PASSES_DEVICE.get()
    with torch_threads(1):  # the workers are the parallelism: one torch thread each
        passes = (_Passes(X, y, num_classes, [_rows(X, s.rows) for s in specs], workers, should_stop) if device is None
                  else _DevicePasses(X, y, num_classes, [_rows(X, s.rows) for s in specs], device, should_stop))
        try:
            mean, std = passes.standardisation()
            solvers = [_Solver(m, s, float(passes.count[m]), mean[m].clone(), np.where(std[m].numpy() > 1e-6, std[m].numpy(), 1.0),
                               max_iter, preconditioner) for m, s in enumerate(specs)]
            if len(solvers) == 1:
                solvers[0].run(lambda m, v, b: _evaluate(passes, solvers, {m: (v, b)})[m], num_classes, X.shape[1])
            else:
                _run_together(solvers, passes, num_classes, X.shape[1])
            W = _solve(solvers, {s.m: s.V for s in solvers}, gradient=False)
        finally:
            passes.close()
        if TRACE is not None:
            TRACE.append({"heads": len(specs), "rows": len(passes.union), "passes": passes.passes, "seconds": time.perf_counter() - started,
                          "at": started})
        return [s.head(W[s.m]) for s in solvers]


class _Passes:
    """The passes over the union of the heads' rows: per head, the standardisation (once) and
    the loss's sums and gradient (at any subset of heads, each at its own weights)."""

    def __init__(self, X, y, num_classes, rows: list[np.ndarray], workers: int, should_stop):
        self.Xt, self.k, self.should_stop, self.passes = torch.from_numpy(np.asarray(X)), num_classes, should_stop, 0
        self.union, member = _membership(rows)  # member: how often each row counts in each head (0 or 1)
        union = self.union
        d = X.shape[1]
        self.dense = None
        if len(union) * d <= DENSE_ELEMENTS:  # small: the rows once as float32, a block per worker (no gather per pass)
            self.dense = torch.from_numpy(np.asarray(np.asarray(X)[union], dtype=np.float32))
            step = max(1, -(-len(union) // workers))
        else:
            step = CHUNK_ROWS
        yall = torch.from_numpy(y[union].astype(np.int64))
        self.blocks = []  # (rows of X or a slice of dense, labels, one-hot labels, membership)
        for s in range(0, len(union), step):
            e = min(s + step, len(union))
            ci = slice(s, e) if self.dense is not None else torch.from_numpy(union[s:e])
            yc = yall[s:e]
            self.blocks.append((ci, yc, torch.nn.functional.one_hot(yc, num_classes).float(), torch.from_numpy(member[s:e])))
        self.workers = max(1, min(workers, len(self.blocks)))
        n = min(step, len(union))
        self.bufs = [(torch.empty(n, d), torch.empty(n, d, dtype=self.Xt.dtype)) if self.dense is None else None for _ in range(self.workers)]
        self.count = torch.from_numpy(member.sum(0).astype(np.float64))  # rows per head
        self.halt, self.checked, self.slots = threading.Event(), time.perf_counter(), None
        # torch.set_num_threads is per thread for OpenMP (a new thread starts with every core): one a worker
        self.pool = ThreadPoolExecutor(self.workers, initializer=torch.set_num_threads, initargs=(1,)) if self.workers > 1 else None

    def _x(self, block, w: int) -> torch.Tensor:
        ci = block[0]
        if self.dense is not None:
            return self.dense[ci]
        buf, raw = self.bufs[w]
        xc = buf[: len(ci)]
        xc.copy_(torch.index_select(self.Xt, 0, ci, out=raw[: len(ci)]))  # gathered in the features' dtype, then float32
        return xc

    def _map(self, work: Callable[[torch.Tensor, tuple, object, int], None], start: Callable[[], object], claim: bool = False) -> list:
        """work(x, block, acc, i) over every block i, on the workers: each folds its blocks into an
        accumulator of its own (start()), in place; the accumulators, one a worker. Nothing of
        a chunk's size is allocated per chunk (a list of per-chunk results interleaved with the
        chunk's temporaries fragments the heap: +460 MB of RSS at 50,000 rows, measured).
        claim: each worker takes the next block not yet taken (a core shared with another
        process does less; work then writes block i's results where they are summed in block
        order: the same sums whoever computed them); else worker w takes blocks w, w + workers, ..."""
        accs = [start() for _ in range(self.workers)]
        if time.perf_counter() - self.checked >= 0.1:  # passes over few rows take milliseconds: every 0.1 s at least
            self.checked = time.perf_counter()
            self.should_stop()
        if self.pool is None:
            for i, b in enumerate(self.blocks):
                self.should_stop()  # every CHUNK_ROWS rows: a pass over 50,000 takes a second on a busy core
                work(self._x(b, 0), b, accs[0], i)
            return accs
        taken = itertools.count()

        def part(w):
            for i in (iter(taken.__next__, None) if claim else range(w, len(self.blocks), self.workers)):
                if i >= len(self.blocks):
                    return
                if self.halt.is_set():
                    raise Stopped()
                work(self._x(self.blocks[i], w), self.blocks[i], accs[w], i)

        futures = [self.pool.submit(part, w) for w in range(self.workers)]
        try:
            while True:
                done, pending = wait(futures, timeout=0.1, return_when=FIRST_EXCEPTION)
                if not pending or any(f.exception() is not None for f in done):
                    break
                self.should_stop()
        except BaseException:
            self.halt.set()
            wait(futures)
            raise
        for f in futures:
            if f.exception() is not None:
                self.halt.set()
                wait(futures)
                raise f.exception()
        return accs

    def standardisation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) float64 (heads, D) of each head's rows: each chunk centred on its own mean,
        each head's share of it (float32 GEMMs) merged in float64 (Chan et al.)."""
        heads, d = self.count.shape[0], self.Xt.shape[1]
        n = max(len(b[1]) for b in self.blocks)

        def start():  # count, mean, M2 of each head's rows so far; scratch
            return (torch.zeros(heads, 1, dtype=torch.float64), torch.zeros(heads, d, dtype=torch.float64),
                    torch.zeros(heads, d, dtype=torch.float64), torch.empty(n, d), torch.empty(heads, d))

        def merge(acc, cnt, c_mean, c_m2):
            count, mean, m2 = acc[:3]
            total = (count + cnt).clamp(min=1)
            delta = c_mean - mean
            mean += delta * (cnt / total)
            m2 += c_m2 + delta * delta * (count * cnt / total)
            count += cnt

        def work(x, block, acc, _i):
            mk, dev, tmp = block[3], acc[3][: len(x)], acc[4]
            c = x.mean(0)
            torch.sub(x, c, out=dev)
            cnt = mk.sum(0).double()[:, None]
            safe = cnt.clamp(min=1)
            s1 = torch.mm(mk.T, dev, out=tmp).double()
            dev.mul_(dev)
            s2 = torch.mm(mk.T, dev, out=tmp).double()
            merge(acc, cnt, c.double() + s1 / safe, s2 - s1 * s1 / safe)

        accs = self._map(work, start)
        for other in accs[1:]:
            merge(accs[0], other[0], other[1], other[2])
        count, mean, m2 = accs[0][:3]
        return mean, (m2 / count.clamp(min=1)).clamp(min=0).sqrt()

    def loss(self, batch: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> dict[int, tuple[float, torch.Tensor, torch.Tensor]]:
        """{head: (sum of its rows' cross-entropy, sum of G^T x_raw (K, D), sum of G (K,)), float64}
        at {head: (weights (K, D), bias (K,)) on raw features, float32}: logits x_raw @ w.T + b.

        Softmax depends only on the logits' differences, and each row of G sums to zero: the GEMMs
        use class 0's differences only, K - 1 columns a head (one for two classes), not K."""
        heads, k = list(batch), self.k
        self.passes += 1
        w, b = _differences(batch, heads)
        cols = torch.tensor(heads)
        every = heads == list(range(len(self.count)))
        h, d, nb = len(heads), self.Xt.shape[1], len(self.blocks)
        if self.slots is None:  # each block's sums (every head), kept between passes
            c = len(self.count) * (k - 1)
            self.slots = (torch.empty(nb, c, d), torch.empty(nb, c, dtype=torch.float64), torch.empty(nb, c, dtype=torch.float64))
        gx_at, loss_at, gb_at = (t[:, : h * (k - 1)] for t in self.slots)
        loss_at = loss_at[:, :h]

        def work(x, block, acc, i):
            _, yc, onehot, member = block
            loss, g = _chunk_loss(x, onehot, member if every else member[:, cols], w, b, k)
            torch.sum(loss.double(), 0, out=loss_at[i])
            torch.mm(g.T, x, out=gx_at[i])
            torch.sum(g.double(), 0, out=gb_at[i])

        self._map(work, lambda: None, claim=True)
        gx = torch.zeros(h * (k - 1), d, dtype=torch.float64)
        for i in range(nb):  # in block order, in float64
            gx.add_(gx_at[i])
        return _per_head(heads, k, loss_at.sum(0), gx, gb_at.sum(0))

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()


def _differences(batch: dict[int, tuple[torch.Tensor, torch.Tensor]], heads: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The heads' weights and biases as differences from class 0's: (heads x (K-1), D), (heads x (K-1),)."""
    w = torch.cat([batch[m][0][1:] - batch[m][0][0] for m in heads])
    b = torch.cat([batch[m][1][1:] - batch[m][1][0] for m in heads])
    return w, b


def _chunk_loss(x: torch.Tensor, onehot: torch.Tensor, mk: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk's cross-entropy per row and head (n, heads) and its gradient in the logit differences
    (n, heads x (K-1)), each row counted as often as mk says; x, onehot, mk on any one device."""
    n, h = len(x), mk.shape[1]
    if k == 2:  # one logit difference z a head: cross-entropy softplus(z) - y z, gradient sigmoid(z) - y
        z = torch.addmm(b, x, w.T)
        yf = onehot[:, 1:]
        return (torch.nn.functional.softplus(z) - yf * z) * mk, (torch.sigmoid(z) - yf) * mk
    z = torch.cat([torch.zeros(n, h, 1, device=x.device), torch.addmm(b, x, w.T).view(n, h, k - 1)], 2)
    loss = (torch.logsumexp(z, 2) - (z * onehot[:, None, :]).sum(2)) * mk
    g = torch.softmax(z, 2)
    g -= onehot[:, None, :]
    g *= mk[:, :, None]
    return loss, g[:, :, 1:].reshape(n, h * (k - 1))


def _per_head(heads: list[int], k: int, loss: torch.Tensor, gx: torch.Tensor, gb: torch.Tensor) -> dict[int, tuple[float, torch.Tensor, torch.Tensor]]:
    """Summed loss (heads,), G^T x (heads x (K-1), D) and G (heads x (K-1),) on the host -> _Passes.loss's
    answer, class 0's gradient restored as minus the others' (G's rows sum to zero)."""
    h, d = len(heads), gx.shape[-1]
    gx, gb = gx.view(h, k - 1, d), gb.view(h, k - 1)
    gx = torch.cat([-gx.sum(1, keepdim=True), gx], 1)
    gb = torch.cat([-gb.sum(1, keepdim=True), gb], 1)
    return {m: (float(loss[i]), gx[i], gb[i]) for i, m in enumerate(heads)}


def _membership(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(the sorted union of the heads' rows, (union, heads) float32: how often each row counts in each head)."""
    union = np.unique(np.concatenate(rows)) if len(rows) > 1 else np.sort(rows[0])
    member = np.zeros((len(union), len(rows)), np.float32)
    for m, r in enumerate(rows):
        np.add.at(member[:, m], np.searchsorted(union, r), 1.0)
    return union, member


class _DevicePasses:
    """_Passes on a device (a GPU): the union of the heads' rows copied there once as float32
    (50,000 x 2560: 512 MB of the card), then each pass is the same loss and gradient as
    _Passes.loss for every head at once, DEVICE_ROWS rows a GEMM, summed in float64; what goes back
    to the solvers (on the host) is a few (K, D) sums a pass."""

    def __init__(self, X, y, num_classes, rows: list[np.ndarray], device: torch.device, should_stop):
        self.k, self.should_stop, self.passes, self.device = num_classes, should_stop, 0, device
        self.union, member = _membership(rows)
        self.Xt = torch.from_numpy(np.asarray(X))
        self.x = torch.empty(len(self.union), X.shape[1], device=device)
        for s in range(0, len(self.union), DEVICE_ROWS):  # gathered a chunk at a time: no whole copy on the host
            should_stop()
            self.x[s : s + DEVICE_ROWS] = self.Xt[torch.from_numpy(self.union[s : s + DEVICE_ROWS])].to(device).float()
        self.onehot = torch.nn.functional.one_hot(torch.from_numpy(y[self.union].astype(np.int64)), num_classes).float().to(device)
        self.member = torch.from_numpy(member).to(device)
        self.count = torch.from_numpy(member.sum(0).astype(np.float64))  # rows per head

    def _chunks(self):
        for s in range(0, len(self.union), DEVICE_ROWS):
            self.should_stop()
            yield self.x[s : s + DEVICE_ROWS], self.onehot[s : s + DEVICE_ROWS], self.member[s : s + DEVICE_ROWS]

    def standardisation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) float64 (heads, D) of each head's rows, on the host: sums of the rows centred
        on their overall mean (float32 GEMMs a chunk, float64 across)."""
        centre = self.x.mean(0)
        heads, d = self.member.shape[1], self.x.shape[1]
        s1 = torch.zeros(heads, d, dtype=torch.float64, device=self.device)
        s2 = torch.zeros_like(s1)
        for x, _, mk in self._chunks():
            dev = x - centre
            s1 += (mk.T @ dev).double()
            s2 += (mk.T @ (dev * dev)).double()
        n = self.count.to(self.device)[:, None].clamp(min=1)
        mean = s1 / n
        return (centre.double() + mean).cpu(), (s2 / n - mean * mean).clamp(min=0).sqrt().cpu()

    def loss(self, batch: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> dict[int, tuple[float, torch.Tensor, torch.Tensor]]:
        """As _Passes.loss (class 0's differences only, K - 1 columns a head)."""
        heads, k, dev = list(batch), self.k, self.device
        self.passes += 1
        w, b = (t.to(dev) for t in _differences(batch, heads))
        cols = torch.tensor(heads, device=dev)
        h, d = len(heads), self.x.shape[1]
        loss_sum = torch.zeros(h, dtype=torch.float64, device=dev)
        gx = torch.zeros(h * (k - 1), d, dtype=torch.float64, device=dev)
        gb = torch.zeros(h * (k - 1), dtype=torch.float64, device=dev)
        for x, onehot, member in self._chunks():
            loss, g = _chunk_loss(x, onehot, member[:, cols], w, b, k)
            loss_sum += loss.double().sum(0)
            gx += (g.T @ x).double()
            gb += g.double().sum(0)
        return _per_head(heads, k, loss_sum.cpu(), gx.cpu(), gb.cpu())

    def close(self):
        self.x = self.onehot = self.member = None


class _Solver:
    """One head's L-BFGS (torch's, as `fit` has always run it) on the shared passes: its variable is
    V = W L (L the preconditioner's factor at its l2) and b; _evaluate maps V to W and back."""

    def __init__(self, m: int, spec: Spec, n: float, mean: torch.Tensor, scale: np.ndarray, max_iter: int, pre: Preconditioner | None):
        self.m, self.l2, self.init, self.n, self.max_iter = m, spec.l2, spec.init, max(n, 1.0), max_iter
        self.mean, self.scale, self.inv = mean, scale, torch.from_numpy(1.0 / scale)  # standardised x = (x - mean) * inv
        self.L = pre.factor(spec.l2) if pre is not None else None

    def run(self, evaluate: Callable[[int, torch.Tensor, torch.Tensor], tuple], k: int, d: int) -> None:
        W0, b = torch.zeros(k, d), torch.zeros(k)
        if self.init is not None:  # warm start (neighbouring rows or l2)
            W0, b = torch.from_numpy(self.init.weight).float().clone(), torch.from_numpy(self.init.bias).float().clone()
        V = W0 @ self.L if self.L is not None else W0  # the solver's variable: W = V L^-1
        V.requires_grad_(True)
        b.requires_grad_(True)
        opt = torch.optim.LBFGS([V, b], lr=1.0, max_iter=self.max_iter, tolerance_grad=TOLERANCE_GRAD,
                                tolerance_change=TOLERANCE_CHANGE, history_size=20, line_search_fn="strong_wolfe")

        def closure():  # one pass over the rows (shared with the other heads)
            loss, V.grad, b.grad = evaluate(self.m, V.detach(), b.detach())
            return torch.tensor(loss)

        opt.step(closure)
        self.V, self.b = V.detach(), b.detach()

    def head(self, W: torch.Tensor) -> LinearHead:
        return LinearHead(self.mean.numpy(), self.scale, W.double().numpy(), self.b.double().numpy())


def _solve(solvers: list[_Solver], mats: dict[int, torch.Tensor], gradient: bool) -> dict[int, torch.Tensor]:
    """{head: V L^-1} (gradient: {head: gW L^-T}, dW/dV), one triangular solve for every head
    sharing a factor: each reads L (D^2 floats, 26 MB at D = 2560) once, not once a head."""
    out, groups = {}, {}
    for m, v in mats.items():
        L = solvers[m].L
        if L is None:
            out[m] = v
        else:
            groups.setdefault(id(L), (L, []))[1].append(m)
    for L, heads in groups.values():
        rhs = torch.cat([mats[m] for m in heads]).T
        x = (torch.linalg.solve_triangular(L, rhs, upper=False) if gradient else torch.linalg.solve_triangular(L.T, rhs, upper=True)).T
        for i, m in enumerate(heads):
            out[m] = x[i * len(mats[m]) : (i + 1) * len(mats[m])]
    return out


def _evaluate(passes: _Passes, solvers: list[_Solver], batch: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> dict[int, tuple]:
    """{head: (objective, its gradient in V, in b)} at {head: (V, b)}: one pass over the rows for all."""
    W = _solve(solvers, {m: v for m, (v, _) in batch.items()}, gradient=False)
    raw = {}
    for m, (_, b) in batch.items():
        s = solvers[m]
        w_raw = W[m].double() * s.inv  # logits = x_raw @ w_raw.T + b_raw: the standardisation folded in
        raw[m] = (w_raw.float(), (b.double() - w_raw @ s.mean).float())
    sums = passes.loss(raw)
    gW, out = {}, {}
    for m, (loss, gx, gb) in sums.items():
        s = solvers[m]
        # d/dW of the mean loss on standardised x: (G^T x_raw - (sum G) mean^T) * inv / n, plus the penalty's l2 W
        gW[m] = ((gx - gb[:, None] * s.mean) * s.inv / s.n).float() + s.l2 * W[m]
        out[m] = (loss / s.n + 0.5 * s.l2 * float((W[m].double() ** 2).sum()), (gb / s.n).float())
    gV = _solve(solvers, gW, gradient=True)
    return {m: (out[m][0], gV[m], out[m][1]) for m in out}


def _run_together(solvers: list[_Solver], passes: _Passes, k: int, d: int) -> None:
    """Every solver on a thread of its own; this thread runs a pass whenever each solver still
    running has asked for one (its closure waits for the pass), at their points all at once."""
    cond, asks, replies, running = threading.Condition(), {}, {}, set(range(len(solvers)))
    halt: list[BaseException] = []

    def evaluate(m, v, b):
        with cond:
            asks[m] = (v, b)
            cond.notify_all()
            while m not in replies and not halt:
                cond.wait()
            if halt:
                raise Stopped()
            return replies.pop(m)

    def run(s: _Solver):
        try:
            torch.set_num_threads(1)  # this thread's OpenMP setting (see _Passes.pool)
            s.run(evaluate, k, d)
        except Stopped:
            pass
        except BaseException as e:  # noqa: BLE001 -- raised on the calling thread below
            with cond:
                halt.append(e)
        finally:
            with cond:
                running.discard(s.m)
                cond.notify_all()

    threads = [threading.Thread(target=run, args=(s,), daemon=True) for s in solvers]
    for t in threads:
        t.start()
    try:
        while True:
            with cond:
                while running and not halt and not running <= asks.keys():
                    if not cond.wait(0.1):  # the solvers' steps take milliseconds; a loaded core, longer
                        passes.should_stop()
                if halt:
                    raise halt[0]
                if not running:
                    break
                batch = {m: asks.pop(m) for m in sorted(running)}
            results = _evaluate(passes, solvers, batch)  # calls should_stop
            with cond:
                replies.update(results)
                cond.notify_all()
    except BaseException as e:
        with cond:
            halt.append(e)
            cond.notify_all()
        raise
    finally:
        for t in threads:
            t.join()


def cross_val_logits(X: np.ndarray, y: np.ndarray, num_classes: int, folds: np.ndarray, l2_grid=L2_GRID, should_stop: Callable[[], None] = lambda: None,
                     progress: Callable[[int, int], None] = lambda done, total: None, *, rows: np.ndarray | None = None,
                     heads: dict | None = None, init: dict | None = None, preconditioner: Preconditioner | None = None) -> dict[float, np.ndarray]:
    """Out-of-fold logits for every l2 in the grid: each row predicted by a head that never saw it.

    `rows` (None: all of X): the rows cross-validated, `folds` one fold id per row of them, `y`
    one label per row of X. `heads`, when given, receives {(fold, l2): LinearHead}. `init`:
    {fold: LinearHead} to warm-start each fold's first fit from (a head that never saw that fold's
    rows, so its held-out logits stay honest). The folds share their passes (fit_joint)."""
    idx, y = _rows(X, rows), np.asarray(y)
    folds = np.asarray(folds)
    out = {l2: np.zeros((len(idx), num_classes)) for l2 in l2_grid}
    k = int(folds.max()) + 1

    last = [(init or {}).get(f) for f in range(k)]
    for step, l2 in enumerate(l2_grid):  # strongest first: each fold's fit warm-starts its next; the folds' passes shared
        last = fit_joint(X, y, num_classes, [Spec(idx[folds != f], l2, last[f]) for f in range(k)], should_stop=should_stop,
                         preconditioner=preconditioner)
        for f, head in enumerate(last):
            te = folds == f
            out[l2][te] = head.logits(X, idx[te])
            if heads is not None:
                heads[(f, l2)] = head
        progress(step + 1, len(l2_grid))
    return out
