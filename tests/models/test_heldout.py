"""models.heldout through models.train: a default linear training on 60 + 60 kaggle_ photos of
photos/train with 3 labels of each kind flipped reports them, and drops them when asked (or when
cross-validation says it helps); the per-version blob round-trips."""

from __future__ import annotations

import numpy as np
import pytest

from models import label_issues as li
from models.config import InvalidTrainConfig, TrainConfig
from models.features import MemoryFeatureCache
from models.train import train

from .conftest import image_files, make_samples

FLIPS_PER_LABEL = 3


@pytest.fixture(scope="module")
def noisy(datasets):
    root = datasets / "photos"
    samples = make_samples(image_files(root, "train", "cat", 60, "kaggle_*") + image_files(root, "train", "noncat", 60, "kaggle_*"))
    rng = np.random.default_rng(3)
    flipped = set()
    for label, other in (("cat", "noncat"), ("noncat", "cat")):
        members = [i for i, s in enumerate(samples) if s.label == label]
        for i in rng.choice(members, FLIPS_PER_LABEL, replace=False):
            flipped.add(samples[i].image_id)
            samples[i].label = other
    return samples, flipped, MemoryFeatureCache()


def _flagged(result, samples) -> list[str]:
    return [samples[i].image_id for i, _, _ in result.label_report.issues]


def test_a_training_reports_the_flipped_labels(noisy):
    samples, flipped, cache = noisy
    res = train(samples, TrainConfig(label_issues="keep"), feature_cache=cache)
    report = res.label_report
    assert report is not None and report.probabilities.shape == (len(samples), 2)
    np.testing.assert_allclose(report.probabilities.sum(1), 1.0, atol=1e-4)
    found = _flagged(res, samples)
    assert len(flipped & set(found)) >= len(flipped) - 1, (sorted(flipped), found)  # recall >= 5/6
    assert len(found) <= len(flipped) + 3
    labels = res.metrics["labels"]
    for i, s, score in report.issues:  # a flip's suggestion is its true label
        if samples[i].image_id in flipped:
            assert labels[s] != samples[i].label and 0.5 < score <= 1.0
    assert report.dropped is None and res.evaluation["label_issues"]["dropped"] == 0
    assert res.metrics["label_issues"] == len(found) == res.evaluation["label_issues"]["count"]


def test_drop_leaves_the_flagged_images_out_of_the_shipped_head(noisy):
    samples, flipped, cache = noisy
    kept = train(samples, TrainConfig(label_issues="keep"), feature_cache=cache)
    dropped = train(samples, TrainConfig(label_issues="drop"), feature_cache=cache)
    auto = train(samples, TrainConfig(), feature_cache=cache)
    mask = dropped.label_report.dropped
    assert mask is not None and mask.sum() == len(dropped.label_report.issues) > 0
    assert dropped.evaluation["label_issues"]["dropped"] == int(mask.sum())
    w_kept = kept.checkpoint["state_dict"]["head.weight"]
    w_dropped = dropped.checkpoint["state_dict"]["head.weight"]
    assert not np.allclose(w_kept.numpy(), w_dropped.numpy())
    s = auto.evaluation["label_issues"]
    assert s["policy"] == "auto" and s["cv_loss_all"] is not None
    # auto drops exactly when the heads without the suspects scored better out of fold
    assert (s["dropped"] > 0) == (s["cv_loss_without"] is not None and s["cv_loss_without"] < s["cv_loss_all"])


def test_fine_tuned_versions_have_no_report(small_catvnoncat):
    res = train(small_catvnoncat, TrainConfig(architecture="simple_cnn", epochs=1, export_onnx=False))
    assert res.label_report is None and "label_issues" not in res.evaluation


def test_the_policy_is_validated():
    with pytest.raises(InvalidTrainConfig, match="label_issues"):
        TrainConfig.from_dict({"label_issues": "sometimes"})


def test_the_blob_round_trips_and_refuses_anything_else():
    P = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], np.float32)
    data = li.pack_heldout(["a" * 32, "b" * 32, "c" * 32], ["cat", "dog"], np.array([0, 0, 1]), P, [(1, 1, 0.8), (2, 0, 0.6)])
    out = li.unpack_heldout(data)
    assert out["image_ids"] == ["a" * 32, "b" * 32, "c" * 32] and out["labels"] == ["cat", "dog"]
    assert out["probabilities"].dtype == np.float16 and np.allclose(out["probabilities"], P, atol=1e-3)
    assert out["issue_rows"].tolist() == [1, 2] and out["issue_suggested"].tolist() == [1, 0]
    assert np.allclose(out["issue_scores"], [0.8, 0.6])
    for junk in (b"", b"PK\x03\x04junk", data[: len(data) // 2]):
        with pytest.raises(ValueError):
            li.unpack_heldout(junk)
    import io
    buf = io.BytesIO()
    np.savez(buf, format=np.array([1]), image_ids=np.array([{"x": 1}], dtype=object))  # a pickled object: never loaded
    with pytest.raises(ValueError):
        li.unpack_heldout(buf.getvalue())
