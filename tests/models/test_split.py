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
