"""models.train at scale (issue 17): a warm training of 20,000 images (every feature cached,
2560 float16 values each, the default avgmax width) is cancelled within 2 s wherever it is in
the head's fit, the features are held as float16, and a fit's solver holds no copy of them."""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest

from models import linear
from models.features import MemoryFeatureCache, warm_extractor
from models.train import Sample, TrainConfig, TrainingCancelled, train

N, D = 20_000, 2560


@pytest.fixture(scope="module")
def big():
    """20,000 samples whose features (two labels, 10% of one, a signal in 40 dimensions, the
    rest non-negative noise: the shape of EfficientNet-Lite0's avgmax features) are all cached."""
    from models import networks

    cfg = TrainConfig().resolved()
    arch = {"name": cfg.architecture, "image_size": cfg.image_size, "pooling": cfg.pooling, "num_classes": 2}
    prep = networks.default_preprocessing(cfg.architecture, cfg.image_size, cfg.resize, cfg.crop_fraction)
    extractor = warm_extractor(arch, prep, __import__("torch").device("cpu"), None, batch_size=cfg.batch_size, precision=cfg.precision)
    rng = np.random.default_rng(0)
    y = (rng.random(N) < 0.1).astype(np.int64)
    X = np.abs(rng.normal(0, 0.5, (N, D))).astype(np.float32)
    X[:, :40] += y[:, None] * rng.uniform(0.2, 0.6, 40)
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(N)]
    cache = MemoryFeatureCache()
    cache.put_many(extractor.extractor_id, dict(zip(shas, X)))
    phashes = [f"{int(v):016x}" for v in rng.integers(0, 2**63, N)]

    def no_bytes():
        raise AssertionError("every feature is cached")

    samples = [Sample(f"img{i}", shas[i], ("cat", "noncat")[y[i]], no_bytes, phashes[i]) for i in range(N)]
    return samples, cache


@pytest.mark.slow
@pytest.mark.parametrize("phase, delay", [("features", 1.5), ("calibrating", 0.5)], ids=["l2-grid", "full-folds"])
def test_a_warm_training_is_cancelled_within_two_seconds_in_the_head_fit(big, phase, delay):
    samples, cache = big
    armed: dict = {}

    def progress(p):
        if p["phase"] == phase and "at" not in armed:
            armed["at"] = time.perf_counter() + delay

    def should_stop():
        return "at" in armed and time.perf_counter() >= armed["at"]

    with pytest.raises(TrainingCancelled):
        train(samples, TrainConfig(export_onnx=False), feature_cache=cache, progress=progress, should_stop=should_stop)
    late = time.perf_counter() - armed["at"]
    assert late < 2.0, f"cancelled {late:.2f} s after it was asked"


def test_a_fit_keeps_float16_features_and_reads_them_by_row(monkeypatch):
    """fit(rows=...) on float16 features equals fit on the float32 rows sliced out, and never
    makes an (N, D) copy: every pass converts at most CHUNK_ROWS rows."""
    rng = np.random.default_rng(1)
    X = np.abs(rng.normal(0, 1, (600, 64))).astype(np.float16)
    y = (X[:, :3].astype(np.float32).sum(1) > 2.4).astype(np.int64)
    rows = np.sort(rng.choice(600, 450, replace=False))
    monkeypatch.setattr(linear, "CHUNK_ROWS", 128)
    monkeypatch.setattr(linear, "DENSE_ELEMENTS", 0)  # a fit this small would otherwise copy its rows once
    seen = []
    real_select = linear.torch.index_select

    def index_select(t, dim, index, **kw):
        seen.append(len(index))
        return real_select(t, dim, index, **kw)

    monkeypatch.setattr(linear.torch, "index_select", index_select)
    head = linear.fit(X, y, 2, 0.01, rows=rows)
    assert max(seen) <= 128
    ref = linear.fit(X[rows].astype(np.float32), y[rows], 2, 0.01)
    np.testing.assert_allclose(head.logits(X), ref.logits(X.astype(np.float32)), atol=2e-3)
    pre = linear.Preconditioner(X, rows)
    np.testing.assert_allclose(linear.fit(X, y, 2, 0.01, rows=rows, preconditioner=pre).logits(X), ref.logits(X.astype(np.float32)), atol=2e-3)
    monkeypatch.setattr(linear, "DENSE_ELEMENTS", 1 << 23)  # the small-fit path: the same head
    np.testing.assert_allclose(linear.fit(X, y, 2, 0.01, rows=rows).logits(X), ref.logits(X.astype(np.float32)), atol=2e-3)
