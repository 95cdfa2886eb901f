"""Validation split and cross-validation folds that keep near-duplicates together.

Two photos of the same scene (a resized copy, a re-encode, a burst shot) in train and in
validation make validation accuracy a memory test. Samples are first grouped by identical
sha256 or perceptual hashes within `max_distance` bits; whole groups are then dealt to folds
so that every fold gets its share of every label (stratified), reproducibly from the seed.
"""

from __future__ import annotations

import itertools

import numpy as np

NEAR_DUPLICATE_BITS = 6  # pHash Hamming distance at or below which two images are one group


MAX_NEAR_DUPLICATE_BITS = 16  # beyond this, pHashes of unrelated photos start to match
_BLOCK, _TILE = 128, 4096  # the distance scan's tile of pairs (_TILE >= _BLOCK): 5 MB of memory
_CHUNK = 1 << 19  # matches buffered before a merge into the components
_RUN = 1024  # an equal-key run longer than this is block-scanned rather than stepped through
_TAIL = 256  # steps through the runs while this many positions are in one; then all at once
_SCAN_RATIO = 0.1  # a candidate pair costs about 10 scanned ones: past this share, scan instead
# Multi-index hashing, by max_distance: (n, t), from n distinct hashes on, with t. The 64 bits are
# cut into max_distance + t bands; a pair within max_distance bits differs in at most max_distance
# of them, so it agrees exactly on t at least (pigeonhole). The sizes from which it beats the
# block scan were measured on CIFAR-10 and random pHashes (bench/near_duplicates.py); beyond 10
# bits it never does (bands of 4-5 bits match too often). At 0 bits distinct hashes never match.
_BANDS: tuple[tuple[tuple[int, int], ...], ...] = (
    (), ((1000, 1),), ((1000, 1),), ((1000, 1),), ((1000, 1),), ((1000, 1),),
    ((1500, 1), (120000, 2)), ((6000, 2),), ((8000, 2),), ((15000, 2),), ((25000, 2),), (), (), (), (), (), ())


def near_duplicate_components(phashes: list[str | None], max_distance: int = NEAR_DUPLICATE_BITS
                              ) -> tuple[np.ndarray, np.ndarray]:
    """For each image, its component's root (the smallest index linked to it by a chain of
    pHashes within max_distance bits; itself when none) and its distance to its closest other
    image (64 when none is within max_distance).

    Exact: both results depend only on the set of pairs within max_distance bits, however they
    are found, and every one of them is. Identical hashes are collapsed first (each set of
    copies is one group at distance 0). Pairs of distinct hashes are then found by multi-index
    hashing where that is cheaper (_BANDS): the 64 bits are cut into max_distance + t bands; a
    pair within max_distance bits agrees exactly on t of them at least (pigeonhole), so for each
    choice of t bands the hashes are sorted by those bits and only pairs inside a run of equal
    keys are compared (XOR-popcounts, one step through all runs at a time; runs longer than
    _RUN by the block scan), each pair kept only under the first t bands it agrees on. Otherwise -- few
    distinct hashes, max_distance above 10, or keys so crowded that the candidates would number
    over _SCAN_RATIO of all pairs (counted first, by one sort per choice) -- every pair is
    compared by the block scan, in _BLOCK x _TILE tiles over the upper triangle. Matches are
    merged into the components in vectorized batches of about _CHUNK pairs.

    Cost, for n distinct hashes spread like pHashes: C(max_distance + t, t) x 2 sorts of n, and
    about C(max_distance + t, t) x n^2 / 2^(1 + 64 t / (max_distance + t)) candidate pairs at
    5-10 ns each (t = 1 up to 6 bits, t = 2 beyond, and at 6 bits from 120,000 hashes on); the
    scan is n^2 / 2 pairs at about 1 ns. 50,000 CIFAR-10 pHashes at the default 6 bits: about
    0.14 s, against 3.5-4.5 s for the scan as it was (bench/near_duplicates.py). Memory: O(n),
    about 150 bytes per hash, plus at most about 100 MB for a tile, a tail of candidates and a
    batch of matches, however many pairs match."""
    return _components(phashes, max_distance, "auto")


def _components(phashes: list[str | None], max_distance: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """near_duplicate_components; method "scan" compares every pair of hashes (the block scan
    alone, as before multi-index hashing), "auto" chooses."""
    if not 0 <= max_distance <= MAX_NEAR_DUPLICATE_BITS:
        raise ValueError(f"max_distance must be 0..{MAX_NEAR_DUPLICATE_BITS}")
    n = len(phashes)
    parent = np.arange(n, dtype=np.int64)
    closest = np.full(n, 64, dtype=np.int64)
    have = np.array([i for i, h in enumerate(phashes) if h], dtype=np.int64)
    if len(have) < 2:
        return parent, closest
    bits = np.array([int(phashes[i], 16) for i in have], dtype=np.uint64)
    if method == "scan":
        _merge(_scan_pairs(bits, None, max_distance), parent, closest, have)
        return _roots(parent), closest
    # distinct hashes numbered by first appearance, so that the smallest number in a component
    # is also its smallest image index
    values, first, inverse, counts = np.unique(bits, return_index=True, return_inverse=True, return_counts=True)
    by_first = np.argsort(first)
    rank = np.empty_like(by_first)
    rank[by_first] = np.arange(len(by_first))
    values, first, inverse = values[by_first], first[by_first], rank[inverse.reshape(-1)]
    u_parent = np.arange(len(values), dtype=np.int64)
    u_closest = np.where(counts[by_first] > 1, 0, 64).astype(np.int64)
    _merge(_close_pairs(values, max_distance), u_parent, u_closest, None)
    parent[have] = have[first[_roots(u_parent)[inverse]]]
    closest[have] = u_closest[inverse]
    return parent, closest


def _merge(pairs, parent: np.ndarray, closest: np.ndarray, index: np.ndarray | None) -> None:
    """Fold (a, b, distance) batches into parent and closest (as index[a], index[b] unless index
    is None), buffering small batches so that each union pass covers _CHUNK pairs or so."""
    buffered: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    size = 0

    def flush() -> None:
        a, b, d = buffered[0] if len(buffered) == 1 else (np.concatenate(x) for x in zip(*buffered))
        buffered.clear()
        if index is not None:
            a, b = index[a], index[b]
        d = d.astype(np.int64)  # ufunc.at is only fast without casting
        np.minimum.at(closest, a, d)
        np.minimum.at(closest, b, d)
        _union(parent, a, b)

    for a, b, d in pairs:
        if len(a):
            buffered.append((a, b, d))
            size += len(a)
            if size >= _CHUNK:
                flush()
                size = 0
    if buffered:
        flush()


def _band_masks(bands: int) -> list[np.uint64]:
    """Masks of 64 bits cut into `bands` contiguous bands, widths differing by one at most."""
    widths = [64 // bands + (j < 64 % bands) for j in range(bands)]
    offsets = np.cumsum([0] + widths[:-1])
    return [np.uint64(((1 << w) - 1) << int(o)) for w, o in zip(widths, offsets)]


def _close_pairs(values: np.ndarray, max_distance: int):
    """(a, b, distance) batches covering every pair of the distinct `values` within max_distance
    bits, each pair once (a != b, both indices into values)."""
    m = len(values)
    if max_distance == 0:
        return  # distinct hashes are at least one bit apart
    agree = max([t for n, t in _BANDS[max_distance] if m >= n], default=0)
    if not agree:
        yield from _scan_pairs(values, None, max_distance)
        return
    masks = _band_masks(max_distance + agree)
    combos = list(itertools.combinations(range(len(masks)), agree))
    keys = [np.bitwise_or.reduce([masks[j] for j in combo]) for combo in combos]
    budget = _SCAN_RATIO * m * (m - 1) / 2  # candidate pairs worth less than the scan
    spent = 0
    for key in keys:  # first count them (a sort per key), so that no work is wasted
        sizes = _runs(np.sort(values & key))[1]
        spent += int((sizes * (sizes - 1) // 2).sum())
        if spent > budget:  # crowded keys: comparing every pair is cheaper
            yield from _scan_pairs(values, None, max_distance)
            return
    for combo, key in zip(combos, keys):
        masked = values & key
        order = np.argsort(masked)
        starts, sizes = _runs(masked[order])
        # a pair is kept only here, under the first `agree` bands it agrees on
        skip = tuple(masks[j] for j in range(combo[-1]) if j not in combo)
        for s, size in zip(starts[sizes > _RUN].tolist(), sizes[sizes > _RUN].tolist()):
            yield from _scan_pairs(values, order[s:s + size], max_distance, skip)
        yield from _run_pairs(values, order, starts, sizes, max_distance, skip)


def _runs(ordered: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each run of equal values of a sorted array starts, and its length."""
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    return starts, np.diff(np.append(starts, len(ordered)))


def _run_pairs(values: np.ndarray, order: np.ndarray, starts: np.ndarray, sizes: np.ndarray,
               max_distance: int, skip: tuple[np.uint64, ...]):
    """The pairs within max_distance bits inside the runs order[start:start + size] of 2.._RUN
    members, as batches: every pair of a run is a candidate. Position p (in order) is compared
    with p + 1, then p + 2, ... while both are in its run, one step for all runs at once; the
    last few positions of the longest runs, once fewer than _TAIL remain, in one expansion."""
    m = len(order)
    end = np.where(sizes <= _RUN, starts + sizes, 0)  # runs block-scanned instead: no pairs here
    rem = np.maximum(np.repeat(end, sizes) - np.arange(m) - 1, 0)  # members after p in its run
    if not rem.any():
        return
    by_rem = np.argsort(-rem, kind="stable")[:np.count_nonzero(rem)]  # active at step k: a prefix
    active = np.cumsum(np.bincount(rem)[::-1])[::-1]  # active[k]: how many have rem >= k
    sorted_values = values[order]
    base = sorted_values[by_rem]
    step = 1
    while step < len(active) and active[step] >= _TAIL:
        p = by_rem[:active[step]]
        x = base[:len(p)] ^ sorted_values[p + step]
        c = np.bitwise_count(x)
        hit = np.flatnonzero(c <= max_distance)
        if len(hit):
            yield _first_time(order[p[hit]], order[p[hit] + step], x[hit], c[hit], skip)
        step += 1
    if step < len(active):  # under _TAIL positions left, with at most _RUN steps each
        p = by_rem[:active[step]]
        todo = rem[p] - step + 1
        a_pos = np.repeat(p, todo)
        b_pos = a_pos + step + np.arange(len(a_pos)) - np.repeat(np.cumsum(todo) - todo, todo)
        x = sorted_values[a_pos] ^ sorted_values[b_pos]
        c = np.bitwise_count(x)
        hit = np.flatnonzero(c <= max_distance)
        if len(hit):
            yield _first_time(order[a_pos[hit]], order[b_pos[hit]], x[hit], c[hit], skip)


def _first_time(a: np.ndarray, b: np.ndarray, x: np.ndarray, c: np.ndarray, skip: tuple[np.uint64, ...]):
    """The pairs (XOR x) that differ in every band of skip: those not found under earlier bands."""
    if skip and len(a):
        keep = np.ones(len(a), dtype=bool)
        for mask in skip:
            keep &= (x & mask) != 0
        a, b, c = a[keep], b[keep], c[keep]
    return a, b, c


def _scan_pairs(values: np.ndarray, index: np.ndarray | None, max_distance: int, skip: tuple[np.uint64, ...] = ()):
    """The block scan: every pair of values[index] compared, in _BLOCK x _TILE tiles over the upper
    triangle; the pairs within max_distance bits as batches of (index[i], index[j], distance),
    less those that agree on a band of skip."""
    v = values if index is None else values[index]
    m = len(v)
    size = min(_BLOCK, m) * min(_TILE, m)
    xor, count, near = np.empty(size, dtype=np.uint64), np.empty(size, dtype=np.uint8), np.empty(size, dtype=bool)
    for start in range(0, m, _BLOCK):
        stop = min(start + _BLOCK, m)
        for left in range(start, m, _TILE):
            right = min(left + _TILE, m)
            shape = (stop - start, right - left)
            x = np.bitwise_xor(v[start:stop, None], v[None, left:right], out=xor[:shape[0] * shape[1]].reshape(shape))
            c = np.bitwise_count(x, out=count[:x.size].reshape(shape))
            flat = np.flatnonzero(np.less_equal(c, max_distance, out=near[:x.size].reshape(shape)))
            r = flat // shape[1]
            col = flat - r * shape[1]
            if left == start:  # the upper triangle: each pair once, never an image with itself
                upper = col > r
                flat, r, col = flat[upper], r[upper], col[upper]
            if len(flat):
                a, b, d = r + start, col + left, c.reshape(-1)[flat]
                if index is not None:
                    a, b = index[a], index[b]
                yield _first_time(a, b, x.reshape(-1)[flat], d, skip) if skip else (a, b, d)


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
