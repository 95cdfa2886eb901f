"""models.catalog: the torch-free list of trainable architectures matches torchvision's."""

import subprocess
import sys

import torchvision

from models import catalog


def test_torchvision_backbones_match_torchvision():
    listed = {n for n in torchvision.models.list_models(torchvision.models) if n.startswith(catalog.TORCHVISION_FAMILIES)}
    assert catalog.TORCHVISION_BACKBONES == listed


def test_validating_a_training_request_does_not_load_torch():
    code = ("import sys; from models.config import TrainConfig; TrainConfig.from_dict({'architecture': 'resnet18'}).validate();"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
