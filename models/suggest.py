"""What a trained version says about images it was not trained on: its probabilities and open-set
scores, for suggesting labels to unlabeled images (issue 15).

    probs, scores = suggest(ckpt, sha256s, loads, cache=feature_cache)

A linear version whose frozen features this process computes the same way (the extractor id its
training recorded) answers from the feature cache, filling it for the images it has not seen:
the backbone runs once per image, whichever version asks, and a later training that labels these
images finds their features cached. Any other version (fine-tuned, simple_cnn, another
backbone's weights) runs its whole network (Predictor.from_checkpoint: the served ONNX graph when
given). Either way the answer is what predict would say: the temperature-scaled probabilities and
the open-set score of models/ood.py (NaN for a version without an index).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from . import calibrate
from .checkpoint import ood_index
from .features import FeatureCache, cached_features, warm_extractor
from .preprocess import Preprocessing
from .runtime import resolve_device

BATCH = 32  # images decoded and run at once on the network path


def suggest(ckpt: dict, sha256s: list[str], loads: list[Callable[[], bytes]], *, cache: FeatureCache | None = None,
            onnx: bytes | None = None, device: str = "cpu", weights: str | None = None,
            should_stop: Callable[[], None] = lambda: None) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N, K) float32 in ckpt["labels"] order, open-set scores (N,) float32).
    Images that cannot be decoded raise models.images.InvalidImage (stored images were checked at upload)."""
    if not sha256s:
        return np.zeros((0, len(ckpt["labels"])), np.float32), np.zeros(0, np.float32)
    extractor = _same_extractor(ckpt, device, weights)
    if extractor is None:
        return _through_the_network(ckpt, loads, onnx, device, should_stop)
    X, _ = cached_features(extractor, sha256s, loads, cache, should_stop=should_stop)
    state = ckpt["state_dict"]
    w, b = state["head.weight"].float().numpy(), state["head.bias"].float().numpy()
    probs = calibrate.softmax(X @ w.T + b, float(ckpt["temperature"])).astype(np.float32)
    index = ood_index(ckpt)
    scores = index.score(X).astype(np.float32) if index is not None else np.full(len(X), np.nan, np.float32)
    return probs, scores


def _same_extractor(ckpt: dict, device: str, weights: str | None):
    """The warm extractor of a linear version's features, if this process computes them as its training did."""
    recorded = (ckpt.get("metrics") or {}).get("feature_extractor")
    if ckpt.get("mode") != "linear" or not recorded:
        return None
    cfg = ckpt.get("training_config") or {}
    try:
        extractor = warm_extractor(ckpt["architecture"], Preprocessing.from_dict(ckpt["preprocessing"]), resolve_device(device),
                                   weights, batch_size=int(cfg.get("batch_size") or 32), precision=ckpt.get("precision", "fp32"))
    except Exception:  # weights or range table not available here: the network path still works
        return None
    return extractor if extractor.extractor_id == recorded else None


def _through_the_network(ckpt, loads, onnx, device, should_stop) -> tuple[np.ndarray, np.ndarray]:
    from .predictor import Predictor

    predictor = Predictor.from_checkpoint(ckpt, onnx=onnx, device=device, threads=torch.get_num_threads())
    k = len(ckpt["labels"])
    out = np.zeros((len(loads), k + 1), np.float32)
    for start in range(0, len(loads), BATCH):
        should_stop()
        batch = np.stack([predictor.preprocess(load()) for load in loads[start:start + BATCH]])
        out[start:start + len(batch)] = predictor.infer_scored(batch)
    return out[:, :k], out[:, k]
