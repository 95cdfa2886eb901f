"""Measure a training's peak memory, to calibrate models/memory.py (the estimate the API refuses
training options with).

    python bench/training_memory.py ../shared/datasets/photos          # the measurement table
    python bench/training_memory.py --table                            # models/memory.py's ARCHITECTURES

Each configuration runs models.train.train, as the worker does (tune_process, the same call), in a
child process of its own on real images from DIR/train (balanced across labels); the peak
resident set of the child (os.wait4's ru_maxrss) is printed beside models.memory's estimate.
"base" is a child that imports the training code and trains nothing; "features N" trains the
default linear head on N synthetic cached features (no images decoded), as a retrain whose
features are all in the cache does, to measure the head's share per image.

--table profiles every architecture on PyTorch's meta device (no weights, no compute): the
parameter count, the feature channels, and per image at 224 px the bytes autograd saves for the
backward pass and the largest single activation.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name, number of images, TrainConfig options
CONFIGS: list[tuple[str, int, dict]] = [
    ("base", 0, {}),
    ("linear default", 300, {}),
    ("linear batch 128", 300, {"batch_size": 128}),
    ("linear 512 px", 150, {"image_size": 512}),
    ("features 5000", 5000, {}),
    ("features 20000", 20000, {}),
    ("finetune batch 16", 128, {"mode": "finetune", "epochs": 1, "batch_size": 16}),
    ("finetune batch 32", 128, {"mode": "finetune", "epochs": 1, "batch_size": 32}),
    ("finetune batch 64", 128, {"mode": "finetune", "epochs": 1, "batch_size": 64}),
    ("finetune 320 px", 96, {"mode": "finetune", "epochs": 1, "batch_size": 32, "image_size": 320}),
    ("simple_cnn default", 1200, {"architecture": "simple_cnn", "epochs": 2}),
    ("simple_cnn 256 px", 400, {"architecture": "simple_cnn", "epochs": 1, "batch_size": 32, "image_size": 256}),
    ("resnet50 linear", 100, {"architecture": "resnet50"}),
    ("resnet50 finetune batch 8", 48, {"architecture": "resnet50", "mode": "finetune", "epochs": 1, "batch_size": 8}),
    ("resnet50 finetune batch 16", 48, {"architecture": "resnet50", "mode": "finetune", "epochs": 1, "batch_size": 16}),
]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


# --- one measurement (the child) ---------------------------------------------------------------


def _samples(folder: Path, n: int):
    """n images of folder/<label>/*, alternating labels; with their largest stored pixel count."""
    from PIL import Image

    from models.train import Sample

    by_label = {d.name: sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
                for d in sorted(folder.iterdir()) if d.is_dir()}
    paths = [p for group in zip(*by_label.values()) for p in group][:n]
    largest = 0
    for p in paths:
        with Image.open(p) as im:
            largest = max(largest, im.width * im.height)
    samples = [Sample(image_id=p.name, sha256=hashlib.sha256(p.read_bytes()).hexdigest(), label=p.parent.name,
                      load=p.read_bytes) for p in paths]
    return samples, largest


class _SyntheticCache:
    """Every feature is in the cache (random, fixed seed), as DbFeatureCache.get_many returns them."""

    def get_many(self, extractor_id, sha256s):
        import numpy as np

        rng = np.random.default_rng(0)
        dim = 2560  # efficientnet_lite0, avgmax pooling
        return {s: rng.standard_normal(dim, dtype=np.float32) + (1.0 if int(s, 16) % 2 else 0.0) for s in sha256s}

    def put_many(self, extractor_id, features):
        raise AssertionError("every feature was cached")


def child(spec: dict) -> dict:
    from models.runtime import tune_process

    tune_process(spec["threads"])
    if not spec.get("bf16"):  # the worst case: a CPU without native bf16 keeps float32 activations
        from models import features, finetune

        finetune.use_bf16 = features.use_bf16 = lambda device: False
    from models.config import TrainConfig
    from models.train import Sample, train

    name, n, options = spec["name"], spec["n"], spec["options"]
    config = TrainConfig.from_dict(options).resolved()
    if name == "base":
        return {"largest_pixels": 0}
    t = time.perf_counter()
    if name.startswith("features"):
        def never() -> bytes:
            raise AssertionError("a cached image is never loaded")

        samples = [Sample(image_id=str(i), sha256=f"{i:064x}", label="cat" if i % 2 else "noncat", load=never,
                          phash=f"{(i * 0x9E3779B97F4A7C15) % (1 << 64):016x}") for i in range(n)]
        train(samples, config, feature_cache=_SyntheticCache())
        return {"largest_pixels": 0, "seconds": time.perf_counter() - t}
    samples, largest = _samples(Path(spec["folder"]), n)
    from models.features import MemoryFeatureCache

    train(samples, config, feature_cache=MemoryFeatureCache(), pretrained_weights=spec.get("weights"))
    return {"largest_pixels": largest, "seconds": time.perf_counter() - t}


@functools.cache
def _random_weights(name: str) -> str:
    """A torchvision backbone's weights file, randomly initialised: memory does not depend on the
    values, and no download is needed (FELIS_PRETRAINED_WEIGHTS names the real one)."""
    import tempfile

    import torch
    import torchvision

    path = Path(tempfile.mkdtemp()) / f"{name}.pth"
    torch.save(torchvision.models.get_model(name, weights=None).state_dict(), path)
    return str(path)


def measure(name: str, n: int, options: dict, folder: Path, threads: int, bf16: bool = False) -> dict:
    """Run one configuration in a child; its result, and its peak RSS in bytes."""
    spec = {"name": name, "n": n, "options": options, "folder": str(folder), "threads": threads, "bf16": bf16}
    architecture = options.get("architecture", "efficientnet_lite0")
    if architecture not in ("efficientnet_lite0", "simple_cnn"):
        spec["weights"] = _random_weights(architecture)  # made here: the child's peak is the training's
    return child_peak([sys.executable, __file__, "--child", json.dumps(spec)], ROOT, name)


def child_peak(argv: list[str], cwd: Path | str, name: str) -> dict:
    """Run argv (a child that prints one JSON object as its last line) and return that object
    with "peak_rss": the child's peak resident set in bytes (os.wait4's ru_maxrss). Also used by
    bench/train_scale.py."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=cwd)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: the child failed (exit {proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss"] = usage.ru_maxrss * 1024  # KiB on Linux
    return result


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def run_table(folder: Path, threads: int, only: list[str] | None) -> None:
    from models.config import TrainConfig
    from models.memory import estimate_training_memory

    mib = 1 << 20
    print(f"CPU: {cpu_name()}, {threads} threads; images from {folder}")
    print("| configuration | images | options | peak RSS (MiB) | estimate (MiB) | estimate / peak |")
    print("|---|---|---|---|---|---|")
    for name, n, options in CONFIGS:
        if only and name not in only:
            continue
        r = measure(name, n, options, folder, threads)
        if name == "base":  # no training: nothing to estimate
            print(f"| {name} | – | – | {r['peak_rss'] / mib:.0f} | – | – |", flush=True)
            continue
        config = TrainConfig.from_dict(options).resolved()
        est = estimate_training_memory(config, n, largest_image_pixels=r["largest_pixels"])
        print(f"| {name} | {n} | `{json.dumps(options)}` | {r['peak_rss'] / mib:.0f} | {est.total / mib:.0f} | "
              f"{est.total / r['peak_rss']:.2f} |", flush=True)


# --- the architectures' profile (meta device) -----------------------------------------------------


def profile(name: str, image_size: int = 224) -> tuple[int, int, int, int]:
    """(backbone parameters, feature-map channels, bytes autograd saves for the backward pass per
    image, the largest activation's bytes per image) of the classifier models.networks builds,
    float32, at image_size, one image; on the meta device, where storages are still told apart."""
    import torch

    from models import networks

    arch = {"name": name, "image_size": image_size, "pooling": "avg", "num_classes": 2}
    with torch.device("meta"):
        try:
            net = networks.build_classifier(arch)
        except NotImplementedError:  # regnet computes its widths with tensors: build on the CPU, uninitialised
            net = _build_uninitialised(arch)
    params = sum(p.numel() for p in net.backbone.parameters())
    saved: dict[int, int] = {}  # storage -> bytes: a tensor saved by two ops (conv, then BN) counts once
    weights = {t.untyped_storage()._cdata for t in (*net.parameters(), *net.buffers())}  # not per image
    largest = [0]

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        return t

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor):
            largest[0] = max(largest[0], out.numel() * out.element_size())

    hooks = [m.register_forward_hook(hook) for m in net.modules()]
    net.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(torch.zeros(1, 3, image_size, image_size, device="meta"))
    for h in hooks:
        h.remove()
    return params, net.head.in_features, sum(saved.values()), largest[0]


def _build_uninitialised(arch: dict):
    import torch
    from torch.nn import init

    from models import networks

    names = ("kaiming_normal_", "kaiming_uniform_", "normal_", "uniform_", "zeros_", "ones_", "constant_", "trunc_normal_")
    kept = {k: getattr(init, k) for k in names}
    for k in names:
        setattr(init, k, lambda t, *a, **kw: t)
    try:
        with torch.device("cpu"):
            backbone = networks._TorchvisionTrunk(arch["name"])
    finally:
        for k, v in kept.items():
            setattr(init, k, v)
    backbone = backbone.to_empty(device="meta")
    with torch.device("meta"):
        channels = backbone.eval()(torch.zeros(1, 3, 64, 64)).shape[1]
        return networks.Classifier(backbone, channels, arch["num_classes"])


def print_architectures() -> None:
    from models.catalog import TORCHVISION_BACKBONES

    print("ARCHITECTURES: dict[str, Architecture] = {")
    for name in ["efficientnet_lite0", "simple_cnn", *sorted(TORCHVISION_BACKBONES)]:
        params, channels, saved, largest = profile(name)
        print(f'    "{name}": Architecture({params}, {channels}, {saved / 1e6:.1f}, {largest / 1e6:.1f}),')
    print("}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", type=Path, help="a dataset with train/<label>/<images>")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", action="append", help="run only this configuration (repeatable)")
    ap.add_argument("--table", action="store_true", help="print models/memory.py's ARCHITECTURES")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
    elif args.table:
        print_architectures()
    elif args.folder:
        run_table(args.folder / "train", args.threads, args.only)
    else:
        ap.error("give a dataset folder, or --table")


if __name__ == "__main__":
    main()
