"""Feature extraction fanned out over the worker pool (issue 17): one cold linear training through
the API on real Redis and PostgreSQL, with one worker and no shards, one worker with shards, and
N workers with shards.

    python bench/fanout.py [--cifar DIR] [--images 2400] [--shard 600] [--workers 1,2] [--threads 2] [--rounds 1] [--append]

Each configuration gets its own PostgreSQL database, Redis database and blob folder (every
feature cold), one API process and its workers (`felis worker --concurrency 1`, FELIS_TORCH_THREADS
= threads / workers, so the configurations use the same cores), and the same zip of real photos
(photos/train, both labels; CIFAR-10 images when --cifar DIR names an unpacked cifar10-train).
Printed per configuration: train request -> version, the time the training spent extracting
(from the first to the last shard's finish: its status `extracting`), the head fit after it, and
which workers computed which shards.
"""

from __future__ import annotations

import datetime
import io
import sys
import tempfile
import time
import uuid
import zipfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _api import arguments, print_results  # noqa: E402  (bench/_api.py)
from ood import DATASETS, cpu_name  # noqa: E402  (bench/ood.py)

REDIS = "redis://127.0.0.1:6379"


def photos_zip(n: int, cifar: Path | None) -> bytes:
    """n real images, half of each label (photos/train cat and noncat, or CIFAR-10 cat and the rest)."""
    if cifar is not None:
        folders = {"cat": [cifar / "train" / "cat"], "other": [p for p in sorted((cifar / "train").iterdir()) if p.name != "cat"]}
    else:
        folders = {label: [DATASETS / "photos" / "train" / label] for label in ("cat", "noncat")}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for label, dirs in folders.items():
            files = [f for d in dirs for f in sorted(d.iterdir())]
            step = max(1, len(files) // (n // 2))
            for f in files[::step][: n // 2]:
                z.write(f, f"{label}/{f.parent.name}-{f.name}")
    return buf.getvalue()


def one_config(archive: bytes, workers: int, threads: int, shard: int) -> dict:
    import redis

    from tests.utils.processes import Proc, create_postgres_database, felis_env, free_port, wait_ready

    tmp = Path(tempfile.mkdtemp(prefix="felis-fanout-"))
    db_url, drop = create_postgres_database()
    redis_db = 1 + uuid.uuid4().int % 14
    redis.Redis.from_url(f"{REDIS}/{redis_db}").flushdb()
    env = felis_env(FELIS_MODE="embedded", FELIS_DATA_DIR=str(tmp / "shared"), FELIS_DATABASE_URL=db_url,
                    FELIS_BROKER_URL=f"{REDIS}/{redis_db}", FELIS_TORCH_THREADS=str(max(1, threads // workers)),
                    FELIS_FEATURE_SHARD_IMAGES=str(shard), FELIS_RATE_LIMIT_UPLOAD_PER_MINUTE="0")
    port = free_port()
    procs = [Proc(["api", "--port", str(port)], env, tmp / "api.log")]
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, procs)
        procs += [Proc(["worker", "--queues", "gpu", "--concurrency", "1", "--hostname", f"w{i}@%h"], env, tmp / f"w{i}.log")
                  for i in range(workers)]
        with httpx.Client(base_url=base, timeout=600) as c:
            wait_ready(base, procs)
            time.sleep(3)  # every worker connected to the broker
            c.post("/v1/datasets", json={"name": "fan"}).raise_for_status()
            c.post("/v1/datasets/fan/images", files={"archive": ("a.zip", archive, "application/zip")}).raise_for_status()
            t0 = time.perf_counter()
            tid = c.post("/v1/datasets/fan/trainings", json={"seed": 0}).json()["id"]
            extracting_from = extracting_to = None
            shards: dict[int, dict] = {}
            while True:
                body = c.get(f"/v1/trainings/{tid}").json()
                now = time.perf_counter() - t0
                if body["status"] == "extracting":
                    extracting_from = extracting_from if extracting_from is not None else now
                    extracting_to = now
                    for sh in body["progress"].get("shards", []):
                        shards[sh["index"]] = sh
                if body["status"] in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.2)
            total = time.perf_counter() - t0
            assert body["status"] == "succeeded", body
            metrics = c.get(f"/v1/datasets/fan/models/{body['model_version']}").json()["metrics"]
        by_worker: dict[str, int] = {}
        for sh in shards.values():
            if sh.get("worker"):
                by_worker[sh["worker"].split("@")[0]] = by_worker.get(sh["worker"].split("@")[0], 0) + 1
        return {"workers": workers, "threads": max(1, threads // workers), "shard": shard, "total_s": total,
                "extracting_s": (extracting_to - extracting_from) if extracting_from is not None else None,
                "shards": len(shards), "by_worker": by_worker, "val_accuracy": metrics["accuracy"],
                "features_computed": metrics.get("features_computed")}
    finally:
        for p in reversed(procs):
            p.stop()
        drop()


def report(rows: list[dict], images: int, machine: str, source: str) -> str:
    lines = [f"## Feature extraction fanned out (issue 17, `bench/fanout.py`), {datetime.date.today()}, {machine}", "",
             f"One cold linear training (default options) of {images} {source} through the API, real Redis and PostgreSQL, "
             "each configuration on its own database, Redis database and blob folder; every worker "
             "`--concurrency 1`, the cores split between the workers (FELIS_TORCH_THREADS).", "",
             "| workers x threads | shards (images each) | train request -> version | extracting | shards per worker | features computed in the head fit | val accuracy |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ext = f"{r['extracting_s']:.1f} s" if r["extracting_s"] is not None else "-"
        shards = f"{r['shards']} ({r['shard']})" if r["shards"] else "none"
        lines.append(f"| {r['workers']} x {r['threads']} | {shards} | {r['total_s']:.1f} s | {ext} | "
                     f"{', '.join(f'{k}: {v}' for k, v in sorted(r['by_worker'].items())) or '-'} | {r['features_computed']} | {r['val_accuracy']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = arguments(__doc__)
    ap.add_argument("--images", type=int, default=2400)
    ap.add_argument("--shard", type=int, default=600)
    ap.add_argument("--workers", default="1,2", help="worker counts to run with shards (1 also runs without)")
    ap.add_argument("--threads", type=int, default=2, help="cores shared by the workers of a configuration")
    ap.add_argument("--rounds", type=int, default=1, help="run every configuration this many times, interleaved")
    ap.add_argument("--cifar", type=Path, help="an unpacked cifar10-train folder (its train/<class>/ JPEGs) instead of photos")
    args = ap.parse_args()
    archive = photos_zip(args.images, args.cifar)
    source = "CIFAR-10 training images (cat vs the rest, half each)" if args.cifar else "photos (photos/train, half cats)"
    configs = [(1, 0)] + [(int(w), args.shard) for w in args.workers.split(",")]
    rows = []
    for _ in range(args.rounds):
        for workers, shard in configs:
            rows.append(one_config(archive, workers, args.threads, shard))
            print(rows[-1], flush=True)
    print_results(report(rows, args.images, cpu_name(), source), append=args.append)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
