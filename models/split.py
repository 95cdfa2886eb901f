"""Validation split and cross-validation folds that keep near-duplicates together.

Two photos of the same scene (a resized copy, a re-encode, a burst shot) in train and in
validation make validation accuracy a memory test. Samples are first grouped by identical
sha256 or perceptual hashes within `max_distance` bits; whole groups are then dealt to folds
so that every fold gets its share of every label (stratified), reproducibly from the seed.
"""

from __future__ import annotations

import numpy as np

NEAR_DUPLICATE_BITS = 6  # pHash Hamming distance at or below which two images are one group


MAX_NEAR_DUPLICATE_BITS = 16  # beyond this, pHashes of unrelated photos start to match
_BLOCK = 128  # rows of the distance scan at a time: bounds its memory (128 x n x 9 bytes)


def near_duplicate_components(phashes: list[str | None], max_distance: int = NEAR_DUPLICATE_BITS
                              ) -> tuple[np.ndarray, np.ndarray]:
    """For each image, its component's root (the smallest index linked to it by a chain of
    pHashes within max_distance bits; itself when none) and its distance to its closest other
    image (64 when none is within max_distance).

    Exact: every pair is compared, as 64-bit XOR-popcounts in blocks of rows over the upper
    triangle, and the matches of a block are merged into the components at once, vectorized, so
    memory is bounded by the block (not by the number of matching pairs) and no Python work is
    done per pair. 20,000 images take about 0.7 s and 50 MB (bench/near_duplicates.py)."""
    if not 0 <= max_distance <= MAX_NEAR_DUPLICATE_BITS:
        raise ValueError(f"max_distance must be 0..{MAX_NEAR_DUPLICATE_BITS}")
    n = len(phashes)
    parent = np.arange(n, dtype=np.int64)
    closest = np.full(n, 64, dtype=np.int64)
    have = np.array([i for i, h in enumerate(phashes) if h], dtype=np.int64)
    if len(have) < 2:
        return parent, closest
    bits = np.array([int(phashes[i], 16) for i in have], dtype=np.uint64)
    m = len(bits)
    xor = np.empty((_BLOCK, m), dtype=np.uint64)
    count = np.empty((_BLOCK, m), dtype=np.uint8)
    for start in range(0, m, _BLOCK):
        stop = min(start + _BLOCK, m)
        rows, width = stop - start, m - start
        x = np.bitwise_xor(bits[start:stop, None], bits[None, start:], out=xor[:rows, :width])
        c = np.bitwise_count(x, out=count[:rows, :width])
        r, col = np.nonzero(c <= max_distance)
        upper = col > r  # the upper triangle: each pair once, never an image with itself
        a, b = have[r[upper] + start], have[col[upper] + start]
        if len(a):
            d = c[r[upper], col[upper]].astype(np.int64)
            np.minimum.at(closest, a, d)
            np.minimum.at(closest, b, d)
            _union(parent, a, b)
    return _roots(parent), closest


def _roots(parent: np.ndarray) -> np.ndarray:
    """Point every index at its root (pointer jumping until nothing moves)."""
    while True:
        up = parent[parent]
        if np.array_equal(up, parent):
            return parent
        parent[:] = up


def _union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Merge the components of every (a[k], b[k]), vectorized: the larger root points at the smaller."""
    while True:
        ra, rb = _roots(parent)[a], parent[b]
        differ = ra != rb
        if not differ.any():
            return
        lo, hi = np.minimum(ra[differ], rb[differ]), np.maximum(ra[differ], rb[differ])
        np.minimum.at(parent, hi, lo)


def near_duplicate_groups(sha256s: list[str], phashes: list[str | None], max_distance: int = NEAR_DUPLICATE_BITS) -> np.ndarray:
    """Group id (0..G-1) per sample: union of same-sha256 and pHash-close pairs."""
    roots, _ = near_duplicate_components(phashes, max_distance)
    first: dict[str, int] = {}
    same = np.array([first.setdefault(s, i) for i, s in enumerate(sha256s)], dtype=np.int64)
    _union(roots, np.arange(len(sha256s), dtype=np.int64), same)
    return np.unique(_roots(roots), return_inverse=True)[1]


def _deal(y: np.ndarray, groups: np.ndarray, fractions: list[float], seed: int) -> np.ndarray:
    """Fold id per sample; groups go, largest first, to the fold that lacks their label most."""
    rng = np.random.default_rng(seed)
    n_labels = int(y.max()) + 1
    target = np.outer(fractions, np.bincount(y, minlength=n_labels))  # (folds, labels) wanted counts
    have = np.zeros_like(target)
    by_group = np.argsort(groups, kind="stable")
    members = np.split(by_group, np.flatnonzero(np.diff(groups[by_group])) + 1)
    shuffled = [members[i] for i in rng.permutation(len(members))]
    fold = np.empty(len(y), dtype=np.int64)
    for idx in sorted(shuffled, key=len, reverse=True):  # stable sort: random order within a size
        label = np.bincount(y[idx], minlength=n_labels).argmax()  # a group's majority label
        deficit = (target[:, label] - have[:, label]) / np.maximum(target[:, label], 1e-9)
        best = np.flatnonzero(deficit == deficit.max())
        f = int(best[rng.integers(len(best))])
        fold[idx] = f
        have[f] += np.bincount(y[idx], minlength=n_labels)
    return fold


def train_val_split(y: np.ndarray, groups: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, group-aware split -> (train indices, validation indices), both sorted."""
    if val_fraction <= 0:
        return np.arange(len(y)), np.zeros(0, dtype=np.int64)
    fold = _deal(np.asarray(y), np.asarray(groups), [1 - val_fraction, val_fraction], seed)
    return np.flatnonzero(fold == 0), np.flatnonzero(fold == 1)


def kfold(y: np.ndarray, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold id 0..k-1 per sample, stratified and group-aware."""
    return _deal(np.asarray(y), np.asarray(groups), [1.0 / k] * k, seed)
