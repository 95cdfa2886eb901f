import pytest
import torch
import torchvision

from models import networks


def test_efficientnet_lite0_pretrained_recognises_a_cat(photo_bytes):
    """The converted ImageNet weights plus our preprocessing give ImageNet predictions:
    the kaggle cat photos land in the cat classes (281-285) among the top 5."""
    from efficientnet_lite_pytorch import EfficientNet

    from models.preprocess import preprocess_batch

    full = EfficientNet.from_name("efficientnet-lite0", image_size=224, num_classes=1000)
    full.load_state_dict(torch.load(networks.default_weights_path("efficientnet_lite0"), map_location="cpu", weights_only=True))
    x = torch.from_numpy(preprocess_batch(photo_bytes[:3], networks.default_preprocessing("efficientnet_lite0", 224)))
    with torch.no_grad():
        top5 = full.eval()(x).topk(5).indices
    assert sum(bool({281, 282, 283, 284, 285} & set(row.tolist())) for row in top5) >= 2


@pytest.mark.parametrize("arch, channels", [("efficientnet_lite0", 1280), ("simple_cnn", 256), ("resnet18", 512), ("mobilenet_v3_small", 576)])
def test_build_classifier_shapes(arch, channels):
    net = networks.build_classifier({"name": arch, "image_size": 64, "pooling": "avgmax", "num_classes": 3}).eval()
    assert net.head.in_features == 2 * channels
    with torch.no_grad():
        assert net.features(torch.zeros(2, 3, 64, 64)).shape == (2, 2 * channels)
        assert net(torch.zeros(2, 3, 64, 64)).shape == (2, 3)
    assert float(net.temperature) == 1.0


def test_unknown_architecture():
    assert not networks.is_supported("vit_b_16") and not networks.is_supported("nonsense")
    with pytest.raises(ValueError):
        networks.build_backbone({"name": "nonsense", "image_size": 64})


def test_torchvision_weights_from_a_local_file(tmp_path):
    """pretrained_weights may be a torchvision state_dict file (downloaded by the operator)."""
    torch.manual_seed(123)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    backbone, _ = networks.build_backbone({"name": "resnet18", "image_size": 64})
    networks.load_pretrained(backbone, "resnet18", str(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        trunk = torch.nn.Sequential(*list(reference.children())[:-2]).eval()
        torch.testing.assert_close(backbone.eval()(x), trunk(x))
    # a file for another network is refused
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), tmp_path / "other.pth")
    with pytest.raises(RuntimeError):
        networks.load_pretrained(backbone, "resnet18", str(tmp_path / "other.pth"))


def test_a_torchvision_backbone_without_a_file_starts_from_torch_hubs_cache(tmp_path, monkeypatch):
    """No pretrained_weights for a torchvision backbone: before, every such training failed
    ("needs a pretrained_weights file path") unless FELIS_PRETRAINED_WEIGHTS named a file, one
    file for every architecture. Now its weights are torchvision's own, from torch.hub's cache
    ($TORCH_HOME/hub/checkpoints, downloaded there when missing); here a file put there by hand,
    as on an offline worker, is the one loaded."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(7)
    reference = torchvision.models.resnet18(weights=None)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"  # torchvision's name for them
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)
    assert networks.default_weights_path("resnet18") == str(cached)
    backbone, _ = networks.build_backbone({"name": "resnet18", "image_size": 64})
    networks.load_pretrained(backbone, "resnet18", None)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        trunk = torch.nn.Sequential(*list(reference.children())[:-2]).eval()
        torch.testing.assert_close(backbone.eval()(x), trunk(x))


def test_weights_that_cannot_be_fetched_say_which_file_goes_where(tmp_path, monkeypatch):
    """The cache cannot hold the file (here its folder is a file: no download is even tried):
    WeightsUnavailable names the file, its URL and TORCH_HOME, not a bare OSError."""
    (tmp_path / "torch").write_text("not a folder")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(networks.WeightsUnavailable) as e:
        networks.default_weights_path("mobilenet_v3_small")
    message = str(e.value)
    assert "mobilenet_v3_small-047dcff4.pth" in message and "https://download.pytorch.org/" in message
    assert str(tmp_path / "torch") in message and "TORCH_HOME" in message


def test_efficientnet_weights_must_match(tmp_path):
    backbone, _ = networks.build_backbone({"name": "efficientnet_lite0", "image_size": 64})
    torch.save({"_conv_stem.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises((ValueError, RuntimeError)):
        networks.load_pretrained(backbone, "efficientnet_lite0", str(tmp_path / "bad.pth"))


def test_weights_are_downloaded_whole_checked_and_never_wait_for_ever(tmp_path):
    """download_weights against a real HTTP server on loopback: the file lands under its name only
    when whole and its sha256 starts with the name's hash; wrong bytes leave nothing; a server that
    accepts and never answers fails after the timeout (torch.hub's download has none: a firewall
    that drops packets held the training until its time limit)."""
    import hashlib
    import http.server
    import socket
    import threading

    payload = b"weights " * 5000
    prefix = hashlib.sha256(payload).hexdigest()[:8]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = payload if self.path.startswith("/good") else b"something else"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts the connection (the kernel does), never answers
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        good = tmp_path / "cache" / f"net-{prefix}.pth"
        networks.download_weights(f"{base}/good", str(good))
        assert good.read_bytes() == payload
        bad = tmp_path / "cache" / f"other-{prefix}.pth"
        with pytest.raises(ValueError, match="sha256"):
            networks.download_weights(f"{base}/bad", str(bad))
        with pytest.raises(OSError):
            networks.download_weights(f"http://127.0.0.1:{silent.getsockname()[1]}/x", str(tmp_path / "cache" / "slow-abcd1234.pth"),
                                      timeout=1.0)
        assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [good.name]  # no half or bad file left
    finally:
        server.shutdown()
        silent.close()
