import numpy as np
import torch

from models import linear


def _blobs(n=300, d=50, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    centres = rng.normal(0, 1, (3, d)) * 1.5
    X = (centres[y] + rng.normal(0, 1, (n, d))) * rng.uniform(0.1, 10, d)  # very different feature scales
    X[:, 0] = 7.0  # a constant feature must not break standardisation
    return X.astype(np.float32), y


def test_fit_learns_and_folds_into_a_linear_layer():
    X, y = _blobs()
    head = linear.fit(X, y, 3, l2=0.01)
    assert (head.logits(X).argmax(1) == y).mean() > 0.95
    w, b = head.folded()
    layer = torch.nn.Linear(X.shape[1], 3)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
        np.testing.assert_allclose(layer(torch.from_numpy(X)).numpy(), head.logits(X), rtol=1e-4, atol=1e-3)


def test_stronger_l2_shrinks_weights_and_warm_start_reaches_the_same_optimum():
    X, y = _blobs()
    weak, strong = linear.fit(X, y, 3, 0.01), linear.fit(X, y, 3, 1.0)
    assert np.abs(strong.weight).sum() < np.abs(weak.weight).sum()
    warm = linear.fit(X, y, 3, 0.01, init=strong)
    np.testing.assert_allclose(warm.logits(X), weak.logits(X), atol=2e-2)


def test_cross_val_logits_are_out_of_fold():
    X, y = _blobs(n=200)
    folds = np.arange(200) % 4
    out = linear.cross_val_logits(X, y, 3, folds, l2_grid=(0.1, 0.01))
    assert set(out) == {0.1, 0.01} and out[0.1].shape == (200, 3)
    # the rows of fold 0 are predicted by a head fitted without them
    head = linear.fit(X[folds != 0], y[folds != 0], 3, 0.1)
    np.testing.assert_allclose(out[0.1][folds == 0], head.logits(X[folds == 0]), atol=1e-2)
    assert (out[0.01].argmax(1) == y).mean() > 0.9
