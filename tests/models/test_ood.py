"""models.ood on real features: the default extractor (EfficientNet-Lite0 INT8, 288 px, avgmax) on
kaggle_ cats and dogs (in distribution) and imagenet_ photos of other things (out of distribution)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from models import networks
from models.config import TrainConfig
from models.evaluate import roc_auc
from models.features import warm_extractor
from models.ood import OodIndex, fit_ood

from .conftest import image_files

DOGS_AND_CATS = ("n02085620", "n02130308")  # ImageNet wnids of dogs, wolves, foxes and cats (bench/ood.py)


@pytest.fixture(scope="module")
def real(datasets) -> dict[str, np.ndarray]:
    """Features of 40 training (20 cats, 20 dogs) and 12 test kaggle_ photos, and of 12 imagenet_
    test photos that are neither dogs nor cats: ~65 images, about 10 s on 2 cores."""
    root = datasets / "photos"
    train = image_files(root, "train", "cat", 20, "kaggle_*") + image_files(root, "train", "noncat", 20, "kaggle_*")
    test = image_files(root, "test", "cat", 6, "kaggle_*") + image_files(root, "test", "noncat", 6, "kaggle_*")
    lo, hi = DOGS_AND_CATS
    others = [p for p in image_files(root, "test", "noncat", None, "imagenet_*") if not lo <= p.name.split("_")[1] <= hi][:12]
    cfg = TrainConfig().resolved()  # as a default linear training extracts them (shared with conftest's `trained`)
    arch = {"name": cfg.architecture, "image_size": cfg.image_size, "pooling": cfg.pooling, "num_classes": 2}
    prep = networks.default_preprocessing(cfg.architecture, cfg.image_size, cfg.resize, cfg.crop_fraction)
    ex = warm_extractor(arch, prep, torch.device("cpu"), None, batch_size=cfg.batch_size, precision=cfg.precision)
    x = ex.extract([p.read_bytes for p in train + test + others])
    return {"train": x[:40], "labels": np.array(["cat"] * 20 + ["dog"] * 20), "test": x[40:52], "others": x[52:]}


def _fit(real, **kw) -> OodIndex:
    return fit_ood(real["train"], real["labels"], max_index=kw.pop("max_index", 2048), seed=0, dims=1280, **kw)


def _leave_one_out(x: np.ndarray, k: int) -> np.ndarray:
    """Independent reference: cosine distance to the k-th nearest other training image (float64)."""
    z = x[:, :1280].astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    s = z @ z.T
    np.fill_diagonal(s, -np.inf)
    return 1 - np.sort(s, axis=1)[:, -k]


def test_photos_of_other_things_score_above_cats_and_dogs(real):
    index = _fit(real)
    inside, outside = index.score(real["test"]), index.score(real["others"])
    auc = roc_auc(np.r_[inside, outside], np.r_[np.zeros(len(inside), bool), np.ones(len(outside), bool)])
    assert auc >= 0.95, (inside, outside)
    assert (outside > index.threshold).mean() >= 0.75 and (inside > index.threshold).mean() <= 0.25  # 40 training images: 11/12, 2/12
    assert _fit(real, k=1).score(real["train"]).max() < 0.01  # a training image is its own neighbour, but for int8 rounding


@pytest.mark.parametrize("fraction", [0.05, 0.25, 0.5])
def test_the_threshold_flags_the_requested_share_of_training_images(real, fraction):
    index = _fit(real, flagged_fraction=fraction, k=1)
    loo = _leave_one_out(real["train"], 1)
    assert abs((loo > index.threshold).mean() - fraction) <= 1.5 / len(loo)
    assert index.flagged_fraction == fraction and index.threshold == index.threshold_for(fraction)
    moved = index.with_flagged_fraction(0.01)  # PUT .../ood-threshold: no training features needed
    assert moved.threshold == index.threshold_for(0.01) > index.threshold and moved.flagged_fraction == 0.01
    assert index.threshold_for(0.0) == pytest.approx(loo.max(), abs=2e-3) and index.threshold_for(1.0) == pytest.approx(loo.min(), abs=2e-3)
    with pytest.raises(ValueError):
        index.threshold_for(1.5)


def test_index_and_calibration_are_capped_whatever_the_number_of_training_images(real):
    rng = np.random.default_rng(0)
    many = np.repeat(real["train"], 60, axis=0) * rng.uniform(0.9, 1.1, (2400, real["train"].shape[1])).astype(np.float32)
    labels = np.repeat(real["labels"], 60)
    small = fit_ood(real["train"][:30], real["labels"][:30], max_index=64, seed=0, dims=1280)
    large = fit_ood(many, labels, max_index=64, seed=0, dims=1280, max_calibration=500)
    assert small.codes.shape == (30, 1280) and large.codes.shape == (64, 1280) and large.codes.dtype == np.int8
    assert large.nbytes == fit_ood(many[:900], labels[:900], max_index=64, seed=0, dims=1280).nbytes < 64 * 1280 + 64 * 4 + 5000
    assert large.n_train == 2400 and np.isfinite(large.quantiles).all()


def test_every_label_gets_an_equal_share_and_a_small_one_keeps_all_its_images(real):
    labels = np.array(["cat"] * 3 + ["dog"] * 37)
    index = fit_ood(real["train"], labels, max_index=20, seed=0, dims=1280)
    assert len(index.codes) == 20
    members = {tuple(v) for v in index.codes.tolist()}
    cats = fit_ood(real["train"][:3], labels[:3], max_index=20, seed=0, dims=1280)
    assert {tuple(v) for v in cats.codes.tolist()} <= members  # all three cats in the index, 17 dogs


def test_a_round_trip_through_a_plain_dict_and_npz_scores_the_same(real, tmp_path):
    index = _fit(real)
    d = index.to_dict()
    assert all(isinstance(v, (np.ndarray, int, float, str)) for v in d.values())
    np.savez(tmp_path / "ood.npz", **d)
    with np.load(tmp_path / "ood.npz") as z:
        back = OodIndex.from_dict({k: z[k] if z[k].ndim else z[k].item() for k in z.files})
    np.testing.assert_array_equal(back.score(real["others"]), index.score(real["others"]))
    assert back.threshold == index.threshold and back.k == index.k == 5 and back.dims == 1280
    with pytest.raises(ValueError):
        OodIndex.from_dict({**d, "format": 99})


def test_a_batch_scores_as_its_images_one_by_one(real):
    index = _fit(real)
    x = np.concatenate([real["test"], real["others"]])
    one_by_one = np.concatenate([index.score(x[i : i + 1]) for i in range(len(x))])
    np.testing.assert_allclose(index.score(x), one_by_one, atol=1e-6)
    assert index.score(x[:0]).shape == (0,)


def test_near_duplicates_in_one_group_are_not_each_others_neighbours(real):
    x = np.concatenate([real["train"], real["train"][:5]])  # five images uploaded twice
    labels = np.concatenate([real["labels"], real["labels"][:5]])
    groups = np.r_[np.arange(40), np.arange(5)]
    plain = fit_ood(x, labels, max_index=2048, seed=0, dims=1280, k=1, flagged_fraction=0.5)
    grouped = fit_ood(x, labels, max_index=2048, seed=0, dims=1280, k=1, flagged_fraction=0.5, groups=groups)
    assert plain.quantiles[0] < 1e-3 and grouped.quantiles[0] > 0.05  # duplicates no longer score (about) 0
    assert grouped.threshold > plain.threshold


def test_a_tiny_dataset_still_gets_a_finite_index(real):
    index = fit_ood(real["train"][[0, 1, 20, 21]], ["cat", "cat", "dog", "dog"], max_index=2048, seed=0, dims=1280)
    assert index.k == 3 and np.isfinite(index.threshold) and np.isfinite(index.score(real["others"])).all()


def test_scoring_needs_numpy_alone():
    code = "import sys, models.ood; assert 'torch' not in sys.modules and 'onnxruntime' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_held_out_images_set_the_threshold_when_given(real):
    """A fine-tuned network has fitted its training images: its validation split calibrates."""
    index = fit_ood(real["train"], real["labels"], max_index=2048, seed=0, dims=1280, held_out=real["test"], flagged_fraction=0.25)
    assert (index.score(real["test"]) > index.threshold).mean() == pytest.approx(0.25, abs=1 / 12)
    assert index.threshold_for(0.0) == pytest.approx(float(index.score(real["test"]).max()), abs=1e-6)
