import io

import numpy as np
import pytest
from PIL import Image

from models.images import decode_rgb, perceptual_hash
from models.split import kfold, near_duplicate_groups, train_val_split


def test_train_val_split_is_stratified_and_reproducible():
    y = np.array([0] * 72 + [1] * 137)
    groups = np.arange(len(y))
    tr, va = train_val_split(y, groups, 0.15, seed=0)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(y)
    assert abs(np.bincount(y[va])[0] - 0.15 * 72) <= 1 and abs(np.bincount(y[va])[1] - 0.15 * 137) <= 1
    tr2, va2 = train_val_split(y, groups, 0.15, seed=0)
    np.testing.assert_array_equal(va, va2)
    assert not np.array_equal(va, train_val_split(y, groups, 0.15, seed=1)[1])


def test_tiny_labels_still_get_a_validation_image():
    y = np.array([0] * 5 + [1] * 5)
    tr, va = train_val_split(y, np.arange(10), 0.15, seed=3)
    assert sorted(np.bincount(y[va]).tolist()) == [1, 1]
    assert train_val_split(y, np.arange(10), 0.0, seed=0)[1].size == 0


def test_groups_never_straddle_folds():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    groups = rng.integers(0, 120, 300)  # many multi-image groups
    for seed in range(3):
        tr, va = train_val_split(y, groups, 0.2, seed)
        assert not set(groups[tr]) & set(groups[va])
        folds = kfold(y, groups, 5, seed)
        for g in np.unique(groups):
            assert len(set(folds[groups == g])) == 1
        sizes = np.bincount(folds)
        assert sizes.min() > 30  # roughly balanced


def test_near_duplicate_groups_on_real_photos(photo_bytes):
    img = decode_rgb(photo_bytes[0])
    buf = io.BytesIO()
    img.resize((img.width // 2, img.height // 2), Image.BILINEAR).save(buf, "JPEG", quality=70)
    datas = photo_bytes[:4] + [buf.getvalue(), photo_bytes[2]]
    shas = ["a", "b", "c", "d", "e", "same-bytes-as-c"]
    shas[5] = shas[2]
    groups = near_duplicate_groups(shas, [perceptual_hash(d) for d in datas])
    assert groups[4] == groups[0]  # resized + re-encoded copy
    assert groups[5] == groups[2]  # identical bytes
    assert len({groups[0], groups[1], groups[2], groups[3]}) == 4
    # without perceptual hashes only identical bytes are grouped
    assert len(set(near_duplicate_groups(shas, [None] * 6))) == 5


def _random_hashes(n: int, seed: int, clusters: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 2**63, size=n, dtype=np.uint64)
    if clusters:  # near copies of a few centres: a few flipped bits each
        centres = values[:clusters]
        pick = rng.integers(0, clusters, size=n)
        flips = rng.integers(0, 64, size=(n, 3)).astype(np.uint64)
        values = centres[pick] ^ (np.uint64(1) << flips[:, 0]) ^ (np.uint64(1) << flips[:, 1])
    return [f"{int(v):016x}" for v in values]


@pytest.mark.parametrize("max_distance", [0, 3, 6, 16])
def test_near_duplicate_components_match_a_brute_force(max_distance):
    from models.split import near_duplicate_components

    hashes = _random_hashes(300, seed=max_distance, clusters=40) + [None, None] + _random_hashes(100, seed=7)
    roots, closest = near_duplicate_components(hashes, max_distance)
    n = len(hashes)
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    best = [64] * n
    for i in range(n):
        for j in range(i + 1, n):
            if hashes[i] and hashes[j]:
                d = bin(int(hashes[i], 16) ^ int(hashes[j], 16)).count("1")
                if d <= max_distance:
                    best[i], best[j] = min(best[i], d), min(best[j], d)
                    a, b = find(i), find(j)
                    parent[max(a, b)] = min(a, b)
    assert closest.tolist() == best
    assert roots.tolist() == [find(i) for i in range(n)]


def test_max_distance_is_capped():
    from models.config import InvalidTrainConfig, TrainConfig
    from models.split import near_duplicate_components

    with pytest.raises(ValueError):
        near_duplicate_components(["0" * 16, "0" * 16], 17)
    with pytest.raises(InvalidTrainConfig):
        TrainConfig.from_dict({"near_duplicate_bits": 32})


def test_memory_stays_bounded_when_every_pair_matches():
    """10,000 images all within a few bits of each other: 50 M matching pairs. Before: a Python
    tuple per pair (gigabytes); now the scan's blocks bound it. Run under a 1.5 GB address-space cap."""
    import subprocess
    import sys

    code = """
import resource
resource.setrlimit(resource.RLIMIT_AS, (1536 * 2**20, 1536 * 2**20))
import numpy as np
from models.split import near_duplicate_groups
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
hashes = [f"{(0xF0F0F0F0F0F0F0F0 ^ (1 << (i % 64))):016x}" for i in range(10000)]
groups = near_duplicate_groups([str(i) for i in range(10000)], hashes, 16)
assert len(set(groups.tolist())) == 1
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024)
"""
    from tests.conftest import ROOT

    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.strip()) < 200, f"grew {r.stdout.strip()} MB"


# --- near_duplicate_components against a plain O(N^2) reference, on every path it can take ---

def _reference_components(hashes: list[str | None], max_distance: int) -> tuple[list[int], list[int]]:
    """Every pair compared at once (an N x N XOR-popcount matrix); components by union-find."""
    n = len(hashes)
    have = np.array([i for i, h in enumerate(hashes) if h], dtype=np.int64)
    closest = np.full(n, 64, dtype=np.int64)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if len(have):
        v = np.array([int(hashes[i], 16) for i in have], dtype=np.uint64)
        dist = np.bitwise_count(v[:, None] ^ v[None, :]).astype(np.int64)
        np.fill_diagonal(dist, 64)
        dist[dist > max_distance] = 64
        closest[have] = dist.min(axis=1)
        for i, j in zip(*np.nonzero(np.triu(dist <= max_distance, 1))):
            a, b = find(int(have[i])), find(int(have[j]))
            parent[max(a, b)] = min(a, b)
    return [find(i) for i in range(n)], closest.tolist()


def _planted_hashes(n: int, seed: int, crowd: int = 10) -> list[str | None]:
    """Random 64-bit hashes with, planted among them: clusters of near copies (0..10 flipped bits),
    chains (each link 1..4 bits from the previous, so the ends drift far apart), exact copies,
    a crowd sharing 48 bits (one key for most bands; 1 in `crowd`), and missing hashes; shuffled."""
    rng = np.random.default_rng(seed)
    one = np.uint64(1)

    def flip(v: np.uint64, k: int) -> np.uint64:
        for b in rng.choice(64, size=k, replace=False):
            v ^= one << np.uint64(b)
        return v

    values = list(rng.integers(0, 2**64 - 1, size=n // 2, dtype=np.uint64, endpoint=True))
    for _ in range(n // 40):  # clusters
        centre = values[rng.integers(len(values))]
        values += [flip(centre, int(rng.integers(0, 11))) for _ in range(int(rng.integers(2, 12)))]
    for _ in range(n // 100):  # chains
        v = values[rng.integers(len(values))]
        for _ in range(int(rng.integers(3, 30))):
            v = flip(v, int(rng.integers(1, 5)))
            values.append(v)
    values += [values[i] for i in rng.integers(0, len(values), size=n // 20)]  # exact copies
    shared = np.uint64(rng.integers(0, 2**48)) << np.uint64(16)
    values += list(shared | rng.integers(0, 2**16, size=n // crowd, dtype=np.uint64))
    values = values[:n] if len(values) > n else values + list(rng.integers(0, 2**63, size=n - len(values), dtype=np.uint64))
    hashes: list[str | None] = [f"{int(v):016x}" for v in values]
    for i in rng.integers(0, n, size=n // 25):
        hashes[i] = None if i % 2 else ""
    order = rng.permutation(n)
    return [hashes[i] for i in order]


_PATHS = {
    "default": {},
    # multi-index hashing at every size and distance, with t = 1 or 2 bands agreeing
    "bands-1": {"_BANDS": tuple(((0, 1),) for _ in range(17))},
    "bands-2": {"_BANDS": tuple(((0, 2),) for _ in range(17))},
    # long runs block-scanned, the tail expansion reached early, chunks and batches tiny
    "short-runs": {"_BANDS": tuple(((0, 1 + d % 2),) for d in range(17)), "_RUN": 6, "_TAIL": 3,
                   "_CHUNK": 64, "_BLOCK": 7, "_TILE": 50},
    # candidates counted over budget at once: falls back to the scan
    "over-budget": {"_BANDS": tuple(((0, 2),) for _ in range(17)), "_SCAN_RATIO": 1e-4},
    # the scan alone
    "scan": {"_BANDS": tuple(() for _ in range(17))},
}


@pytest.mark.parametrize("path", sorted(_PATHS))
@pytest.mark.parametrize("max_distance", range(17))
def test_near_duplicate_components_equal_the_reference_on_every_path(monkeypatch, path, max_distance):
    from models import split

    for name, value in _PATHS[path].items():
        monkeypatch.setattr(split, name, value)
    for seed, n in ((max_distance, 1200), (100 + max_distance, 300)):
        hashes = _planted_hashes(n, seed)
        roots, closest = split.near_duplicate_components(hashes, max_distance)
        want_roots, want_closest = _reference_components(hashes, max_distance)
        assert roots.dtype == closest.dtype == np.int64
        assert closest.tolist() == want_closest
        assert roots.tolist() == want_roots
        scan_roots, scan_closest = split._components(hashes, max_distance, "scan")
        assert scan_roots.tolist() == want_roots and scan_closest.tolist() == want_closest



@pytest.mark.parametrize("max_distance", [1, 6, 8, 10])
def test_near_duplicate_components_at_scale_equal_the_scan(monkeypatch, max_distance):
    """32,000 hashes: multi-index hashing on its own (default) terms, t = 1 at 1 and 6 bits and
    t = 2 at 8 and 10, against the block scan (itself checked against the reference above)."""
    from models import split

    hashes = _planted_hashes(32000, max_distance, crowd=400)
    scan, scanned = split._scan_pairs, []
    monkeypatch.setattr(split, "_scan_pairs", lambda values, index, *a: scanned.append(index) or scan(values, index, *a))
    roots, closest = split.near_duplicate_components(hashes, max_distance)
    assert not any(index is None for index in scanned)  # not the scan of all pairs
    monkeypatch.undo()
    want_roots, want_closest = split._components(hashes, max_distance, "scan")
    np.testing.assert_array_equal(closest, want_closest)
    np.testing.assert_array_equal(roots, want_roots)

def test_the_plants_make_every_kind_of_pair():
    """The reference sets above hold what they claim: groups, long chains, exact copies."""
    hashes = _planted_hashes(1200, 6)
    roots, closest = _reference_components(hashes, 6)
    sizes = np.bincount(np.array(roots))
    assert (np.array(closest) == 0).sum() > 50 and sizes.max() > 30 and (sizes > 1).sum() > 40
    assert {len(h) for h in hashes if h} == {16} and sum(not h for h in hashes) > 10


@pytest.mark.parametrize("max_distance", [0, 1, 6, 16])
def test_near_duplicate_components_without_hashes(max_distance):
    from models.split import near_duplicate_components

    for hashes in ([], [None], ["abcdef0123456789"], [None, "", None], ["", "00ff00ff00ff00ff", None]):
        roots, closest = near_duplicate_components(hashes, max_distance)
        assert roots.tolist() == list(range(len(hashes))) and closest.tolist() == [64] * len(hashes)
        assert roots.dtype == closest.dtype == np.int64


@pytest.mark.parametrize("max_distance", [0, 6, 16])
def test_identical_hashes_are_one_group(max_distance):
    from models.split import near_duplicate_components

    hashes = ["8f3e0000deadbeef"] * 3000
    hashes[5] = hashes[2000] = None
    hashes[7] = "0000000000000000"  # 30 bits away from the rest
    roots, closest = near_duplicate_components(hashes, max_distance)
    want = np.zeros(3000, dtype=np.int64)
    want[[5, 7, 2000]] = [5, 7, 2000]
    assert roots.tolist() == want.tolist()
    assert closest.tolist() == [64 if i in (5, 7, 2000) else 0 for i in range(3000)]


def test_memory_stays_bounded_on_identical_and_crowded_hashes():
    """20,000 identical hashes (200 M equal pairs), then 6,000 distinct ones that share 48 bits
    (every band key but the lowest alike, 4.7 M pairs within 6 bits): both complete within a
    small fixed memory (the crowd by the block scan, its candidates being too many)."""
    import time
    import tracemalloc

    from models.split import near_duplicate_components

    tracemalloc.start()
    try:
        t = time.perf_counter()
        roots, closest = near_duplicate_components(["c3c3c3c3c3c3c3c3"] * 20000, 6)
        assert not roots.any() and not closest.any()
        assert tracemalloc.get_traced_memory()[1] < 20 * 2**20
        tracemalloc.reset_peak()
        crowd = [f"{0xC3C3C3C3C3C30000 | i:016x}" for i in range(0, 6000 * 7, 7)]
        roots, closest = near_duplicate_components(crowd, 6)
        peak = tracemalloc.get_traced_memory()[1]
        seconds = time.perf_counter() - t
    finally:
        tracemalloc.stop()
    assert not roots.any() and closest.max() <= 6
    assert peak < 150 * 2**20, f"peak {peak / 2**20:.0f} MB"
    assert seconds < 60


def test_memory_stays_bounded_on_a_crowd_among_random_hashes(monkeypatch):
    """3,000 hashes sharing 48 bits among 40,000 random ones: the crowd's runs (one per band key
    over the shared bits) are block-scanned within multi-index hashing, in bounded memory."""
    import tracemalloc

    from models import split

    rng = np.random.default_rng(0)
    values = [int(v) for v in rng.integers(0, 2**63, 40000, dtype=np.uint64)]
    values += [0xC3C3C3C3C3C30000 | i for i in range(0, 3000 * 21, 21)]
    hashes = [f"{v:016x}" for v in values]
    scan, scanned = split._scan_pairs, []
    monkeypatch.setattr(split, "_scan_pairs", lambda values, index, *a: scanned.append(index) or scan(values, index, *a))
    tracemalloc.start()
    try:
        roots, closest = split.near_duplicate_components(hashes, 6)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert scanned and all(index is not None and len(index) > split._RUN for index in scanned)
    assert peak < 150 * 2**20, f"peak {peak / 2**20:.0f} MB"
    assert (roots[40000:] == 40000).all() and closest[40000:].max() <= 6
    monkeypatch.undo()
    want_roots, want_closest = split._components(hashes, 6, "scan")
    np.testing.assert_array_equal(roots, want_roots)
    np.testing.assert_array_equal(closest, want_closest)
