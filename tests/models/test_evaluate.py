import numpy as np
import pytest

from models.evaluate import calibration, evaluate, roc_auc, threshold_for_precision

LABELS = ["cat", "noncat"]


def _binary(p_cat, y):
    p = np.asarray(p_cat, dtype=float)
    return np.stack([p, 1 - p], 1), np.asarray(y)


def test_accuracy_confusion_and_per_label():
    probs, y = _binary([0.9, 0.8, 0.4, 0.3, 0.2, 0.6], [0, 0, 0, 1, 1, 1])
    ev = evaluate(probs, y, LABELS, history=[{"epoch": 1}])
    assert ev["accuracy"] == pytest.approx(4 / 6)
    assert ev["confusion_matrix"] == {"labels": LABELS, "matrix": [[2, 1], [1, 2]]}
    cat = ev["per_label"]["cat"]
    assert cat["precision"] == pytest.approx(2 / 3) and cat["recall"] == pytest.approx(2 / 3) and cat["support"] == 3
    assert cat["f1"] == pytest.approx(2 / 3)
    assert ev["history"] == [{"epoch": 1}] and ev["n"] == 6
    assert ev["loss"] == pytest.approx(-np.mean(np.log([0.9, 0.8, 0.4, 0.7, 0.8, 0.4])))


def test_roc_auc_known_values():
    # 3 positives, 3 negatives; pairs ranked correctly: 8 of 9 (one inversion 0.4 < 0.6)
    probs, y = _binary([0.9, 0.8, 0.4, 0.3, 0.2, 0.6], [0, 0, 0, 1, 1, 1])
    assert evaluate(probs, y, LABELS)["roc_auc"] == pytest.approx(8 / 9)
    assert roc_auc(np.array([0.5, 0.5]), np.array([True, False])) == 0.5  # ties count half
    assert roc_auc(np.array([0.1, 0.2]), np.array([True, True])) is None
    # binary AUC does not depend on which label is "positive"
    ev = evaluate(probs, y, LABELS)
    assert ev["roc_auc_per_label"]["cat"] == pytest.approx(ev["roc_auc_per_label"]["noncat"])


def test_multiclass_macro_auc():
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
    ev = evaluate(probs, np.array([0, 1, 2, 1]), ["a", "b", "c"])
    per = ev["roc_auc_per_label"]
    assert ev["roc_auc"] == pytest.approx(np.mean([per["a"], per["b"], per["c"]]))
    assert ev["accuracy"] == 0.75 and np.array(ev["confusion_matrix"]["matrix"]).sum() == 4


def test_ece_by_hand():
    # confidences 0.9 (correct), 0.9 (wrong), 0.6 (correct), 0.6 (correct)
    probs, y = _binary([0.9, 0.9, 0.6, 0.4], [0, 1, 0, 1])
    cal = calibration(probs, y, n_bins=10)
    expected = 0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6)
    assert cal["ece"] == pytest.approx(expected)
    assert sum(b["count"] for b in cal["bins"]) == 4
    assert cal["brier"] == pytest.approx(np.mean([2 * 0.1**2, 2 * 0.9**2, 2 * 0.4**2, 2 * 0.4**2]))


def test_threshold_curve_and_threshold_for_precision():
    probs, y = _binary([0.95, 0.9, 0.85, 0.7, 0.6, 0.3, 0.2, 0.1], [0, 0, 0, 1, 0, 1, 1, 1])
    ev = evaluate(probs, y, LABELS)
    curve = {round(p["threshold"], 2): p for p in ev["threshold_curve"]["cat"]}
    assert curve[0.8]["precision"] == 1.0 and curve[0.8]["recall"] == 0.75
    assert curve[0.5]["precision"] == 0.8 and curve[0.5]["recall"] == 1.0
    assert threshold_for_precision(ev, "cat", 1.0) == pytest.approx(0.71)
    assert threshold_for_precision(ev, "cat", 0.8) <= 0.6
    perfect_never = evaluate(*_binary([0.4, 0.6], [0, 1]), LABELS)  # cat never gets p >= 0.41 right
    assert threshold_for_precision(perfect_never, "cat", 0.99) is None
