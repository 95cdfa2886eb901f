import numpy as np
import onnx
import onnxruntime as ort
import torch

from models.checkpoint import build_network
from models.export import export_onnx
from models.features_graph import OPSET
from models.preprocess import Preprocessing, preprocess_batch


def test_onnx_matches_torch_on_real_images(trained_fp32, photo_bytes, catvnoncat_test):
    trained = trained_fp32
    ckpt = trained.checkpoint
    model = onnx.load_from_string(trained.onnx)
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= OPSET
    session = ort.InferenceSession(trained.onnx, providers=["CPUExecutionProvider"])
    prep = Preprocessing.from_dict(ckpt["preprocessing"])
    images = photo_bytes + [s.load() for s in catvnoncat_test[:8]]
    x = preprocess_batch(images, prep)
    with torch.no_grad():
        p_torch = torch.softmax(build_network(ckpt)(torch.from_numpy(x)), 1).numpy()
    for batch in (x[:1], x[1:6], x):  # dynamic batch size
        p_onnx = session.run(["probabilities"], {"images": batch})[0]
        assert p_onnx.shape == (len(batch), 2)
        np.testing.assert_allclose(p_onnx.sum(1), 1, atol=1e-5)
    p_onnx = session.run(["probabilities"], {"images": x})[0]
    assert np.abs(p_onnx - p_torch).max() <= 1e-4


def test_export_of_other_architectures_runs(trained):
    arch = {"name": "simple_cnn", "image_size": 64, "pooling": "avg", "num_classes": 3}
    from models.networks import build_classifier

    net = build_classifier(arch)
    other = {k: v for k, v in trained.checkpoint.items() if k != "ood"}  # its open-set index is of other features
    ckpt = {**other, "architecture": arch, "labels": ["a", "b", "c"], "state_dict": net.state_dict(), "temperature": 1.5,
            "precision": "fp32", "quantization": None}
    session = ort.InferenceSession(export_onnx(ckpt), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(3, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        expected = torch.softmax(build_network(ckpt)(torch.from_numpy(x)), 1).numpy()
    np.testing.assert_allclose(session.run(["probabilities"], {"images": x})[0], expected, atol=1e-5)
