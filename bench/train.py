"""Benchmark the worker's training path on a folder-per-label dataset.

    python bench/train.py ../shared/datasets/photos            # train on <dir>/train, test on <dir>/test
    python bench/train.py DIR --test TESTDIR --cv 5 --architecture simple_cnn --set epochs=40

Runs models.train.train on Samples read from disk (exactly what the worker does), then scores
the held-out folder with the exported model through models.predictor.Predictor, and prints
accuracy overall and per file-name prefix (the source in ../shared/datasets/photos), ECE
before/after calibration, wall time and throughput. --cv K adds K-fold cross-validation on the
training folder (each fold trained the same way, near-duplicates kept within a fold).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.runtime import cpu_count, tune_process  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def load_folder(root: Path):
    """<root>/<label>/<file> -> list of models.train.Sample (bytes read lazily, hashed now)."""
    from models.train import Sample

    samples = []
    for path in sorted(p for p in root.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES):
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        samples.append(Sample(image_id=path.name, sha256=sha, label=path.parent.name, load=path.read_bytes))
    return samples


def prefix(name: str) -> str:
    m = re.match(r"([A-Za-z]+)_", name)
    return m.group(1) + "_" if m else "(none)"


def report(names, y_true, probs, labels, title: str) -> dict:
    from models.evaluate import evaluate

    ev = evaluate(probs, y_true, labels)
    pred = probs.argmax(1)
    print(f"{title}: accuracy {ev['accuracy']:.4f} ({int((pred != y_true).sum())} errors / {len(y_true)}), "
          f"ECE {ev['calibration']['ece']:.4f}, log-loss {ev['loss']:.4f}, ROC AUC {ev['roc_auc']:.4f}")
    by_prefix = {}
    for p in sorted({prefix(n) for n in names}):
        m = np.array([prefix(n) == p for n in names])
        by_prefix[p] = float((pred[m] == y_true[m]).mean())
        print(f"    {p:12s} {by_prefix[p]:.4f}  ({int((pred[m] != y_true[m]).sum())} errors / {int(m.sum())})")
    errors = [f"{names[i]} ({labels[y_true[i]]}->{labels[pred[i]]} {probs[i].max():.2f})" for i in np.flatnonzero(pred != y_true)]
    if errors:
        print("    errors:", ", ".join(errors[:20]) + (" ..." if len(errors) > 20 else ""))
    return {"accuracy": ev["accuracy"], "ece": ev["calibration"]["ece"], "loss": ev["loss"], "per_prefix": by_prefix, "errors": errors}


def run_once(samples, config, args, cache=None):
    from models.train import train

    t = time.perf_counter()
    result = train(samples, config, device=args.device, feature_cache=cache, pretrained_weights=args.weights)
    wall = time.perf_counter() - t
    m = result.metrics
    print(f"train: {len(samples)} images in {wall:.1f} s ({len(samples) / wall:.1f} img/s) | "
          + " ".join(f"{k} {v:.1f}s" for k, v in result.timings.items()))
    print(f"  validation ({m['n_val']} images, {result.evaluation['source']}): accuracy {m['accuracy']:.4f}, "
          f"ECE before {m['ece_before_calibration']:.4f} after {m['ece']:.4f} (T={m['temperature']:.3f}), "
          + (f"l2 {m['l2']}" if "l2" in m else f"epochs {m.get('epochs_run')} best {m.get('best_epoch')}"))
    return result, wall


def predict(checkpoint, onnx, samples, args):
    from models.predictor import Predictor

    pred = Predictor.from_checkpoint(checkpoint, onnx, backend=args.backend)
    t = time.perf_counter()
    answers = [a for i in range(0, len(samples), 32) for a in pred.predict([s.load() for s in samples[i : i + 32]])]
    probs = np.array([[a[label] for label in pred.labels] for a in answers])
    dt = time.perf_counter() - t
    print(f"  predict ({pred.backend}): {len(samples) / dt:.1f} img/s incl. decoding")
    return probs


def _field(assignment: str):
    """'epochs=10' -> ('epochs', 10); values are JSON where they parse, else strings ('augmentation=flip')."""
    key, _, value = assignment.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", type=Path, help="folder with train/ (and test/) or directly <label>/ folders")
    ap.add_argument("--test", type=Path, help="held-out folder-per-label dir (default: <dataset>/test)")
    ap.add_argument("--cv", type=int, default=0, help="also run K-fold cross-validation on the training folder")
    ap.add_argument("--architecture", default=None)
    ap.add_argument("--mode", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=JSON", help="any TrainConfig field, e.g. --set epochs=10")
    ap.add_argument("--weights", help="pretrained_weights file (state_dict of the full ImageNet model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="auto", help="predictor backend for the test set")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)

    tune_process(args.threads)
    from models.train import TrainConfig

    fields = dict(_field(s) for s in args.set)
    if args.architecture:
        fields["architecture"] = args.architecture
    if args.mode:
        fields["mode"] = args.mode
    config = TrainConfig.from_dict(fields)
    train_dir = args.dataset / "train" if (args.dataset / "train").is_dir() else args.dataset
    test_dir = args.test or (args.dataset / "test" if (args.dataset / "test").is_dir() else None)
    samples = load_folder(train_dir)
    print(f"{train_dir}: {len(samples)} images, config {json.dumps({k: v for k, v in config.to_dict().items() if v is not None})}, "
          f"{cpu_count()} threads")
    out = {"dataset": str(args.dataset), "config": config.to_dict()}

    from models.features import MemoryFeatureCache

    cache = MemoryFeatureCache()  # empty: the first run is cold; CV folds reuse its features
    result, wall = run_once(samples, config, args, cache)
    out.update(train_seconds=wall, timings=result.timings, validation=result.metrics)
    labels = result.checkpoint["labels"]
    if test_dir:
        test = [s for s in load_folder(test_dir) if s.label in labels]
        probs = predict(result.checkpoint, result.onnx, test, args)
        y = np.array([labels.index(s.label) for s in test])
        out["test"] = report([s.image_id for s in test], y, probs, labels, f"test {test_dir}")
        uncalibrated = predict({**result.checkpoint, "temperature": 1.0}, None, test, args)  # same model, T = 1
        out["test"]["ece_before_calibration"] = report([s.image_id for s in test], y, uncalibrated, labels, "  (T=1)")["ece"]

    if args.cv:
        from models.images import perceptual_hash
        from models.split import kfold, near_duplicate_groups

        y = np.array([labels.index(s.label) for s in samples])
        for s in samples:  # as the service does at upload: folds then skip hashing
            s.phash = s.phash or perceptual_hash(s.load())
        groups = near_duplicate_groups([s.sha256 for s in samples], [s.phash for s in samples])
        folds = kfold(y, groups, args.cv, seed=config.seed)
        probs = np.zeros((len(samples), len(labels)))
        for f in range(args.cv):
            print(f"-- fold {f + 1}/{args.cv}")
            res, _ = run_once([s for s, k in zip(samples, folds) if k != f], config, args, cache)
            held = [s for s, k in zip(samples, folds) if k == f]
            probs[folds == f] = predict(res.checkpoint, res.onnx, held, args)
        out["cv"] = report([s.image_id for s in samples], y, probs, labels, f"{args.cv}-fold CV on {train_dir}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
