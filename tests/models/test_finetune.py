import pytest
import torch
import torch.nn.functional as F

from models import finetune, networks
from models.finetune import FinetuneParams, augment, train_network
from models.networks import normalizer
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


def augment_image_by_image(x: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """augment() as it was before it became one gather: pad, then slice each image in a loop."""
    n, _, s, _ = x.shape
    if "crop" in mode:
        pad = max(1, s // 16)
        padded = F.pad(x.float(), (pad, pad, pad, pad), mode="reflect").to(x.dtype)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
        x = torch.stack([padded[i, :, dy[i] : dy[i] + s, dx[i] : dx[i] + s] for i in range(n)])
    if "flip" in mode:
        flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    return x


@pytest.mark.parametrize("mode", ["crop+flip", "crop", "flip", "none"])
def test_augment_gives_the_pixels_of_the_image_by_image_crop(mode):
    torch.manual_seed(1)
    for size, dtype, seed in [(16, torch.uint8, 0), (17, torch.uint8, 1), (48, torch.float32, 2), (64, torch.uint8, 3), (5, torch.float32, 4)]:
        x = (torch.rand(11, 3, size, size) * 255).to(dtype)
        gen, ref_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        out = augment(x, mode, gen)
        assert out.dtype == dtype and torch.equal(out, augment_image_by_image(x, mode, ref_gen)), (size, dtype)
        assert torch.equal(torch.rand(3, generator=gen), torch.rand(3, generator=ref_gen))  # as many draws, so later steps match too


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_augment_on_cuda_matches_cpu_without_a_host_sync():
    x = torch.randint(0, 256, (32, 3, 64, 64), dtype=torch.uint8)
    on_cpu = augment(x, "crop+flip", torch.Generator().manual_seed(0))
    x_gpu = x.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_gpu = augment(x_gpu, "crop+flip", torch.Generator().manual_seed(0))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), on_cpu)


def test_cudnn_benchmark_only_around_cuda_training():
    before = torch.backends.cudnn.benchmark
    try:
        for previous in (False, True):
            torch.backends.cudnn.benchmark = previous
            with finetune._cudnn_benchmark(torch.device("cpu")):
                assert torch.backends.cudnn.benchmark is previous
            with finetune._cudnn_benchmark(torch.device("cuda")):
                assert torch.backends.cudnn.benchmark is True
            assert torch.backends.cudnn.benchmark is previous
            with pytest.raises(KeyError), finetune._cudnn_benchmark(torch.device("cuda")):
                raise KeyError
            assert torch.backends.cudnn.benchmark is previous
    finally:
        torch.backends.cudnn.benchmark = before


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


def tiny_simple_cnn_task(n: int):
    """A 4-wide simple_cnn and n random 16 px images: (model, x, y, prep)."""
    torch.manual_seed(0)
    model = networks.build_classifier({"name": "simple_cnn", "image_size": 16, "pooling": "avg", "num_classes": 2, "width": 4})
    x = torch.randint(0, 255, (n, 3, 16, 16), dtype=torch.uint8)
    y = torch.randint(0, 2, (n,))
    return model, x, y, Preprocessing(16, "squash", 1.0, 127.5, 64.0)


def test_time_budget_and_patience_stop_early():
    model, x, y, prep = tiny_simple_cnn_task(16)
    params = FinetuneParams(epochs=50, learning_rate=1e-3, weight_decay=0.0, batch_size=8, augmentation="none", time_budget_s=1e-6)
    _, hist = train_network(model, x, y, x[:4], y[:4], prep, params, torch.device("cpu"), 0, lambda p: None, lambda: None)
    assert len(hist) == 1
    params.time_budget_s, params.patience = None, 2
    _, hist = train_network(model, x, y, x[:4], torch.tensor([1, 0, 1, 0]), prep, params, torch.device("cpu"), 0, lambda p: None, lambda: None)
    assert len(hist) < 50


def test_progress_reads_the_loss_once_per_epoch(monkeypatch):
    model, x, y, prep = tiny_simple_cnn_task(20)
    params = FinetuneParams(epochs=2, learning_rate=1e-3, weight_decay=0.0, batch_size=8, augmentation="crop+flip")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    events = []
    _, hist = train_network(model, x, y, x[:0], y[:0], prep, params, torch.device("cpu"), 0, events.append, lambda: None)
    assert torch.backends.cudnn.benchmark is False  # not switched on for CPU training
    steps = [e for e in events if "step" in e]
    assert len(steps) == 2 * 3 and all("loss" not in e for e in steps)  # no host sync per step
    ends = [e for e in events if "step" not in e]
    assert [e["loss"] for e in ends] == [h["train_loss"] for h in hist]
    assert all(type(h["train_loss"]) is float and h["train_loss"] > 0 for h in hist)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 8])
def test_a_run_of_very_few_steps_trains(steps):
    """A small dataset with few epochs (a first try through the API: 120 photos, epochs 2, batch 64
    gives 4 steps) once crashed in the learning-rate schedule with ZeroDivisionError."""
    model, x, y, prep = tiny_simple_cnn_task(8 * steps)
    params = FinetuneParams(epochs=1, learning_rate=1e-3, weight_decay=0.0, batch_size=8, augmentation="none")
    _, hist = train_network(model, x, y, x[:4], y[:4], prep, params, torch.device("cpu"), 0, lambda p: None, lambda: None)
    assert len(hist) == 1 and hist[0]["train_loss"] > 0
