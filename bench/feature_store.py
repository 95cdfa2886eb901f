"""Cached features as blobs (issue 17): the metadata store's bytes per image, and how fast the
feature cache reads (service.store.features.BlobFeatureCache).

    .venv/bin/python bench/feature_store.py [--real 2000] [--sizes 2000,10000,50000] [--s3 2000]

1. Real feature vectors: the first ``--real`` CIFAR-10 training images (unpacked under /tmp from
   ../shared/datasets/cifar10/cifar10-train.tar.gz), through the default extractor of a linear
   training (EfficientNet-Lite0, TrainConfig() resolved: its size, pooling and INT8 precision),
   computed once (cached under /tmp). The larger sizes reuse these real vectors under distinct
   image sha256s: the read path's cost (a file, a header, a CRC, a copy) does not depend on the
   values.
2. Metadata DB bytes per image: a fresh SQLite database at head with 20,000 image rows (as uploads
   write them), against the same at 0010 with each image's float32 features row (what the store
   held before 0011).
3. The cache: put_many, then get_matrix and get_many of N images from the local blob store (read
   in place: a warm worker), each read repeated; peak memory of get_many (tracemalloc).
   Then the largest N through the worker's local copies (the local store posing as a remote one):
   cold (fetched, copies written) and warm (the copies only).
4. ``--s3 N``: the same N through moto's S3 server (tests/utils/s3.py): cold (fetched, local
   copies written) and warm (the local copies only).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import time
import tracemalloc
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10" / "cifar10-train.tar.gz"
WORK = Path(tempfile.gettempdir()) / "felis-bench-feature-store"


def real_features(n: int) -> tuple[np.ndarray, str]:
    """(n, D) float32 features of the first n CIFAR-10 training images, and the extractor id."""
    cache = WORK / f"cifar-features-{n}.npz"
    if cache.exists():
        z = np.load(cache)
        return z["features"], str(z["extractor"])
    import torch

    from models import networks
    from models.config import TrainConfig
    from models.features import warm_extractor

    images = WORK / "cifar10"
    if not (images / "train").is_dir():
        images.mkdir(parents=True, exist_ok=True)
        with tarfile.open(CIFAR) as tar:
            tar.extractall(images, filter="data")
    paths = sorted((images / "train").rglob("*.jpg"))
    paths = [paths[i] for i in np.linspace(0, len(paths) - 1, n).astype(int)]  # every class
    cfg = TrainConfig().resolved()
    arch = {"name": cfg.architecture, "image_size": cfg.image_size, "pooling": cfg.pooling, "num_classes": 10}
    prep = networks.default_preprocessing(cfg.architecture, cfg.image_size, cfg.resize, cfg.crop_fraction)
    ex = warm_extractor(arch, prep, torch.device("cpu"), precision=cfg.precision)
    t = time.perf_counter()
    f = ex.extract([p.read_bytes for p in paths])
    print(f"computed {n} real features ({ex.extractor_id}) in {time.perf_counter() - t:.1f} s", flush=True)
    np.savez(cache, features=f, extractor=ex.extractor_id)
    return f, ex.extractor_id


def sha(i: int) -> str:
    return hashlib.sha256(f"cifar10-train-{i}".encode()).hexdigest()


def db_bytes_per_image(real: np.ndarray, n: int = 20_000) -> dict:
    """SQLite file bytes per image at head, and at 0010 with the float32 feature rows."""
    from alembic import command
    from sqlalchemy import MetaData, Table, insert

    from service.store import migrate
    from service.store.db import make_engine

    out = {}
    for label, revision in (("head", "head"), ("0010 with feature rows", "0010_customvision")):
        path = WORK / f"meta-{revision}.db"
        path.unlink(missing_ok=True)
        engine = make_engine(f"sqlite:///{path}")
        with migrate.migration_connection(engine) as conn:
            command.upgrade(migrate.alembic_config(conn), revision)
        meta = MetaData()
        datasets, images = (Table(t, meta, autoload_with=engine) for t in ("datasets", "images"))
        now = datetime.now(timezone.utc)
        with engine.begin() as conn:
            ds = conn.execute(insert(datasets).values(name="cifar10", created_at=now, last_version=0)).inserted_primary_key[0]
            for start in range(0, n, 2000):
                conn.execute(insert(images), [
                    {"id": hashlib.md5(str(i).encode()).hexdigest(), "dataset_id": ds, "sha256": sha(i),
                     "label": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")[i % 10],
                     "filename": f"{i:04d}.jpg", "format": "JPEG", "width": 32, "height": 32, "size_bytes": 900 + i % 300,
                     "phash": f"{i * 2654435761 % (1 << 64):016x}", "created_at": now}
                    for i in range(start, min(n, start + 2000))])
                if revision != "head":
                    features = Table("image_features", meta, autoload_with=engine) if "image_features" not in meta.tables \
                        else meta.tables["image_features"]
                    conn.execute(insert(features), [
                        {"extractor": "efficientnet_lite0-bench", "sha256": sha(i), "vector": real[i % len(real)].astype("<f4").tobytes()}
                        for i in range(start, min(n, start + 2000))])
        engine.dispose()
        out[label] = round(path.stat().st_size / n)
        path.unlink()
    return out


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def local_figures(real: np.ndarray, extractor: str, sizes: list[int]) -> list[dict]:
    from service.store.blobs import LocalBlobStore
    from service.store.features import BlobFeatureCache

    root = WORK / "blobs"
    store = LocalBlobStore(root)
    cache = BlobFeatureCache(store, cache_dir=WORK / "unused", max_bytes=1)
    rows, stored = [], 0
    for n in sorted(sizes):
        t = time.perf_counter()
        todo = {sha(i): real[i % len(real)] for i in range(stored, n)}
        cache.put_many(extractor, todo)
        put_s = time.perf_counter() - t
        put_n, stored = len(todo), n
        shas = [sha(i) for i in range(n)]
        matrix_s = timed(lambda: cache.get_matrix(extractor, shas))
        many_s = timed(lambda: cache.get_many(extractor, shas))
        matrix, found = cache.get_matrix(extractor, shas)
        assert found.all() and matrix.dtype == np.float16
        m = min(n, len(real))
        err = float(np.abs(matrix[:m].astype(np.float32) - real[:m]).max())
        tracemalloc.start()
        got = cache.get_many(extractor, shas)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        del got
        rows.append({"n": n, "put_many_new_s": round(put_s, 2), "put_many_new_n": put_n,
                     "get_matrix_s": round(matrix_s, 3), "get_many_s": round(many_s, 3),
                     "get_many_peak_mb": round(peak / 1e6, 1), "matrix_mb": round(matrix.nbytes / 1e6, 1),
                     "max_abs_error_vs_float32": err})
        print(json.dumps(rows[-1]), flush=True)
    blobs = list((root / "features").rglob("*.f16"))
    rows.append({"blob_bytes": blobs[0].stat().st_size, "blobs": len(blobs)})
    rows.append(copies_figures(store, extractor, max(sizes)))
    print(json.dumps(rows[-1]), flush=True)
    return rows


class _Remote:
    """The local blob store as a store not on local disk (as S3 is not): reads go through the
    worker's local copies, as they do with S3, without moto's HTTP in the way."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)


def copies_figures(store, extractor: str, n: int) -> dict:
    from service.store.features import BlobFeatureCache

    shutil.rmtree(WORK / "copies", ignore_errors=True)
    cache = BlobFeatureCache(_Remote(store), cache_dir=WORK / "copies", max_bytes=4 << 30)
    shas = [sha(i) for i in range(n)]
    t = time.perf_counter()
    _, found = cache.get_matrix(extractor, shas)
    cold = time.perf_counter() - t
    assert found.all()
    warm = timed(lambda: cache.get_matrix(extractor, shas))
    size = cache.local.size()
    shutil.rmtree(WORK / "copies", ignore_errors=True)
    return {"local_copies_n": n, "cold_fetch_and_copy_s": round(cold, 2), "warm_from_copies_s": round(warm, 3),
            "copies_disk_mb": round(size / 1e6, 1)}


def s3_figures(real: np.ndarray, extractor: str, n: int) -> dict:
    from service.store.blobs import S3BlobStore
    from service.store.features import BlobFeatureCache
    from tests.utils.s3 import AWS_ENV, REGION, start_moto

    os.environ.update(AWS_ENV)
    server = start_moto(WORK / "moto")
    try:
        bucket = server.create_bucket()
        store = S3BlobStore(bucket, "felis/", server.endpoint, REGION)
        shas = [sha(i) for i in range(n)]
        writer = BlobFeatureCache(store, cache_dir=WORK / "s3-writer", max_bytes=1 << 30)
        t = time.perf_counter()
        writer.put_many(extractor, {s: real[i % len(real)] for i, s in enumerate(shas)})
        put_s = time.perf_counter() - t
        reader = BlobFeatureCache(store, cache_dir=WORK / f"s3-reader-{time.time_ns()}", max_bytes=1 << 30)
        t = time.perf_counter()
        _, found = reader.get_matrix(extractor, shas)
        cold_s = time.perf_counter() - t
        assert found.all()
        warm_s = timed(lambda: reader.get_matrix(extractor, shas))
        return {"n": n, "put_many_s": round(put_s, 2), "cold_get_matrix_s": round(cold_s, 2),
                "warm_get_matrix_s": round(warm_s, 3)}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=int, default=2000, help="real CIFAR-10 feature vectors to compute")
    parser.add_argument("--sizes", default="2000,10000,50000", help="images to read, comma-separated")
    parser.add_argument("--s3", type=int, default=0, help="also through moto's S3 server, this many images")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(WORK / "blobs", ignore_errors=True)
    real, extractor = real_features(args.real)
    print(f"features: {real.shape}, range [{real.min():.3f}, {real.max():.3f}]", flush=True)
    result = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "extractor": extractor, "real_vectors": len(real),
              "value_range": [float(real.min()), float(real.max())]}
    result["db_bytes_per_image"] = db_bytes_per_image(real)
    print(json.dumps(result["db_bytes_per_image"]), flush=True)
    result["local"] = local_figures(real, extractor, [int(s) for s in args.sizes.split(",")])
    if args.s3:
        result["s3"] = s3_figures(real, extractor, args.s3)
        print(json.dumps(result["s3"]), flush=True)
    print(json.dumps(result, indent=1))
    shutil.rmtree(WORK / "blobs", ignore_errors=True)


if __name__ == "__main__":
    main()
