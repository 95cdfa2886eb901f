"""models.label_issues on real features: the default extractor (EfficientNet-Lite0 INT8, 288 px,
avgmax) on 60 kaggle_ cats and 60 kaggle_ dogs of photos/train, with held-out probabilities computed
as a linear training does (out-of-fold logits, l2 and temperature by calibrated CV log-loss)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import calibrate, linear, networks
from models import label_issues as li
from models.config import TrainConfig
from models.features import warm_extractor
from models.split import kfold

from .conftest import image_files

N_PER_LABEL = 60
FLIPS_PER_LABEL = 3  # 5%, as issue 15's target


@pytest.fixture(scope="module")
def real(datasets) -> dict:
    """Features of 60 + 60 kaggle_ training photos: ~120 images, about 10 s on 2 cores."""
    root = datasets / "photos"
    files = image_files(root, "train", "cat", N_PER_LABEL, "kaggle_*") + image_files(root, "train", "noncat", N_PER_LABEL, "kaggle_*")
    cfg = TrainConfig().resolved()
    arch = {"name": cfg.architecture, "image_size": cfg.image_size, "pooling": cfg.pooling, "num_classes": 2}
    prep = networks.default_preprocessing(cfg.architecture, cfg.image_size, cfg.resize, cfg.crop_fraction)
    ex = warm_extractor(arch, prep, torch.device("cpu"), None, batch_size=cfg.batch_size, precision=cfg.precision)
    X = ex.extract([p.read_bytes for p in files])
    y = np.repeat([0, 1], N_PER_LABEL)
    rng = np.random.default_rng(0)
    flipped = np.zeros(len(y), bool)
    for c in (0, 1):
        flipped[rng.choice(np.flatnonzero(y == c), FLIPS_PER_LABEL, replace=False)] = True
    noisy = np.where(flipped, 1 - y, y)
    return {"X": X, "y": y, "noisy": noisy, "flipped": flipped, "P_clean": _two_pass(X, y), "P_noisy": _two_pass(X, noisy),
            "P_noisy_1": _heldout(X, noisy)[0]}


def _heldout(X: np.ndarray, y: np.ndarray, exclude: np.ndarray | None = None, l2: float | None = None) -> tuple[np.ndarray, float]:
    """Out-of-fold probabilities as models.fit_linear computes them (no validation split
    here); with `exclude`, at the given l2, every head trained without those rows (the second pass)."""
    folds = kfold(y, np.arange(len(y)), 5, 0)
    if exclude is None:
        cv = linear.cross_val_logits(X, y, 2, folds)
        temps = {g: calibrate.fit_temperature(z, y) for g, z in cv.items()}
        l2 = min(cv, key=lambda g: calibrate.log_loss(cv[g], y, temps[g]))
        return calibrate.softmax(cv[l2], temps[l2]), l2
    logits = np.zeros((len(y), 2))
    for f in range(5):
        rows = (folds != f) & ~exclude
        logits[folds == f] = linear.fit(X[rows], y[rows], 2, l2).logits(X[folds == f])
    return calibrate.softmax(logits, calibrate.fit_temperature(logits[~exclude], y[~exclude])), l2


def _two_pass(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    P, l2 = _heldout(X, y)
    return _heldout(X, y, li.first_pass(P, y), l2)[0]


def _check_output(issues, n: int, num_classes: int, labels: np.ndarray):
    idx = [i for i, _, _ in issues]
    assert len(set(idx)) == len(idx) and all(0 <= i < n for i in idx)
    assert all(0 <= s < num_classes and s != labels[i] for i, s, _ in issues)
    scores = [s for _, _, s in issues]
    assert all(0.0 <= s <= 1.0 for s in scores) and scores == sorted(scores, reverse=True)
    assert all(isinstance(i, int) and isinstance(s, int) and isinstance(v, float) for i, s, v in issues)


def test_flipped_labels_are_found_at_the_top(real):
    issues = li.find_label_issues(real["P_noisy"], real["noisy"], real["X"], dims=real["X"].shape[1] // 2)
    flipped = set(np.flatnonzero(real["flipped"]).tolist())
    found = [i for i, _, _ in issues]
    assert len(flipped & set(found)) >= len(flipped) - 1, (sorted(flipped), issues)  # recall >= 5/6
    assert len(flipped & set(found[: len(flipped)])) >= len(flipped) - 1  # and they come first
    assert len(found) <= len(flipped) + 3  # precision >= 6/9
    assert all(s == real["y"][i] for i, s, _ in issues if i in flipped)  # the suggestion is the true label
    _check_output(issues, len(real["y"]), 2, real["noisy"])


def test_a_clean_set_yields_few_issues(real):
    issues = li.find_label_issues(real["P_clean"], real["y"], real["X"], dims=real["X"].shape[1] // 2)
    assert len(issues) <= 3, issues  # of 120 correctly labelled photos
    assert li.estimated_issue_count(real["P_clean"], real["y"]) <= 6


@pytest.mark.parametrize("method", li.METHODS)
def test_every_rule_returns_ordered_bounded_issues(real, method):
    P, y, X = real["P_noisy"], real["noisy"], real["X"]
    issues = li.find_label_issues(P, y, X, method=method, dims=X.shape[1] // 2)
    _check_output(issues, len(y), 2, y)
    assert len(issues) <= len(y) // 4
    without = li.find_label_issues(P, y, None, method=method)  # no features: a rule without neighbours
    _check_output(without, len(y), 2, y)


def test_neighbour_search_is_exact_in_blocks_and_capped(real, monkeypatch):
    X = real["X"]
    z = X[:, :1280].astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    s = z @ z.T
    np.fill_diagonal(s, -np.inf)
    want = np.argsort(-s, axis=1)[:, :10]
    monkeypatch.setattr(li, "_BLOCK_FLOATS", 7 * len(X))  # 7 rows a block: many blocks, a short last one
    got, sims = li.nearest_neighbours(X, 10, dims=1280)
    assert got.shape == (len(X), 10) and got.dtype == np.int32
    assert (got != np.arange(len(X))[:, None]).all()
    assert np.mean(got == want) >= 0.98  # float32 ties aside
    np.testing.assert_allclose(sims, np.take_along_axis(s, want, axis=1), atol=1e-4)
    assert (np.diff(sims, axis=1) <= 1e-6).all()
    capped, _ = li.nearest_neighbours(X, 5, dims=1280, labels=real["y"], max_reference=40, seed=1)
    ref = np.unique(capped)
    assert len(ref) <= 40 and (capped != np.arange(len(X))[:, None]).all()
    assert np.bincount(real["y"][ref], minlength=2).min() >= 1


def test_confident_learning_counts_and_prunes_on_known_noise():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 100)
    P = np.full((300, 3), 0.05)
    P[np.arange(300), y] = 0.9
    P += rng.uniform(0, 0.02, P.shape)
    P /= P.sum(1, keepdims=True)
    noisy = y.copy()
    wrong = np.array([3, 50, 120, 250, 299])
    noisy[wrong] = (y[wrong] + 1) % 3
    assert li.estimated_issue_count(P, noisy) == 5
    for method in ("confident_learning", "self_confidence", "margin_at_count", "disagreement"):
        issues = li.find_label_issues(P, noisy, method=method)
        assert sorted(i for i, _, _ in issues) == wrong.tolist(), method
        assert all(s == y[i] for i, s, _ in issues)


def test_bad_input_is_refused_and_empty_input_is_empty():
    assert li.find_label_issues(np.zeros((0, 2)), np.zeros(0, np.int64)) == []
    with pytest.raises(ValueError):
        li.find_label_issues(np.full((3, 2), 0.5), np.array([0, 1]))
    with pytest.raises(ValueError):
        li.find_label_issues(np.full((2, 2), 0.5), np.array([0, 2]))
    with pytest.raises(ValueError):
        li.find_label_issues(np.full((2, 2), 0.5), np.array([0, 1]), method="vibes")
