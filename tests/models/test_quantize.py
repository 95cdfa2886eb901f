"""INT8 backbones: the shipped range table, quantized features, and an int8 version's exported graph."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from models import networks
from models.checkpoint import build_network
from models.config import InvalidTrainConfig
from models.export import export_onnx
from models.features import FeatureExtractor
from models.features_graph import FeaturesOnly, module_to_onnx
from models.preprocess import Preprocessing, preprocess_batch
from models.quantize import NoRangeTable, calibrate, load_table, quantize_features, table_id
from models.train import TrainConfig, train

LITE0 = "efficientnet_lite0"


def _extractor(size=288, pooling="avgmax", precision="int8"):
    arch = {"name": LITE0, "image_size": size, "pooling": pooling, "num_classes": 2}
    return FeatureExtractor(arch, networks.default_preprocessing(LITE0, size), torch.device("cpu"), precision=precision)


def test_the_shipped_table_describes_the_packaged_weights():
    table = load_table(LITE0, networks.default_weights_path(LITE0))
    assert len(table["ranges"]) > 50 and table["calibration"]["images"] >= 100
    assert all(lo <= 0 <= hi for lo, hi in table["ranges"].values())
    assert table_id(table) == table_id(load_table(LITE0, networks.default_weights_path(LITE0)))


def test_no_table_for_other_weights_or_backbones(tmp_path):
    other = tmp_path / "w.pth"
    other.write_bytes(b"not the packaged weights")
    with pytest.raises(NoRangeTable):
        load_table(LITE0, str(other))
    with pytest.raises(NoRangeTable):
        load_table("resnet18", str(other))


@pytest.mark.parametrize("size,pooling", [(288, "avgmax"), (224, "avg")])
def test_int8_features_track_float32_features(photo_bytes, size, pooling):
    """Every quantized tensor has a range at any size and pooling, and the features stay close."""
    int8, fp32 = _extractor(size, pooling), _extractor(size, pooling, "fp32")
    assert "ort-int8w7-" in int8.extractor_id and int8.extractor_id != fp32.extractor_id
    x = preprocess_batch(photo_bytes, int8.prep)
    a, b = int8._run(x), fp32._run(x)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    # quantization noise; with 8-bit weights on a CPU without VNNI (saturating int16 sums) the
    # mean fell to 0.92 (AVX2-only EPYC); 7-bit weights: 0.963 / 0.973 there
    assert cos.mean() > 0.95 and cos.min() > 0.9


def test_int8_weights_fit_in_7_bits_so_no_cpu_saturates_their_sums():
    """ONNX Runtime's u8 x s8 kernels without VNNI sum pairs of products in int16: 8-bit weights
    overflow it (2 x 255 x 127 > 32767) and the answers then depend on the CPU; within +-64 they cannot."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(_extractor(224, "avg").features_onnx).graph
    int8 = [numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8) > 40  # every convolution's weights
    assert all(w.min() >= -64 and w.max() <= 64 for w in int8), [(int(w.min()), int(w.max())) for w in int8][:5]


def test_an_int8_version_serves_exactly_what_its_evaluation_scored(trained, photo_bytes):
    ckpt = trained.checkpoint
    assert ckpt["precision"] == "int8" and trained.metrics["precision"] == "int8"
    assert ckpt["quantization"]["ranges"]
    prep = Preprocessing.from_dict(ckpt["preprocessing"])
    x = preprocess_batch(photo_bytes, prep)
    served = ort.InferenceSession(trained.onnx, providers=["CPUExecutionProvider"]).run(["probabilities"], {"images": x})[0]

    net = build_network(ckpt).eval()  # the head on the extractor's INT8 features = what training scored
    feats = _extractor().__class__(ckpt["architecture"], prep, torch.device("cpu"), precision="int8")._run(x)
    with torch.no_grad():
        expected = torch.softmax(net.head(torch.from_numpy(feats)) / net.temperature, 1).numpy()
    np.testing.assert_allclose(served, expected, atol=1e-5)

    rebuilt = export_onnx(ckpt)  # the checkpoint alone (its range table inside) rebuilds the same graph
    again = ort.InferenceSession(rebuilt, providers=["CPUExecutionProvider"]).run(["probabilities"], {"images": x})[0]
    np.testing.assert_allclose(again, served, atol=1e-6)

    with torch.no_grad():  # and it stays close to the float32 network it was quantized from
        p32 = torch.softmax(net(torch.from_numpy(x)), 1).numpy()
    assert (p32.argmax(1) == served.argmax(1)).all()
    assert np.abs(p32 - served).max() < 0.1


def test_precision_option(small_catvnoncat, tmp_path):
    assert TrainConfig().resolved().precision == "int8"
    assert TrainConfig(mode="finetune").resolved().precision == "fp32"
    assert TrainConfig(architecture="resnet18").resolved().precision == "fp32"
    for bad in ({"precision": "int4"}, {"precision": "int8", "mode": "finetune"}, {"precision": "int8", "architecture": "resnet18"}):
        with pytest.raises(InvalidTrainConfig) as e:
            TrainConfig.from_dict(bad)
        assert e.value.field == "precision"

    resaved = tmp_path / "lite0.pth"  # same values, other bytes: the table cannot vouch for them
    torch.save(torch.load(networks.default_weights_path(LITE0), weights_only=True), resaved)
    samples = small_catvnoncat[:12] + small_catvnoncat[-12:]
    result = train(samples, TrainConfig(image_size=64, cv_folds=2), pretrained_weights=str(resaved))
    assert result.metrics["precision"] == "fp32" and result.checkpoint["quantization"] is None
    with pytest.raises(InvalidTrainConfig) as e:
        train(samples, TrainConfig(image_size=64, precision="int8"), pretrained_weights=str(resaved))
    assert e.value.field == "precision"


def test_calibrate_measures_a_range_for_every_tensor(small_catvnoncat):
    arch = {"name": LITE0, "image_size": 64, "pooling": "avgmax", "num_classes": 2}
    model = networks.build_classifier(arch)
    weights = networks.default_weights_path(LITE0)
    networks.load_pretrained(model.backbone, LITE0, weights)
    graph = module_to_onnx(FeaturesOnly(model.eval()), 64, "features")
    prep = networks.default_preprocessing(LITE0, 64)
    batches = [{"images": preprocess_batch([s.load() for s in small_catvnoncat[i : i + 8]], prep)} for i in (0, 40)]
    table = calibrate(graph, batches, weights, {"images": 16})
    assert table["ranges"] and table["calibration"] == {"images": 16}
    session = ort.InferenceSession(quantize_features(graph, table), providers=["CPUExecutionProvider"])
    assert session.run(["features"], batches[0])[0].shape == (8, 2560)
