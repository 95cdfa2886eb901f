"""Open-set scores: how unlike a version's training images an image is (issue 15). numpy only.

    fit_ood(features, labels, max_index=..., seed=...) -> OodIndex      at training
    OodIndex.score(features) -> (N,) float                             at predict: higher = less familiar
    index.threshold, index.threshold_for(fraction)                     ood = score > threshold
    index.to_dict() / OodIndex.from_dict(d)                            plain numpy arrays and numbers

The score is the cosine distance from an image's features to its k-th nearest neighbour among
at most `max_index` training images (their first `dims` features, L2-normalised, kept as int8
with one scale per vector). Chosen by measurement (bench/ood.py: cats vs dogs against ImageNet
photos of other things, EfficientNet-Lite0 INT8 features): k = 5 on the average-pooled half of
the avgmax features, AUROC 0.9998 on photos/test and 0.9999 in 5-fold CV, 1.0% of cats and dogs
and 99.4-100% of the others flagged (k = 1: as good, but flags 4% of cat photos from another
source). With the max-pooled half, with PCA, Mahalanobis on principal components or label
prototypes it separates worse; a per-label Mahalanobis distance (shrunk shared covariance) is
as good here but stores dims^2 floats and assumes one Gaussian per label; the head's max
softmax probability, today's only signal, reaches AUROC 0.92 and flags 0-3% of the others.

The index is a per-label water-filled random sample: every label gets an equal share of
max_index, a label with fewer images keeps them all and leaves the rest to the others. The
threshold is the (1 - flagged_fraction) quantile of the training images' leave-one-out scores
(an image is never its own neighbour; with `groups`, nor is any near-duplicate of it), or of
`held_out` images' scores, on at most `max_calibration` of them; 1001 quantiles of those scores
are kept, so the threshold can be moved later (`threshold_for`) without the training features.

Bounds, whatever the number N of training images: the index holds at most max_index x dims int8
values (+ 4 bytes a vector; 2.6 MB at 2048 x 1280), 4x that as float32 in memory while serving;
scoring costs max_index x dims multiply-adds per image; fitting costs min(N, max_calibration) x
max_index x dims multiply-adds and, beyond the caller's (N, D) features, O(max_index x dims) memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FORMAT = 1  # bumped when to_dict changes incompatibly
QUANTILE_GRID = np.linspace(0.0, 1.0, 1001)  # training-score quantiles kept: every 0.1%
MAX_DISTANCE = 2.0  # cosine distance of opposite vectors: the score of an image with no neighbour
_CHUNK = 1024  # rows scored at once while fitting (memory: _CHUNK x max_index float32)


@dataclass
class OodIndex:
    codes: np.ndarray  # (M, dims) int8: the training sample's unit vectors / scales, rounded
    scales: np.ndarray  # (M,) float32, one per vector
    k: int  # the k-th nearest neighbour's distance is the score
    dims: int  # only the first `dims` feature columns are used (the average-pooled part of avgmax)
    threshold: float  # ood = score > threshold
    flagged_fraction: float  # share of the training images whose score exceeds `threshold`
    quantiles: np.ndarray  # (len(QUANTILE_GRID),) float32: of the training images' leave-one-out (or held-out) scores
    n_train: int  # training images the index was chosen from
    vectors: np.ndarray = field(init=False, repr=False)  # (M, dims) float32 unit rows, decoded once: what score multiplies

    def __post_init__(self):
        self.vectors = _dequantise(self.codes, self.scales)

    def score(self, features: np.ndarray) -> np.ndarray:
        """(N, D) features as the version computes them -> (N,) float32 scores in [0, 2]."""
        x = _unit(np.asarray(features, dtype=np.float32)[:, : self.dims])
        return _kth_distance(x @ self.vectors.T, self.k)

    def threshold_for(self, flagged_fraction: float) -> float:
        """The score above which `flagged_fraction` (0..1) of the training images lie."""
        if not 0.0 <= flagged_fraction <= 1.0:
            raise ValueError(f"flagged_fraction must be 0..1, got {flagged_fraction}")
        return float(np.interp(1.0 - flagged_fraction, QUANTILE_GRID, self.quantiles))

    def with_flagged_fraction(self, flagged_fraction: float) -> "OodIndex":
        return OodIndex(self.codes, self.scales, self.k, self.dims, self.threshold_for(flagged_fraction), float(flagged_fraction),
                        self.quantiles, self.n_train)

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays to_dict stores."""
        return sum(v.nbytes for v in self.to_dict().values() if isinstance(v, np.ndarray))

    def to_dict(self) -> dict:
        return {"format": FORMAT, "method": "knn_cosine", "codes": self.codes, "scales": self.scales, "k": self.k, "dims": self.dims,
                "threshold": self.threshold, "flagged_fraction": self.flagged_fraction, "quantiles": self.quantiles, "n_train": self.n_train}

    @classmethod
    def from_dict(cls, d: dict) -> "OodIndex":
        if d.get("format") != FORMAT or d.get("method") != "knn_cosine":
            raise ValueError(f"unsupported OOD index (format {d.get('format')!r}, method {d.get('method')!r})")
        return cls(np.asarray(d["codes"], dtype=np.int8), np.asarray(d["scales"], dtype=np.float32), int(d["k"]), int(d["dims"]),
                   float(d["threshold"]), float(d["flagged_fraction"]), np.asarray(d["quantiles"], dtype=np.float32), int(d["n_train"]))


def fit_ood(features: np.ndarray, labels, *, max_index: int = 2048, seed: int = 0, flagged_fraction: float = 0.01,
            k: int = 5, dims: int | None = None, groups: np.ndarray | None = None, held_out: np.ndarray | None = None,
            max_calibration: int = 16384, rows: np.ndarray | None = None, should_stop=lambda: None) -> OodIndex:
    """The index of at most max_index training vectors and its threshold (see the module docstring).

    features (N, D) as the version computes them; labels (N,) any hashable values; dims: use the
    first dims columns (None: all; for avgmax pooling pass D // 2, the average-pooled half);
    groups (N,) ints: near-duplicate groups, kept out of each other's leave-one-out scores;
    held_out (H, D): features of images the model never trained on (a fine-tuned network's
    validation split, whose training images' features it has fitted): their scores set the
    threshold instead of the leave-one-out ones. rows: use only these rows of features, labels
    and groups (no copy of the features is made); should_stop is called every _CHUNK scored rows.
    """
    features = np.asarray(features)
    if rows is not None:  # positions into the subset; `at` maps them to rows of `features`
        at = np.asarray(rows, dtype=np.int64)
        labels = np.asarray(labels)[at]
        groups = None if groups is None else np.asarray(groups)[at]
    else:
        at = None
    n = len(features) if at is None else len(at)
    if n < 2 or (held_out is not None and len(held_out) == 0):
        raise ValueError("need at least 2 training images (and 1 held-out image, when held_out is given)")
    dims = int(dims or features.shape[1])
    rng = np.random.default_rng(seed)
    members = _water_filled_sample(np.asarray(labels), max_index, rng)
    codes, scales = _quantise(_unit(np.asarray(features[members if at is None else at[members], :dims], dtype=np.float32)))
    k = max(1, min(int(k), len(members) - 1))  # a tiny dataset: the farthest neighbour there is
    vectors = _dequantise(codes, scales)
    source = features if held_out is None else np.asarray(held_out)
    groups = np.arange(n) if groups is None else np.asarray(groups)
    n_source = n if held_out is None else len(source)
    calib = np.sort(rng.permutation(n_source)[:max_calibration]) if n_source > max_calibration else np.arange(n_source)
    scores = np.empty(len(calib), np.float32)
    for start in range(0, len(calib), _CHUNK):
        should_stop()
        rows = calib[start : start + _CHUNK]
        picked = rows if at is None or held_out is not None else at[rows]
        sims = _unit(np.asarray(source[picked, :dims], dtype=np.float32)) @ vectors.T
        if held_out is None:
            sims[groups[rows][:, None] == groups[members][None, :]] = -np.inf  # itself and its near-duplicates
        scores[start : start + len(rows)] = _kth_distance(sims, k)
    quantiles = np.quantile(np.minimum(scores, MAX_DISTANCE), QUANTILE_GRID).astype(np.float32)
    index = OodIndex(codes, scales, k, dims, 0.0, 0.0, quantiles, n)
    return index.with_flagged_fraction(flagged_fraction)


def _water_filled_sample(labels: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted row indices: an equal share of `cap` per label, what a small label leaves to the others."""
    by_label = [rng.permutation(np.flatnonzero(labels == v)) for v in np.unique(labels)]
    take, left = [0] * len(by_label), cap
    for j, i in enumerate(np.argsort([len(b) for b in by_label], kind="stable")):  # smallest label first
        take[i] = min(len(by_label[i]), left // (len(by_label) - j))
        left -= take[i]
    return np.sort(np.concatenate([b[:t] for b, t in zip(by_label, take)]))


def _kth_distance(sims: np.ndarray, k: int) -> np.ndarray:
    """1 - the k-th largest similarity per row (MAX_DISTANCE where fewer than k are usable)."""
    if sims.shape[1] < k:
        return np.full(len(sims), MAX_DISTANCE, np.float32)
    kth = sims.max(axis=1) if k == 1 else np.partition(sims, sims.shape[1] - k, axis=1)[:, sims.shape[1] - k]
    return np.minimum(1.0 - kth, MAX_DISTANCE).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _quantise(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows -> (int8 rows, float32 scale per row): v ~ q * scale."""
    scale = np.maximum(np.abs(v).max(axis=1), 1e-12).astype(np.float32) / 127.0
    return np.round(v / scale[:, None]).astype(np.int8), scale


def _dequantise(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(_unit(q.astype(np.float32) * scale[:, None]))
