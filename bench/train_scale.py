"""Warm retraining at scale (issue 17): models.train.train on CIFAR-10 cats vs the rest, every
feature already cached, at 2,000, 10,000 and 50,000 images.

    python bench/train_scale.py --features /tmp/felis-scale/cifar50k-features.npz [--sizes 2000 10000 50000]
                                [--code DIR] [--runs 1]

--features: the 50,000 CIFAR-10 training images' features, computed once with felis's own default
extractor (models.features.warm_extractor with the resolved default TrainConfig: EfficientNet-Lite0
INT8, 288 px, avgmax, 2560 values) by `--extract DIR` (DIR: the unpacked cifar10-train.tar.gz, under
/tmp, never in the project), with each image's sha256 and pHash (a service computes both at upload).

Each size runs in a child process of its own (peak RSS = the child's ru_maxrss, as the worker's
would be): tune_process as the worker, a stratified random subset of the 50,000 (seed 0; the
class proportions of CIFAR: 10% cats), a feature cache that reads each row from a float32 file
with pread (outside the process, as the service's database cache is: its rows are not counted in
the child's memory until training asks for them), the default TrainConfig. Printed per size:
train() seconds by phase (TrainResult.timings), peak RSS, the CV accuracy (train split, out of fold)
and the validation accuracy (the 15% split the head never saw). --code DIR runs another checkout's
models/ package (the code before a change), same features, same cache. --tile N times N synthetic
images made from the real ones (fewer than N: each real row and noisy copies of it, see tile()),
for a size whose features were not all extracted: every row of the table says "synthetic N from M real".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class FileFeatureCache:
    """FeatureCache over a raw float32 file (row i of the features at byte i * dim * 4): get_many
    reads the rows it is asked for and nothing else; put_many is ignored (everything is cached)."""

    def __init__(self, path: Path, extractor_id: str, index: dict[str, int], dim: int):
        self.fd, self.extractor_id, self.index, self.dim = os.open(path, os.O_RDONLY), extractor_id, index, dim

    def get_many(self, extractor_id, sha256s):
        import numpy as np

        if extractor_id != self.extractor_id:
            return {}
        size = self.dim * 4
        return {s: np.frombuffer(os.pread(self.fd, size, self.index[s] * size), dtype="<f4").copy() for s in sha256s if s in self.index}

    def put_many(self, extractor_id, features):
        pass


def extract(images: Path, out: Path) -> None:
    """The 50,000 features with felis's default extractor, and each image's sha256 and pHash."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from models import networks
    from models.config import TrainConfig
    from models.features import warm_extractor
    from models.images import perceptual_hash
    from models.runtime import tune_process

    tune_process(0)
    files = sorted(images.rglob("*.jpg"))
    cfg = TrainConfig().resolved()
    arch = {"name": cfg.architecture, "image_size": cfg.image_size, "pooling": cfg.pooling, "num_classes": 2}
    prep = networks.default_preprocessing(cfg.architecture, cfg.image_size, cfg.resize, cfg.crop_fraction)
    ex = warm_extractor(arch, prep, torch.device("cpu"), None, batch_size=cfg.batch_size, precision=cfg.precision)
    data = [p.read_bytes() for p in files]
    X = ex.extract([(lambda b=b: b) for b in data])
    np.savez(out, features=X.astype(np.float16), sha256=np.array([hashlib.sha256(b).hexdigest() for b in data]),
             phash=np.array([perceptual_hash(b) for b in data]), cls=np.array([p.parent.name for p in files]),
             names=np.array([f"{p.parent.name}/{p.name}" for p in files]), extractor_id=ex.extractor_id)


def child(spec: dict) -> dict:
    """One warm training of spec["n"] images, in this process."""
    import numpy as np

    sys.path.insert(0, spec["code"])
    from models.runtime import tune_process
    from models.train import Sample, TrainConfig, train

    tune_process(0)
    from models import linear

    if spec.get("trace") and hasattr(linear, "TRACE"):
        linear.TRACE = []
    with np.load(spec["features"]) as z:  # every array once (an npz reads a key again at each access)
        data = {k: z[k] for k in ("sha256", "phash", "cls", "names", "extractor_id")}
        dim = z["features"].shape[1]
    n_all = len(data["sha256"])
    cats = np.flatnonzero(data["cls"] == "cat")
    rest = np.flatnonzero(data["cls"] != "cat")
    rng = np.random.default_rng(0)
    n_cat = round(spec["n"] * len(cats) / n_all)
    pick = np.sort(np.concatenate([rng.permutation(cats)[:n_cat], rng.permutation(rest)[: spec["n"] - n_cat]]))
    raw = Path(spec["raw"])
    index = {s: i for i, s in enumerate(data["sha256"].tolist())}
    cache = FileFeatureCache(raw, str(data["extractor_id"]), index, dim)

    def no_bytes():
        raise AssertionError("every feature is cached: no image is read")

    names, shas, classes, phashes = (data[k].tolist() for k in ("names", "sha256", "cls", "phash"))
    samples = [Sample(image_id=names[i], sha256=shas[i], label="cat" if classes[i] == "cat" else "noncat", load=no_bytes, phash=phashes[i])
               for i in pick]
    del data
    t = time.perf_counter()
    res = train(samples, TrainConfig(), feature_cache=cache)
    wall = time.perf_counter() - t
    m = res.metrics
    return {"n": spec["n"], "wall": wall, "timings": res.timings, "cv_accuracy": m.get("cv_accuracy"), "val_accuracy": m["accuracy"],
            "l2": m.get("l2"), "temperature": m["temperature"], "label_issues": m.get("label_issues"), "n_val": m["n_val"],
            "trace": getattr(linear, "TRACE", None)}


def measure(n: int, features: Path, raw: Path, code: str, trace: bool = False) -> dict:
    from training_memory import child_peak  # bench/, this script's folder: the same child-and-ru_maxrss measurement

    spec = {"n": n, "features": str(features), "raw": str(raw), "code": code, "trace": trace}
    return child_peak([sys.executable, __file__, "--child", json.dumps(spec)], "/tmp", f"{n} images")


def tile(features: Path, n: int, noise: float = 0.1, seed: int = 0) -> Path:
    """A synthetic set of n images from the real ones of `features` (fewer than n): copy 0 of each
    is the real row, copy r > 0 the real row plus Gaussian noise of `noise` x each dimension's
    standard deviation (clipped at 0, as the pooled features are), with its own sha256 and the
    original's pHash (so the split keeps the copies of an image together, as near-duplicates).
    Written beside `features` (once); for timing at a size whose features were not extracted."""
    import numpy as np

    out = features.with_name(f"{features.stem}-synthetic{n}.npz")
    if out.exists():
        return out
    with np.load(features) as z:
        data = {k: z[k] for k in z.files}
    X = data.pop("features")
    n_real = len(X)
    rng = np.random.default_rng(seed)
    std = X.astype(np.float32).std(0)
    copies = -(-n // n_real)
    feats = [X] + [np.maximum(0, X + rng.standard_normal(X.shape, dtype=np.float32) * (noise * std)).astype(np.float16) for _ in range(1, copies)]
    sha = [data["sha256"]] + [np.array([hashlib.sha256(f"{s}:{r}".encode()).hexdigest() for s in data["sha256"]]) for r in range(1, copies)]
    names = [data["names"]] + [np.char.add(data["names"], f"#{r}") for r in range(1, copies)]
    np.savez(out, features=np.concatenate(feats)[:n], sha256=np.concatenate(sha)[:n], phash=np.tile(data["phash"], copies)[:n],
             cls=np.tile(data["cls"], copies)[:n], names=np.concatenate(names)[:n], extractor_id=data["extractor_id"], real=n_real)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=Path, default=Path("/tmp/felis-scale/cifar50k-features.npz"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000, 50000])
    ap.add_argument("--code", default=str(ROOT), help="the checkout whose models/ package trains (default: this one)")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--extract", type=Path, help="compute --features from the unpacked CIFAR-10 training images in this folder")
    ap.add_argument("--tile", type=int, metavar="N", help="time on N synthetic images tiled from --features' real ones (fewer than N): "
                    "each real row and noisy copies of it (tile()); the table says so")
    ap.add_argument("--trace", action="store_true", help="print every joint fit of the head (linear.TRACE: heads, rows, passes, seconds)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return
    if args.extract:
        extract(args.extract, args.features)
    import numpy as np

    label = "real"
    if args.tile:
        with np.load(args.features) as z:
            n_real = len(z["sha256"])
        args.features = tile(args.features, args.tile)
        label = f"synthetic {args.tile} from {n_real} real"
    raw = args.features.with_suffix(".f32")
    if not raw.exists():
        np.load(args.features)["features"].astype("<f4").tofile(raw)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "?")
    print(f"# {cpu}, {os.cpu_count()} cores, load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}; code: {args.code}; features: {args.features} ({label})")
    phases = ("split", "features", "head_select", "head_folds", "label_report", "head_refit", "head", "ood", "evaluate", "export", "total")
    print("| images | " + " | ".join(phases) + " | wall s | peak RSS MiB | l2 | CV acc | val acc |")
    print("|" + "---|" * (len(phases) + 6))
    for n in args.sizes:
        for _ in range(args.runs):
            r = measure(n, args.features, raw, args.code, args.trace)
            cells = [f"{r['timings'][p]:.1f}" if p in r["timings"] else "-" for p in phases]
            cv = f"{r['cv_accuracy']:.4f}" if r["cv_accuracy"] is not None else "-"
            print(f"| {n}{'' if label == 'real' else ' (' + label + ')'} | " + " | ".join(cells) + f" | {r['wall']:.1f} | {r['peak_rss'] / 2**20:.0f} | {r['l2']} | {cv} | {r['val_accuracy']:.4f} |", flush=True)
            for fit in r.get("trace") or []:
                print(f"#   fit: {fit['heads']} heads over {fit['rows']} rows, {fit['passes']} passes, {fit['seconds']:.2f} s", flush=True)


if __name__ == "__main__":
    main()
