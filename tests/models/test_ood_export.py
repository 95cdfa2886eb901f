"""The open-set index wired through a version (issue 15): training fits it, the checkpoint keeps
it, the exported graph computes its score, the predictor answers it; old graphs keep working.

Real trainings: conftest's `trained` (the default INT8 linear version on 80 catvnoncat images)
and a simple_cnn of one epoch on tests/assets (a few seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import networks
from models.checkpoint import build_network, checkpoint_bytes, load_checkpoint, ood_index
from models.export import export_onnx
from models.features import warm_extractor
from models.ood import QUANTILE_GRID
from models.onnx_session import felis_metadata, onnx_session
from models.predictor import Predictor
from models.preprocess import Preprocessing
from tests.conftest import asset_images
from tests.utils.checkpoints import simple_cnn_checkpoint


@pytest.fixture(scope="module")
def simple_cnn() -> dict:
    return load_checkpoint(simple_cnn_checkpoint())


def _outputs(onnx: bytes) -> list[str]:
    return [o.name for o in onnx_session(onnx, 1).get_outputs()]


def test_an_int8_linear_graph_scores_as_the_index_does_on_the_same_features(trained, photo_bytes):
    ckpt, index = trained.checkpoint, ood_index(trained.checkpoint)
    assert _outputs(trained.onnx) == ["probabilities", "ood_score"]
    arch = ckpt["architecture"]
    prep = Preprocessing.from_dict(ckpt["preprocessing"])
    assert prep == networks.default_preprocessing(arch["name"], arch["image_size"], prep.resize, prep.crop_fraction)
    extractor = warm_extractor(arch, prep, torch.device("cpu"), None, precision="int8")  # the training's: the served features graph
    features = extractor.extract([lambda b=b: b for b in photo_bytes])
    predictor = Predictor.from_onnx(trained.onnx)
    scored = predictor.infer_scored(predictor.preprocess_batch(photo_bytes))
    np.testing.assert_allclose(scored[:, -1], index.score(features), atol=1e-5)
    np.testing.assert_allclose(scored[:, :-1], predictor.infer(predictor.preprocess_batch(photo_bytes)), atol=0)
    assert (scored[:, -1] >= 0).all() and (scored[:, -1] <= 2).all()
    # one image at a time scores as in a batch (micro-batching cannot change an answer)
    alone = np.concatenate([predictor.infer_scored(predictor.preprocess_batch([b]))[:, -1] for b in photo_bytes[:3]])
    np.testing.assert_allclose(alone, scored[:3, -1], atol=1e-6)


def test_the_training_reports_its_calibration(trained):
    index, ev = ood_index(trained.checkpoint), trained.evaluation["ood"]
    assert (index.dims, index.k, len(index.codes), index.n_train) == (1280, 5, 80, 80)  # avgmax: the average-pooled half
    assert ev["threshold"] == index.threshold == trained.metrics["ood"]["threshold"]
    assert ev["flagged_fraction"] == 0.01 and ev["index_vectors"] == 80 and ev["calibration"] == "leave_one_out"
    assert 0 <= ev["validation_flagged"] <= 1 and ev["validation_images"] == trained.metrics["n_val"] > 0
    assert set(trained.metrics["ood"]) == {"threshold", "flagged_fraction", "index_vectors", "validation_flagged"}


def test_the_graph_carries_the_calibration_to_rethreshold_without_the_checkpoint(trained):
    index = ood_index(trained.checkpoint)
    meta = felis_metadata(onnx_session(trained.onnx, 1))["ood"]
    assert meta["threshold"] == index.threshold and meta["flagged_fraction"] == 0.01
    assert (meta["method"], meta["k"], meta["dims"], meta["index_vectors"], meta["n_train"]) == ("knn_cosine", 5, 1280, 80, 80)
    assert len(meta["quantiles"]) == len(QUANTILE_GRID)
    assert abs(np.interp(0.95, QUANTILE_GRID, meta["quantiles"]) - index.threshold_for(0.05)) < 1e-5
    assert Predictor.from_onnx(trained.onnx).ood == meta


def test_a_simple_cnn_graph_and_the_torch_backend_score_as_the_index(simple_cnn):
    index = ood_index(simple_cnn)
    assert index.dims == build_network(simple_cnn).head.in_features  # avg pooling: every column
    onnx = export_onnx(simple_cnn)
    assert _outputs(onnx) == ["probabilities", "ood_score"]
    images = [p.read_bytes() for label in ("cat", "noncat") for p in asset_images("test", label)]
    predictor = Predictor.from_onnx(onnx)
    x = predictor.preprocess_batch(images)
    with torch.no_grad():
        features = build_network(simple_cnn).features(torch.from_numpy(x)).numpy()
    scored = predictor.infer_scored(x)
    np.testing.assert_allclose(scored[:, -1], index.score(features), atol=1e-5)
    by_torch = Predictor.from_checkpoint(simple_cnn, backend="torch").infer_scored(x)
    np.testing.assert_allclose(by_torch, scored, atol=1e-5)
    assert Predictor.from_checkpoint(simple_cnn, backend="torch").ood["threshold"] == index.threshold


def test_finetuned_calibration_comes_from_the_validation_split(simple_cnn):
    ev = simple_cnn["metrics"]["ood"]
    index = ood_index(simple_cnn)
    assert index.n_train == simple_cnn["metrics"]["n_train"]  # the training split: the network fitted those
    assert ev["threshold"] == index.threshold and 0 <= ev["validation_flagged"] <= 1


def test_the_checkpoint_keeps_the_index_as_tensors_through_a_round_trip(simple_cnn):
    stored = simple_cnn["ood"]
    assert isinstance(stored["codes"], torch.Tensor) and stored["codes"].dtype == torch.int8  # not a Python list
    again = load_checkpoint(checkpoint_bytes(simple_cnn))
    a, b = ood_index(simple_cnn), ood_index(again)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.quantiles, b.quantiles)
    np.testing.assert_array_equal(a.scales, b.scales)
    assert (a.k, a.dims, a.threshold, a.flagged_fraction, a.n_train) == (b.k, b.dims, b.threshold, b.flagged_fraction, b.n_train)


def test_a_graph_without_the_score_still_predicts(simple_cnn):
    """A version exported before issue 15 (no index in its checkpoint): probabilities as before,
    the score NaN, no calibration in its metadata."""
    old = {k: v for k, v in simple_cnn.items() if k != "ood"}
    assert ood_index(old) is None
    onnx = export_onnx(old)
    assert _outputs(onnx) == ["probabilities"] and felis_metadata(onnx_session(onnx, 1))["ood"] is None
    images = [p.read_bytes() for p in asset_images("test", "cat")]
    predictor = Predictor.from_onnx(onnx)
    scored = predictor.infer_scored(predictor.preprocess_batch(images))
    assert predictor.ood is None and scored.shape == (len(images), 3) and np.isnan(scored[:, -1]).all()
    new = Predictor.from_onnx(export_onnx(simple_cnn))
    np.testing.assert_allclose(predictor.infer(predictor.preprocess_batch(images)),
                               new.infer(new.preprocess_batch(images)), atol=1e-6)
    assert np.isnan(Predictor.from_checkpoint(old, backend="torch").infer_scored(predictor.preprocess_batch(images))[:, -1]).all()
    assert predictor.infer_scored(np.zeros((0, 3, 32, 32), np.float32)).shape == (0, 3)


def test_an_index_that_does_not_fit_the_network_is_refused_at_export(simple_cnn, trained):
    mixed = {**simple_cnn, "ood": trained.checkpoint["ood"]}  # 1,280 columns against simple_cnn's 256 features
    with pytest.raises(ValueError, match="does not fit"):
        export_onnx(mixed)


def test_a_float32_linear_graph_slices_the_average_pooled_half(trained_fp32, photo_bytes):
    """The torch-exported graph of an avgmax network: the score reads the first 1,280 of 2,560 features."""
    ckpt, index = trained_fp32.checkpoint, ood_index(trained_fp32.checkpoint)
    assert (index.dims, build_network(ckpt).head.in_features) == (1280, 2560)
    predictor = Predictor.from_onnx(trained_fp32.onnx)
    x = predictor.preprocess_batch(photo_bytes)
    with torch.no_grad():
        features = build_network(ckpt).features(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(predictor.infer_scored(x)[:, -1], index.score(features), atol=1e-4)
