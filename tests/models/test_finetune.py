import torch

from models import networks
from models.finetune import FinetuneParams, augment, normalizer, train_network
from models.preprocess import Preprocessing
from models.train import TrainConfig, train


def test_augment_is_seeded_and_shape_preserving():
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16).to(torch.uint8)
    a = augment(x, "crop+flip", torch.Generator().manual_seed(0))
    b = augment(x, "crop+flip", torch.Generator().manual_seed(0))
    assert a.shape == x.shape and a.dtype == x.dtype and torch.equal(a, b)
    assert torch.equal(augment(x, "none", torch.Generator()), x)
    flipped = augment(x, "flip", torch.Generator().manual_seed(0))
    for i in range(2):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(2))


def test_normalizer_matches_preprocessing():
    prep = Preprocessing(8, "squash", 1.0, (10.0, 20.0, 30.0), (2.0, 4.0, 5.0))
    x = torch.full((1, 3, 8, 8), 50, dtype=torch.uint8)
    out = normalizer(prep, torch.device("cpu"))(x)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([20.0, 7.5, 4.0]))


def test_one_epoch_finetune_of_efficientnet_on_a_tiny_set(small_catvnoncat):
    samples = small_catvnoncat[:12] + small_catvnoncat[-12:]
    events = []
    cfg = TrainConfig(mode="finetune", epochs=1, image_size=64, batch_size=8, export_onnx=False)
    res = train(samples, cfg, progress=events.append)
    again = train(samples, cfg)  # reproducible: same seed, same weights
    assert res.metrics == again.metrics
    for k, v in res.checkpoint["state_dict"].items():
        assert torch.equal(v, again.checkpoint["state_dict"][k]), k
    assert res.metrics["mode"] == "finetune" and res.metrics["epochs_run"] == 1
    assert any(e["phase"] == "training" and e.get("step") for e in events)
    ref = networks.build_classifier(res.checkpoint["architecture"])
    networks.load_pretrained(ref.backbone, "efficientnet_lite0", None)
    changed = [k for k, v in ref.state_dict().items() if k.startswith("backbone") and v.dtype.is_floating_point and not torch.equal(v, res.checkpoint["state_dict"][k])]
    assert changed  # the backbone was trained, not frozen


def test_time_budget_and_patience_stop_early():
    torch.manual_seed(0)
    model = networks.build_classifier({"name": "simple_cnn", "image_size": 16, "pooling": "avg", "num_classes": 2, "width": 4})
    x = torch.randint(0, 255, (16, 3, 16, 16), dtype=torch.uint8)
    y = torch.randint(0, 2, (16,))
    prep = Preprocessing(16, "squash", 1.0, 127.5, 64.0)
    params = FinetuneParams(epochs=50, learning_rate=1e-3, weight_decay=0.0, batch_size=8, augmentation="none", time_budget_s=1e-6)
    _, hist = train_network(model, x, y, x[:4], y[:4], prep, params, torch.device("cpu"), 0, lambda p: None, lambda: None)
    assert len(hist) == 1
    params.time_budget_s, params.patience = None, 2
    _, hist = train_network(model, x, y, x[:4], torch.tensor([1, 0, 1, 0]), prep, params, torch.device("cpu"), 0, lambda p: None, lambda: None)
    assert len(hist) < 50
