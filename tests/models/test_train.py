import numpy as np
import pytest

from models import linear
from models.features import MemoryFeatureCache
from models.predictor import Predictor
from models.train import InvalidTrainConfig, Sample, TrainConfig, TrainingCancelled, train


def test_default_training_on_a_small_catvnoncat_subset(trained, catvnoncat_test):
    m, ev, ck = trained.metrics, trained.evaluation, trained.checkpoint
    assert m["mode"] == "linear" and ck["architecture"]["image_size"] == 288 and ck["architecture"]["pooling"] == "avgmax"
    assert m["n_train"] + m["n_val"] == 80 and m["n_val"] == 12
    assert m["accuracy"] >= 0.8 and 0 <= m["ece"] <= 0.3 and m["roc_auc"] >= 0.8
    assert m["l2"] in linear.L2_GRID and 0.05 <= m["temperature"] <= 20
    assert 0.8 <= m["cv_accuracy"] <= 1 and 0 <= m["cv_ece"] <= 0.3
    assert ev["source"] == "validation" and ev["ece_before_calibration"] is not None
    assert [h["l2"] for h in ev["history"]] == list(linear.L2_GRID)
    import json

    import onnx

    json.dumps({"metrics": m, "evaluation": ev, "config": ck["training_config"]})  # stored as JSON by the service
    graph = onnx.load_from_string(trained.onnx).graph
    assert [i.name for i in graph.input] == ["images"] and [o.name for o in graph.output] == ["probabilities", "ood_score"]
    # 80 training images generalise to the real test set
    pred = Predictor.from_checkpoint(ck, trained.onnx)
    probs = np.array([[d[label] for label in pred.labels] for d in pred.predict([s.load() for s in catvnoncat_test])])
    y = np.array([pred.labels.index(s.label) for s in catvnoncat_test])
    assert (probs.argmax(1) == y).mean() >= 0.9


def test_progress_phases_and_feature_cache(small_catvnoncat, trained, feature_cache):
    events = []
    res = train(small_catvnoncat, TrainConfig(export_onnx=False), feature_cache=feature_cache, progress=events.append)
    phases = [e["phase"] for e in events]
    assert phases.index("features") < phases.index("training") < phases.index("calibrating") < phases.index("evaluating")
    assert "exporting" not in phases and res.onnx is None
    assert res.metrics["features_computed"] == 0  # all came from the cache filled by the fixture
    same = lambda m: {k: v for k, v in m.items() if k != "features_computed"}  # noqa: E731
    assert same(res.metrics) == same(trained.metrics)  # cached features give the same model


def test_same_seed_same_metrics_and_other_seed_other_split(small_catvnoncat):
    cfg = TrainConfig(image_size=96, export_onnx=False)
    a = train(small_catvnoncat, cfg, feature_cache=None)  # features computed twice, cold
    b = train(small_catvnoncat, cfg, feature_cache=None)
    assert a.metrics == b.metrics and a.evaluation == b.evaluation
    for k, v in a.checkpoint["state_dict"].items():
        assert np.array_equal(v.numpy(), b.checkpoint["state_dict"][k].numpy()), k
    c = train(small_catvnoncat, TrainConfig(image_size=96, export_onnx=False, seed=1))
    assert c.evaluation["validation_image_ids"] != a.evaluation["validation_image_ids"]


def test_cancellation_raises(small_catvnoncat):
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(TrainingCancelled):
        train(small_catvnoncat, TrainConfig(image_size=64), should_stop=should_stop, feature_cache=MemoryFeatureCache())


def test_refuses_single_label_or_too_few_images(small_catvnoncat):
    with pytest.raises(InvalidTrainConfig) as e:
        train([s for s in small_catvnoncat if s.label == "cat"], TrainConfig())
    assert e.value.field == "samples"


def test_near_duplicates_stay_out_of_validation(small_catvnoncat):
    """An image duplicated under another id (same bytes) lands on the same side of the split."""
    from dataclasses import replace

    dup = [replace(s, image_id=s.image_id + "-copy") for s in small_catvnoncat[:40]]
    res = train(small_catvnoncat + dup, TrainConfig(image_size=64, export_onnx=False), feature_cache=MemoryFeatureCache())
    val_ids = set(res.evaluation["validation_image_ids"])
    assert res.metrics["n_groups"] == 80 and len(val_ids) == 18  # 15% of 80 cats (pairs) + 40 non-cats
    assert res.metrics["features_computed"] == 80  # each distinct image once
    for s in small_catvnoncat[:40]:  # an original and its copy: both in validation or neither
        assert (s.image_id in val_ids) == (s.image_id + "-copy" in val_ids)


def test_torchvision_architecture_with_local_weights(small_catvnoncat, tmp_path):
    import torch
    import torchvision

    torch.manual_seed(0)
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    res = train(small_catvnoncat, TrainConfig(architecture="resnet18", image_size=64, export_onnx=False), pretrained_weights=str(path))
    assert res.checkpoint["architecture"]["name"] == "resnet18"
    assert res.checkpoint["preprocessing"]["mean"] == [123.675, 116.28, 103.53]
    assert res.metrics["feature_extractor"].startswith("resnet18-64px")


def test_without_a_validation_split(small_catvnoncat, feature_cache):
    """val_fraction=0: the linear head is scored on its out-of-fold CV predictions instead."""
    res = train(small_catvnoncat, TrainConfig(val_fraction=0.0, export_onnx=False), feature_cache=feature_cache)
    assert res.evaluation["source"] == "cross_validation" and res.metrics["n_val"] == 0
    assert res.evaluation["n"] == 80 and res.metrics["accuracy"] >= 0.8 and not res.metrics["refit_full"]
    ft = train(small_catvnoncat[:8] + small_catvnoncat[-8:], TrainConfig(architecture="simple_cnn", width=4, epochs=1, val_fraction=0.0, export_onnx=False))
    assert ft.evaluation["source"] == "none" and ft.metrics["accuracy"] is None and ft.metrics["temperature"] == 1.0


def test_one_process_trains_two_labels_then_three(small_catvnoncat):
    """A worker keeps its warm extractor between trainings: a dataset with more labels than the
    last one it trained must still get a head of its own size (it raised a shape error)."""
    cfg = TrainConfig(image_size=64, export_onnx=False)
    two = train(small_catvnoncat, cfg, feature_cache=MemoryFeatureCache())
    three_labels = [Sample(s.image_id, s.sha256, "cat" if s.label == "cat" else ("dog" if i % 2 else "noncat"), s.load)
                    for i, s in enumerate(small_catvnoncat)]
    three = train(three_labels, cfg, feature_cache=MemoryFeatureCache())
    assert two.metrics["labels"] == ["cat", "noncat"] and three.metrics["labels"] == ["cat", "dog", "noncat"]
    assert tuple(three.checkpoint["state_dict"]["head.weight"].shape)[0] == 3
    again = train(small_catvnoncat, cfg, feature_cache=MemoryFeatureCache())  # and back to two
    assert tuple(again.checkpoint["state_dict"]["head.weight"].shape)[0] == 2
