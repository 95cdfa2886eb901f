"""Likely label errors: the images whose given label held-out predictions contradict (issue 15). numpy only.

    suspects = first_pass(oof_probs, labels)          (N,) bool: leave these out of a second CV
    find_label_issues(oof_probs_2, labels) -> [(index, suggested_label_index, score), ...]

Inputs are what a linear training already has: `oof_probs` (N, K), each row predicted by a head
that never saw that image (the out-of-fold logits of the train split at the chosen l2, and the
train-split head's logits for the validation split, softmaxed with the fitted temperature), the
given labels (N,) as label indices, and optionally the frozen features (N, D) for a nearest-
neighbour vote (pass `dims=D // 2` for avgmax features: the average-pooled half, as models.ood).

METHOD (the default, chosen by bench/label_issues.py; see the figures there and below):
  two passes of confident learning, the second ranking by margin. Pass 1: `first_pass` (confident
  learning, prune by noise rate) on the training's held-out probabilities names the suspects.
  Pass 2 (the training, with torch: one more cross-validation at the chosen l2, same split and
  folds): every head is refitted without the suspects, which are still predicted, the temperature
  refitted on the rows kept; then `find_label_issues` (margin_at_count) flags the n_est images with
  the largest margin, n_est = confident learning's estimate of the number of errors, recomputed on
  the second-pass probabilities. The suspects no longer pull the heads towards their wrong labels,
  so the second pass separates flips from hard images better.
  Measured (bench/label_issues.py; photos/train, 1,200 photos, 30 labels of each kind flipped, 20
  seeds; EfficientNet-Lite0 INT8 288 px avgmax features, the linear head's held-out probabilities as
  models.train computes them): recall 0.978 (worst seed 0.950), precision 0.937 (worst 0.906), 1
  image flagged on the clean labels. One pass: out-of-fold disagreement 0.988 (0.950) / 0.798
  (0.728); confident learning 0.953 (0.867) / 0.919 (0.855); self-confidence or margin at its count
  0.956 (0.867) / 0.922 (0.855); the k-NN vote (k = 10..20, cosine, average-pooled half) 0.93 /
  0.45-0.52 alone, and with the head (both must disagree) 0.93 (0.83) / 0.89 (0.83): on these
  features the neighbours add little, so the default needs no features.

The rules, each a function of the held-out probabilities P, the neighbours' label shares V (the
share of an image's k nearest other images, by cosine similarity of L2-normalised features, that
carry each label) and the given label y:
  disagreement        argmax P != y (here and below: another label strictly more probable; a tie is no disagreement)
  confident_learning  Northcutt et al. 2021: per-label thresholds t_j = mean P[:, j] over the images
                      labelled j; the confident joint counts (given i, likely j) for P[:, j] >= t_j,
                      calibrated to the label counts; for each (i, j) off the diagonal the C[i, j]
                      images labelled i with the largest margin P[:, j] - P[:, i] ("prune by noise
                      rate"), and only where argmax P != y
  self_confidence     the n_est images with the lowest P[:, y], n_est = the calibrated joint's
                      off-diagonal total (confident learning's estimate of the number of errors)
  margin_at_count     the n_est images with the largest margin max_{j != y} P[:, j] - P[:, y]
  knn                 argmax V != y (a majority of the k neighbours carry another label)
  oof_and_knn         both argmax P != y and argmax V != y
  blend               argmax (P + V) / 2 != y
  blend_at_count      the n_est images with the lowest (P + V)[:, y] / 2
Scores are 1 - Q[:, y] with Q the distribution the rule decides on (P, V or (P + V) / 2; for
oof_and_knn the mean of both rules' scores): in [0, 1], higher = more likely wrong; the suggested
label is argmax over j != y of Q[:, j].

Bounds, for N images, K labels and D feature columns: the neighbour search compares every image
with at most `max_reference` reference images (all of them up to that many; beyond, a per-label
water-filled random sample, as models.ood's index), in blocks of at most 2^24 similarities (64 MB)
at a time: N x min(N, max_reference) x dims multiply-adds and, beyond the caller's arrays,
min(N, max_reference) x dims float32 for the unit reference rows + 64 MB + N x k int32 / float32.
Measured on AMD EPYC (2 cores, AVX-512, numpy's BLAS): at N = 50,000 x 1280 the exact search (all
50,000 as reference, 3.2 T multiply-adds) takes 42-51 s (two runs), capped at the default 16,384 reference rows
13 s and 144 MB beyond the caller's features; the default rule needs no neighbours at all, and every
rule costs O(N K) (< 0.1 s at 50,000).
"""

from __future__ import annotations

import numpy as np

from .ood import _unit, _water_filled_sample

METHODS = ("disagreement", "confident_learning", "self_confidence", "margin_at_count", "knn", "oof_and_knn", "blend", "blend_at_count")
DEFAULT_METHOD = "margin_at_count"
DEFAULT_K = 15  # neighbours in the vote
MAX_REFERENCE = 16384  # reference images for the neighbour search, at most (bounds its time and memory)
_BLOCK_FLOATS = 1 << 24  # similarities computed at once (64 MB of float32)


def find_label_issues(oof_probs: np.ndarray, labels: np.ndarray, features: np.ndarray | None = None, *, method: str | None = None,
                      k: int = DEFAULT_K, dims: int | None = None, max_reference: int = MAX_REFERENCE, seed: int = 0,
                      neighbours: np.ndarray | None = None) -> list[tuple[int, int, float]]:
    """The images whose label is likely wrong, most likely first: (row index, suggested label index, score in [0, 1]).

    oof_probs (N, K) held-out probabilities (rows sum to 1); labels (N,) ints 0..K-1; features
    (N, D) or None (then the rules that need neighbours fall back: knn and oof_and_knn -> confident
    learning, blend -> disagreement, blend_at_count -> margin_at_count); method: one of METHODS
    (None: DEFAULT_METHOD); k, dims, max_reference, seed: the neighbour search (see
    nearest_neighbours); neighbours: (N, >= k) indices from an earlier nearest_neighbours call,
    instead of features."""
    P = np.asarray(oof_probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if P.ndim != 2 or len(P) != len(y):
        raise ValueError(f"oof_probs must be (N, K) with N = len(labels), got {P.shape} and {y.shape}")
    n, num_classes = P.shape
    if n == 0:
        return []
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must be 0..{num_classes - 1}")
    method = method or DEFAULT_METHOD
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of {METHODS}")
    V = None
    if method in ("knn", "oof_and_knn", "blend", "blend_at_count"):
        if neighbours is None and features is not None and n >= 2:
            neighbours = nearest_neighbours(features, k, dims=dims, max_reference=max_reference, seed=seed)[0]
        if neighbours is not None:
            V = neighbour_label_shares(neighbours[:, :k], y, num_classes)
        else:
            method = {"knn": "confident_learning", "oof_and_knn": "confident_learning", "blend": "disagreement",
                      "blend_at_count": "margin_at_count"}[method]
    flagged, Q = _rule(method, P, y, V)
    score = 1.0 - Q[np.arange(n), y]
    if method == "oof_and_knn":
        score = 0.5 * ((1.0 - P[np.arange(n), y]) + (1.0 - V[np.arange(n), y]))
    others = Q.copy()
    others[np.arange(n), y] = -np.inf
    suggested = others.argmax(1)
    idx = np.flatnonzero(flagged)
    order = idx[np.lexsort((idx, -score[idx]))]  # highest score first, ties by index
    return [(int(i), int(suggested[i]), float(np.clip(score[i], 0.0, 1.0))) for i in order]


def first_pass(oof_probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N,) bool: the suspects to leave out of every head of the second cross-validation (see
    METHOD): confident learning's issues on the first held-out probabilities."""
    return prune_by_noise_rate(np.asarray(oof_probs, dtype=np.float64), np.asarray(labels, dtype=np.int64))


def rule_flags(method: str, oof_probs: np.ndarray, labels: np.ndarray, shares: np.ndarray | None = None) -> np.ndarray:
    """(N,) bool: what `method` flags, from the held-out probabilities and (for the neighbour rules)
    the neighbours' label shares (neighbour_label_shares). For benches that compare the rules."""
    return _rule(method, np.asarray(oof_probs, dtype=np.float64), np.asarray(labels, dtype=np.int64), shares)[0]


def _rule(method: str, P: np.ndarray, y: np.ndarray, V: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    n = len(y)
    rows = np.arange(n)
    if method == "disagreement":
        return _disagrees(P, y), P
    if method == "confident_learning":
        return prune_by_noise_rate(P, y), P
    if method in ("self_confidence", "margin_at_count"):
        count = estimated_issue_count(P, y)
        key = P[rows, y] if method == "self_confidence" else -margin(P, y)
        return _lowest(key, count), P
    if V is None:
        raise ValueError(f"{method} needs the neighbours' label shares")
    if method == "knn":
        return _disagrees(V, y), V
    if method == "oof_and_knn":
        return _disagrees(P, y) & _disagrees(V, y), (P + V) / 2
    B = (P + V) / 2
    if method == "blend":
        return _disagrees(B, y), B
    if method == "blend_at_count":
        return _lowest(B[rows, y], estimated_issue_count(P, y)), B
    raise ValueError(f"unknown method {method!r}")


def _disagrees(Q: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(N,) bool: another label has strictly more of Q than the given one (a tied vote is no disagreement)."""
    return margin(Q, y) > 1e-12


def _lowest(key: np.ndarray, count: int) -> np.ndarray:
    """(N,) bool: the `count` rows with the lowest key (ties by index)."""
    out = np.zeros(len(key), bool)
    if count > 0:
        out[np.lexsort((np.arange(len(key)), key))[:count]] = True
    return out


def margin(P: np.ndarray, y: np.ndarray) -> np.ndarray:
    """max over j != y of P[:, j], minus P[:, y]: > 0 where another label is more probable."""
    others = np.array(P, dtype=np.float64, copy=True)
    others[np.arange(len(y)), y] = -np.inf
    return others.max(1) - P[np.arange(len(y)), y]


def confident_joint(P: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(K, K) float: the calibrated confident joint, rows = given label, columns = likely true label;
    row i sums to the number of images labelled i (where any of them is counted)."""
    P, y = np.asarray(P, dtype=np.float64), np.asarray(y, dtype=np.int64)
    num_classes = P.shape[1]
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    thresholds = np.array([P[y == j, j].mean() if counts[j] else 1.0 for j in range(num_classes)])
    above = P >= thresholds[None, :] - 1e-12
    masked = np.where(above, P, -np.inf)
    likely = masked.argmax(1)
    counted = above.any(1)
    C = np.zeros((num_classes, num_classes))
    np.add.at(C, (y[counted], likely[counted]), 1.0)
    row = C.sum(1, keepdims=True)
    return np.where(row > 0, C / np.maximum(row, 1e-12) * counts[:, None], 0.0)


def estimated_issue_count(P: np.ndarray, y: np.ndarray) -> int:
    """Confident learning's estimate of the number of mislabelled images (the calibrated joint off its diagonal)."""
    C = np.rint(confident_joint(P, y))
    return int(C.sum() - np.trace(C))


def prune_by_noise_rate(P: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(N,) bool: confident learning's issues (prune by noise rate, then keep only argmax P != y)."""
    C = np.rint(confident_joint(P, y)).astype(np.int64)
    flagged = np.zeros(len(y), bool)
    for i in range(C.shape[0]):
        members = np.flatnonzero(y == i)
        for j in range(C.shape[1]):
            if i == j or C[i, j] <= 0 or not len(members):
                continue
            m = P[members, j] - P[members, i]
            flagged[members[np.lexsort((members, -m))[: C[i, j]]]] = True
    return flagged & _disagrees(P, y)


def neighbour_label_shares(neighbours: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, K): the share of each row's neighbours (N, k indices) that carry each label."""
    y = np.asarray(labels, dtype=np.int64)
    nb = np.asarray(neighbours)
    V = np.zeros((len(nb), num_classes))
    for j in range(nb.shape[1]):
        np.add.at(V, (np.arange(len(nb)), y[nb[:, j]]), 1.0)
    return V / max(nb.shape[1], 1)


def nearest_neighbours(features: np.ndarray, k: int = DEFAULT_K, *, dims: int | None = None, labels: np.ndarray | None = None,
                       max_reference: int = MAX_REFERENCE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(indices (N, k) int32, cosine similarities (N, k) float32) of each row's k nearest other rows,
    nearest first, by cosine similarity of the first `dims` columns (L2-normalised).

    The candidates are every row when N <= max_reference, else a random sample of max_reference rows
    (water-filled per label when `labels` is given); a row is never its own neighbour. Computed in
    blocks of at most 2^24 similarities."""
    X = np.asarray(features)
    n = len(X)
    dims = int(dims or X.shape[1])
    if n < 2:
        raise ValueError("need at least 2 rows")
    if n <= max_reference:
        ref = np.arange(n)
    elif labels is not None:
        ref = _water_filled_sample(np.asarray(labels), max_reference, np.random.default_rng(seed))
    else:
        ref = np.sort(np.random.default_rng(seed).permutation(n)[:max_reference])
    R = _unit(np.asarray(X[ref, :dims], dtype=np.float32))
    position = np.full(n, -1, np.int64)
    position[ref] = np.arange(len(ref))
    k = int(min(k, len(ref) - 1))
    out_i, out_s = np.empty((n, k), np.int32), np.empty((n, k), np.float32)
    block = max(1, min(n, _BLOCK_FLOATS // len(ref)))
    for start in range(0, n, block):
        rows = np.arange(start, min(start + block, n))
        S = _unit(np.asarray(X[rows, :dims], dtype=np.float32)) @ R.T
        own = position[rows]
        mine = own >= 0
        S[np.flatnonzero(mine), own[mine]] = -np.inf  # not its own neighbour
        top = np.argpartition(-S, k - 1, axis=1)[:, :k] if k < S.shape[1] else np.argsort(-S, axis=1)[:, :k]
        sims = np.take_along_axis(S, top, axis=1)
        order = np.argsort(-sims, axis=1, kind="stable")
        out_i[rows] = ref[np.take_along_axis(top, order, axis=1)]
        out_s[rows] = np.take_along_axis(sims, order, axis=1)
    return out_i, out_s


# --- the per-version blob (a training writes it, the API reads it: numpy only, no pickles) ----------------

HELDOUT_FORMAT = 1


def pack_heldout(image_ids: list[str], labels: list[str], y: np.ndarray, probabilities: np.ndarray,
                 issues: list[tuple[int, int, float]]) -> bytes:
    """One version's held-out predictions as a compact .npz: every image id (ASCII), the label
    names, each image's label index then, its probabilities (float16) and the flagged rows with
    their suggested label index and score. About N x (32 + 8 + 2K) bytes before compression."""
    import io

    rows = np.array([i for i, _, _ in issues], dtype=np.int32)
    buf = io.BytesIO()
    np.savez_compressed(
        buf, format=np.array([HELDOUT_FORMAT], np.int32), image_ids=np.array(image_ids, dtype="S"),
        labels=np.array(labels, dtype="S"), y=np.asarray(y, np.int32), probabilities=np.asarray(probabilities, np.float16),
        issue_rows=rows, issue_suggested=np.array([s for _, s, _ in issues], np.int32),
        issue_scores=np.array([c for _, _, c in issues], np.float32))
    return buf.getvalue()


def unpack_heldout(data: bytes) -> dict:
    """pack_heldout's arrays back (allow_pickle off: a blob can only hold arrays): image_ids and
    labels as lists of str, the rest as numpy arrays. ValueError for anything else."""
    import io

    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except Exception as e:  # a truncated or foreign blob
        raise ValueError(f"not a held-out predictions blob: {e}") from None
    if int(out.get("format", [0])[0]) != HELDOUT_FORMAT:
        raise ValueError("unknown held-out predictions format")
    out["image_ids"] = [b.decode() for b in out["image_ids"]]
    out["labels"] = [b.decode() for b in out["labels"]]
    return out
