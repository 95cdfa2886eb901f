import time

import numpy as np
import pytest
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


def test_a_joint_fit_gives_each_head_its_own_fit(monkeypatch):
    """fit_joint shares the passes, not the heads: each is the one fit() makes alone (its rows,
    l2, warm start, standardisation), on the dense path and on the chunked float16 one."""
    X, y = _blobs(n=400, d=40)
    y2 = (y == 0).astype(np.int64)  # two classes: the one-logit path
    rng = np.random.default_rng(3)
    a, b = np.sort(rng.choice(400, 300, replace=False)), np.sort(rng.choice(400, 250, replace=False))
    for labels, k in ((y, 3), (y2, 2)):
        start = linear.fit(X, labels, k, 1.0, rows=a)
        specs = [linear.Spec(a, 0.1), linear.Spec(b, 0.01, start), linear.Spec(None, 1.0)]
        for dense in (True, False):
            if not dense:
                monkeypatch.setattr(linear, "DENSE_ELEMENTS", 0)
                monkeypatch.setattr(linear, "CHUNK_ROWS", 64)
            Xd = X if dense else X.astype(np.float16)
            joint = linear.fit_joint(Xd, labels, k, specs, workers=2)
            for spec, head in zip(specs, joint):
                alone = linear.fit(Xd, labels, k, spec.l2, init=spec.init, rows=spec.rows)
                np.testing.assert_allclose(head.mean, alone.mean, rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(head.scale, alone.scale, rtol=1e-4)
                np.testing.assert_allclose(head.logits(Xd), alone.logits(Xd), atol=2e-2)
        monkeypatch.undo()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_joint_fit_stops_when_asked_and_leaves_no_thread(monkeypatch, workers):
    import threading

    X, y = _blobs(n=300)
    monkeypatch.setattr(linear, "DENSE_ELEMENTS", 0)
    monkeypatch.setattr(linear, "CHUNK_ROWS", 32)
    loss = linear._Passes.loss
    monkeypatch.setattr(linear._Passes, "loss", lambda self, batch: (time.sleep(0.03), loss(self, batch))[1])  # a slow pass
    before = threading.active_count()
    calls = []

    def should_stop():  # called on this thread only, at least every 0.1 s
        assert threading.current_thread() is threading.main_thread()
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        linear.fit_joint(X, y, 3, [linear.Spec(None, 0.01), linear.Spec(np.arange(200), 0.1)], should_stop=should_stop, workers=workers)
    assert threading.active_count() == before



def test_passes_on_a_device_give_the_heads_the_cpu_passes_give(monkeypatch):
    """A GPU training's head (linear.passes_on): the same loss and gradient, summed on the device, so
    the same heads as the CPU workers' passes. Run here with device "cpu": the same code and torch ops."""
    X, y = _blobs(n=400, d=40)
    y2 = (y == 0).astype(np.int64)
    rng = np.random.default_rng(5)
    a = np.sort(rng.choice(400, 300, replace=False))
    monkeypatch.setattr(linear, "DEVICE_ROWS", 64)  # several chunks a pass
    made = []
    real = linear._DevicePasses.__init__
    monkeypatch.setattr(linear._DevicePasses, "__init__", lambda self, *a, **k: (made.append(1), real(self, *a, **k))[1])
    Xh = X.astype(np.float16)
    for labels, k in ((y, 3), (y2, 2)):
        specs = [linear.Spec(a, 0.1), linear.Spec(None, 0.01)]
        host = linear.fit_joint(Xh, labels, k, specs, workers=2)
        with linear.passes_on(torch.device("cpu")):
            dev = linear.fit_joint(Xh, labels, k, specs)
        for h, d in zip(host, dev):
            np.testing.assert_allclose(d.mean, h.mean, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(d.scale, h.scale, rtol=1e-4)
            np.testing.assert_allclose(d.logits(Xh), h.logits(Xh), atol=2e-2)
    assert len(made) == 2
    linear.fit_joint(Xh, y, 3, [linear.Spec(None, 0.1)], workers=1)  # outside the block: the CPU passes again
    assert len(made) == 2


def test_a_device_fit_stops_when_asked(monkeypatch):
    X, y = _blobs(n=300)
    monkeypatch.setattr(linear, "DEVICE_ROWS", 32)
    calls = []

    def should_stop():
        calls.append(1)
        if len(calls) > 20:
            raise KeyboardInterrupt

    with linear.passes_on(torch.device("cpu")), pytest.raises(KeyboardInterrupt):
        linear.fit_joint(X, y, 3, [linear.Spec(None, 0.01), linear.Spec(np.arange(200), 0.1)], should_stop=should_stop)
