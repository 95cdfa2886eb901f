"""What train() is given (Sample), hands a mode's fit (Job: fit_linear.py, fit_finetune.py) and gets back (Fitted)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .config import TrainConfig
from .heldout import LabelReport
from .ood import OodIndex
from .preprocess import Preprocessing


@dataclass
class Sample:
    image_id: str  # the service's id, echoed in evaluation["mistakes"]
    sha256: str  # hex digest of the bytes: feature-cache key and exact-duplicate detection
    label: str
    load: Callable[[], bytes]  # returns the image bytes (called only when needed)
    phash: str | None = None  # 16-hex perceptual hash; computed here when missing


@dataclass
class Job:
    """Everything one run needs, handed to the mode-specific fit (fit_linear / fit_finetune)."""

    samples: list[Sample]
    y: np.ndarray  # label index per sample
    tr: np.ndarray  # indices of the training split
    va: np.ndarray  # indices of the validation split
    groups: np.ndarray  # near-duplicate group per sample
    cfg: TrainConfig  # resolved: no None left
    arch: dict  # networks.build_classifier argument
    prep: Preprocessing
    device: torch.device
    progress: Callable[[dict], None]
    stop: Callable[[], None]  # raises TrainingCancelled
    timings: dict


@dataclass
class Fitted:
    net: torch.nn.Module  # trained network (head set, temperature not yet)
    eval_logits: np.ndarray  # held-out logits before temperature
    eval_probs: np.ndarray  # held-out calibrated probabilities (honest: T not fitted on them)
    eval_y: np.ndarray
    eval_ids: list[str]
    source: str  # "validation" | "cross_validation" | "none"
    temperature: float
    history: list[dict]
    extra: dict  # mode-specific metrics
    features_onnx: bytes | None = None  # linear: the features graph the head was fitted on (reused by export)
    quantization: dict | None = None  # int8: the range table (quantize.py) the features graph was built with
    ood: OodIndex | None = None  # the open-set index over the shipped model's features of the training images
    ood_report: dict = field(default_factory=dict)  # how it was calibrated; the validation images' flagged share
    label_report: LabelReport | None = None  # linear with cross-validation (heldout.py)


def ood_dims(cfg: TrainConfig, width: int) -> int:
    """The feature columns the open-set score uses: the average-pooled half of avgmax features
    (the max-pooled half separated worse, bench/ood.py), else all of them."""
    return width // 2 if cfg.pooling == "avgmax" else width
