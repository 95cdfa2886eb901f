"""Small real checkpoints for tests that need a version to serve without running a worker."""

from __future__ import annotations

from tests.conftest import asset_images


def simple_cnn_checkpoint() -> bytes:
    """A simple_cnn trained for one epoch on the bundled cifar-cat images (a few seconds)."""
    from models.checkpoint import checkpoint_bytes
    from models.features import MemoryFeatureCache
    from models.images import perceptual_hash
    from models.train import Sample, TrainConfig, train

    samples = [Sample(image_id=p.stem + label, sha256=p.stem + label, label=label, phash=perceptual_hash(p.read_bytes()),
                      load=lambda p=p: p.read_bytes())
               for label in ("cat", "noncat") for p in asset_images("train", label)]
    config = TrainConfig(architecture="simple_cnn", image_size=32, epochs=1, export_onnx=False)
    return checkpoint_bytes(train(samples, config, feature_cache=MemoryFeatureCache()).checkpoint)
