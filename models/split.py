"""Validation split and cross-validation folds that keep near-duplicates together.

Two photos of the same scene (a resized copy, a re-encode, a burst shot) in train and in
validation make validation accuracy a memory test. Samples are first grouped by identical
sha256 or perceptual hashes within `max_distance` bits; whole groups are then dealt to folds
so that every fold gets its share of every label (stratified), reproducibly from the seed.
"""

from __future__ import annotations

import numpy as np

NEAR_DUPLICATE_BITS = 6  # pHash Hamming distance at or below which two images are one group


def _find(parent: np.ndarray, i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def near_duplicate_pairs(phashes: list[str | None], max_distance: int = NEAR_DUPLICATE_BITS) -> list[tuple[int, int, int]]:
    """(i, j, distance) for every pair i < j whose pHashes differ in at most max_distance bits."""
    have = np.array([i for i, h in enumerate(phashes) if h], dtype=np.int64)
    pairs: list[tuple[int, int, int]] = []
    if len(have) < 2:
        return pairs
    bits = np.array([int(phashes[i], 16) for i in have], dtype=np.uint64)
    for start in range(0, len(bits), 512):  # 512 x n XOR-popcounts at a time
        dist = np.bitwise_count(bits[start : start + 512, None] ^ bits[None, :])
        rows, cols = np.nonzero(dist <= max_distance)
        for r, c in zip(rows, cols):
            if r + start < c:
                pairs.append((int(have[r + start]), int(have[c]), int(dist[r, c])))
    return pairs


def near_duplicate_groups(sha256s: list[str], phashes: list[str | None], max_distance: int = NEAR_DUPLICATE_BITS) -> np.ndarray:
    """Group id (0..G-1) per sample: union of same-sha256 and pHash-close pairs."""
    n = len(sha256s)
    parent = np.arange(n)

    def union(a: int, b: int) -> None:
        ra, rb = _find(parent, a), _find(parent, b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    first: dict[str, int] = {}
    for i, s in enumerate(sha256s):
        union(i, first.setdefault(s, i))
    for a, b, _ in near_duplicate_pairs(phashes, max_distance):
        union(a, b)
    roots = np.array([_find(parent, i) for i in range(n)])
    return np.unique(roots, return_inverse=True)[1]


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
