"""models.suggest: what a version says about images it never saw equals what predict says, from
cached features for a linear version (and fills the cache), through the network otherwise."""

from __future__ import annotations

import numpy as np
import pytest

from models.features import MemoryFeatureCache
from models.predictor import Predictor
from models.suggest import suggest
from models.train import TrainConfig, train


def _served(result, samples) -> np.ndarray:
    predictor = Predictor.from_onnx(result.onnx)
    return predictor.infer_scored(np.stack([predictor.preprocess(s.load()) for s in samples]))


def test_a_linear_version_answers_from_the_feature_cache_as_predict_does(trained, catvnoncat_test):
    samples = catvnoncat_test[:24]
    cache = MemoryFeatureCache()
    probs, scores = suggest(trained.checkpoint, [s.sha256 for s in samples], [s.load for s in samples], cache=cache)
    served = _served(trained, samples)
    np.testing.assert_allclose(probs, served[:, :2], atol=2e-3)
    np.testing.assert_allclose(scores, served[:, 2], atol=2e-3)
    extractor_id = trained.metrics["feature_extractor"]
    assert len(cache.get_many(extractor_id, [s.sha256 for s in samples])) == len(samples)  # filled for the next training

    def never(*_):
        raise AssertionError("decoded again")

    again, _ = suggest(trained.checkpoint, [s.sha256 for s in samples], [never] * len(samples), cache=cache)
    np.testing.assert_array_equal(again, probs)  # the second ask reads the cache only


def test_other_versions_run_their_network(small_catvnoncat, catvnoncat_test):
    result = train(small_catvnoncat, TrainConfig(architecture="simple_cnn", epochs=1))
    samples = catvnoncat_test[:10]
    probs, scores = suggest(result.checkpoint, [s.sha256 for s in samples], [s.load for s in samples], onnx=result.onnx)
    served = _served(result, samples)
    np.testing.assert_allclose(probs, served[:, :2], atol=1e-4)
    np.testing.assert_allclose(scores, served[:, 2], atol=1e-4)


def test_a_version_whose_features_this_process_computes_otherwise_uses_its_network(trained, catvnoncat_test):
    ckpt = {**trained.checkpoint, "metrics": {**trained.checkpoint["metrics"], "feature_extractor": "another-backbone"}}
    samples = catvnoncat_test[:4]
    probs, _ = suggest(ckpt, [s.sha256 for s in samples], [s.load for s in samples], onnx=trained.onnx)
    np.testing.assert_allclose(probs, _served(trained, samples)[:, :2], atol=1e-4)


def test_nothing_to_suggest():
    probs, scores = suggest({"labels": ["a", "b"]}, [], [])
    assert probs.shape == (0, 2) and scores.shape == (0,)
