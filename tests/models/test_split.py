import io

import numpy as np
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
