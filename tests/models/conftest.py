"""Fixtures for the models package: real images from the shared datasets, small trained models.

FELIS_DATASETS points at the datasets root (default: <repo>/../shared/datasets). Tests that need
images are skipped only when that folder does not exist at all.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from models.features import MemoryFeatureCache
from models.runtime import tune_process
from models.train import Sample, TrainConfig, train

REPO = Path(__file__).resolve().parents[2]
DATASETS = Path(os.environ.get("FELIS_DATASETS", REPO.parent / "shared" / "datasets"))

tune_process(0)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


@pytest.fixture(scope="session")
def datasets() -> Path:
    if not DATASETS.is_dir():
        pytest.skip(f"datasets not found at {DATASETS} (set FELIS_DATASETS)")
    return DATASETS


def image_files(root: Path, split: str, label: str, n: int | None = None, pattern: str = "*") -> list[Path]:
    files = sorted(p for p in (root / split / label).glob(pattern) if p.is_file())
    return files[:n] if n else files


def make_samples(files: list[Path]) -> list[Sample]:
    return [Sample(image_id=f.name, sha256=hashlib.sha256(f.read_bytes()).hexdigest(), label=f.parent.name, load=f.read_bytes) for f in files]


@pytest.fixture(scope="session")
def photo_bytes(datasets) -> list[bytes]:
    """A few real JPEG photos of mixed sources and sizes (cats first, then non-cats)."""
    root = datasets / "photos"
    files = image_files(root, "test", "cat", 3, "kaggle_*") + image_files(root, "test", "cat", 1, "catbreeds_*")
    files += image_files(root, "test", "noncat", 3, "kaggle_*") + image_files(root, "test", "noncat", 1, "imagenet_*")
    return [f.read_bytes() for f in files]


@pytest.fixture(scope="session")
def small_catvnoncat(datasets) -> list[Sample]:
    """40 cats + 40 non-cats from catvnoncat/train (64x64 PNG)."""
    root = datasets / "catvnoncat"
    return make_samples(image_files(root, "train", "cat", 40) + image_files(root, "train", "noncat", 40))


@pytest.fixture(scope="session")
def catvnoncat_train(datasets) -> list[Sample]:
    """All 209 catvnoncat training images."""
    root = datasets / "catvnoncat"
    return make_samples(image_files(root, "train", "cat") + image_files(root, "train", "noncat"))


@pytest.fixture(scope="session")
def catvnoncat_test(datasets) -> list[Sample]:
    root = datasets / "catvnoncat"
    return make_samples(image_files(root, "test", "cat") + image_files(root, "test", "noncat"))


@pytest.fixture(scope="session")
def feature_cache() -> MemoryFeatureCache:
    return MemoryFeatureCache()


@pytest.fixture(scope="session")
def trained(small_catvnoncat, feature_cache):
    """The default configuration (EfficientNet-Lite0 INT8 features, linear head, 288 px) on 80 small images."""
    torch.manual_seed(0)
    return train(small_catvnoncat, TrainConfig(), feature_cache=feature_cache)


@pytest.fixture(scope="session")
def trained_fp32(small_catvnoncat, feature_cache):
    """As `trained`, with float32 features: its ONNX graph must match the torch network to 1e-4."""
    torch.manual_seed(0)
    return train(small_catvnoncat, TrainConfig(precision="fp32"), feature_cache=feature_cache)
