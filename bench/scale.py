"""felis at 2,000, 10,000 and 50,000 images, through the API, as a user grows (issue 17).

    python bench/scale.py [--sizes 2000,10000,50000] [--append] [--keep]

CIFAR-10's training split (../shared/datasets/cifar10/cifar10-train.tar.gz, unpacked once into a
temporary folder, never into the project): per size, the same number of images from each class,
labelled `cat` and `other`. Each size runs against a fresh `felis up` (embedded mode: SQLite, local
blobs, one worker) in its own temporary folder, and measures:
  upload     one zip with a folder per label, one request: seconds, images/s, the API's peak RSS
  train      a default training, request -> version (cold: no feature cached), the worker's peak RSS
  retrain    100 labels changed with POST .../images/labels, then a default training again (warm)
  db         the metadata store's bytes (SQLite file + WAL), and per image
  reads      median of 5: the last page of 100 images (offset), dataset detail with label counts
  delete     DELETE the dataset (answers at once), then seconds until its rows are gone
The worker's peak is its processes' VmHWM (the Celery child that trains); the API's is sampled
every 0.2 s. --append writes the table to bench/RESULTS.md (machine from /proc/cpuinfo).

Targets (issue 17, at 50,000): upload >= 1,000 images/s, worker <= 2 GB, API <= 400 MB, metadata
<= 2 KB an image, warm retraining <= 30 s, a page or the detail <= 50 ms, delete <= 30 s.
"""

from __future__ import annotations

import argparse
import datetime
import sqlite3
import statistics
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _api import post_files, print_results, run_training, start_or_use  # noqa: E402  (bench/_api.py)
from ood import DATASETS, cpu_name  # noqa: E402  (bench/ood.py)

ARCHIVE = DATASETS / "cifar10" / "cifar10-train.tar.gz"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TRAIN_TIMEOUT = 7200  # seconds a training may take


def cifar_files(root: Path) -> dict[str, list[Path]]:
    """class -> its JPEG files, unpacking the archive under `root` the first time."""
    if not (root / "train" / "cat").is_dir():
        with tarfile.open(ARCHIVE) as tar:
            tar.extractall(root, filter="data")
    return {c: sorted((root / "train" / c).glob("*.jpg")) for c in CLASSES}


def build_zip(files: dict[str, list[Path]], n: int, path: Path, ten: bool = False) -> int:
    """n images, n / 10 per class, under cat/ and other/, or (ten) a folder per class (stored:
    JPEGs do not compress)."""
    per = n // len(CLASSES)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for c in CLASSES:
            label = c if ten else ("cat" if c == "cat" else "other")
            for p in files[c][:per]:
                z.write(p, f"{label}/{c}-{p.name}")
    return per * len(CLASSES)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def _status(pid: int, field: str) -> float:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return int(text.split(f"{field}:")[1].split()[0]) / 1024 if f"{field}:" in text else 0.0


class Sampler:
    """The API process's largest RSS while a block runs."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, _status(self.pid, "VmRSS"))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join()


def _median_ms(fn, n: int = 5) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def one_size(files: dict[str, list[Path]], n: int, tmp: Path, train: bool = True, ten: bool = False) -> dict:
    from tests.utils.processes import api_pid

    archive = tmp / f"cifar-{n}.zip"
    n = build_zip(files, n, archive, ten)
    out: dict = {"images": n, "zip_mb": archive.stat().st_size / 1e6}
    with start_or_use(folder=tmp) as (base, proc):
        api = api_pid([proc])
        with httpx.Client(base_url=base, timeout=7200) as c:
            c.post("/v1/datasets", json={"name": "scale"}).raise_for_status()
            with Sampler(api) as s, open(archive, "rb") as f:
                t = time.perf_counter()
                r = c.post("/v1/datasets/scale/images", files={"archive": (archive.name, f, "application/zip")})
                out["upload_s"] = time.perf_counter() - t
            out["api_upload_mb"] = s.peak
            if r.status_code >= 300:
                out["upload_error"] = f"{r.status_code} {r.text[:300]}"
                return out
            out["created"] = r.json()["created"]
            out["upload_rate"] = n / out["upload_s"]
            if train:
                _train_twice(c, out, proc, api, "dog" if ten else "other", _held_out(files, n, ten))
            db = tmp / "var" / "felis.db"
            out["db_bytes"] = sum(p.stat().st_size for p in db.parent.glob("felis.db*"))
            out["db_per_image"] = out["db_bytes"] / n
            first = c.get("/v1/datasets/scale/images", params={"limit": 100}).json()
            out["page_ms"] = _median_ms(lambda: c.get("/v1/datasets/scale/images", params={"limit": 100, "offset": n - 100}).raise_for_status())
            deep = c.get("/v1/datasets/scale/images", params={"limit": 100, "offset": n - 200}).json().get("next_cursor")
            if deep:
                out["cursor_ms"] = _median_ms(lambda: c.get("/v1/datasets/scale/images", params={"limit": 100, "cursor": deep}).raise_for_status())
            out["first_page_ms"] = _median_ms(lambda: c.get("/v1/datasets/scale/images", params={"limit": 100}).raise_for_status())
            out["detail_ms"] = _median_ms(lambda: c.get("/v1/datasets/scale").raise_for_status())
            out["api_mb"] = max(s.peak, _status(api, "VmHWM"))
            assert first["count"] == n
            t = time.perf_counter()
            c.delete("/v1/datasets/scale").raise_for_status()
            out["delete_answer_ms"] = (time.perf_counter() - t) * 1000
            deadline = time.monotonic() + 600
            while _rows(db) and time.monotonic() < deadline:
                time.sleep(0.5)
            out["delete_s"] = time.perf_counter() - t
    return out


HELD_OUT_PER_CLASS = 100  # CIFAR-10 training images of each class left out of every zip, predicted after the cold training


def _held_out(files: dict[str, list[Path]], n: int, ten: bool) -> list[tuple[Path, str]]:
    """(image, its label) for HELD_OUT_PER_CLASS images of each class that the zip of n does not hold."""
    per = n // len(CLASSES)
    return [(p, c if ten else ("cat" if c == "cat" else "other")) for c in CLASSES for p in files[c][per:per + HELD_OUT_PER_CLASS]]


def _train_twice(c: httpx.Client, out: dict, proc, api: int, relabel_from: str, held_out: list[tuple[Path, str]]) -> None:
    """A cold default training, its predictions for held-out images, then 100 labels changed and
    a warm one; the worker's peak RSS."""
    training, out["train_s"] = run_training(c, "scale", TRAIN_TIMEOUT)
    out["train_status"] = training["status"]
    out["worker_mb"] = max([_status(p, "VmHWM") for p in _descendants(proc.popen.pid) if p != api] or [0])
    version = training.get("model_version")
    if version:
        ev = c.get(f"/v1/datasets/scale/models/{version}/evaluation").json()
        out["accuracy"] = ev.get("accuracy")
        out["per_label_recall"] = {k: round(v.get("recall", 0), 3) for k, v in (ev.get("per_label") or {}).items()}
        if held_out:  # none at 50,000: every training image is in the zip
            predictions = post_files(c, "/v1/datasets/scale/predict", [p for p, _ in held_out], 16)
            out["held_out_accuracy"] = sum(pred["label"] == label for pred, (_, label) in zip(predictions, held_out)) / len(held_out)
    ids = [i["id"] for i in c.get("/v1/datasets/scale/images", params={"label": relabel_from, "limit": 100}).json()["data"]]
    c.post("/v1/datasets/scale/images/labels", json=[{"image_id": i, "label": "cat"} for i in ids]).raise_for_status()
    retrain, out["retrain_s"] = run_training(c, "scale", TRAIN_TIMEOUT)
    out["retrain_status"] = retrain["status"]
    out["worker_mb"] = max([out["worker_mb"]] + [_status(p, "VmHWM") for p in _descendants(proc.popen.pid) if p != api])


def _rows(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        return conn.execute("SELECT count(*) FROM images").fetchone()[0]


def _s(r: dict, key: str) -> str:
    return f"{r[key]:.1f} s" if key in r else "-"


def _s3(r: dict, key: str) -> str:
    return f"{r[key]:.3f}" if r.get(key) is not None else "-"


def _mb(r: dict, key: str) -> str:
    return f"{r[key]:.0f} MB" if key in r else "-"


def report(rows: list[dict], machine: str, labels: str = "cat / other") -> str:
    head = ("| images | zip | upload | API peak (upload / all) | train request -> version (cold) | warm retrain (100 relabelled) "
            "| worker peak RSS | metadata DB | page of 100: first / last by offset / last by cursor | detail | delete (answer / rows gone) | val accuracy "
            f"| predicted accuracy ({HELD_OUT_PER_CLASS} held-out images a class) |")
    lines = [f"## felis at scale (issue 17, bench/scale.py), {datetime.date.today()}", "",
             f"Machine: {machine}; embedded mode (`felis up`: SQLite, local blobs, one worker), default options; CIFAR-10 "
             f"training images, the same number from each class, labels {labels}, one zip per size.", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "upload_error" in r:
            lines.append(f"| {r['images']:,} | {r['zip_mb']:.0f} MB | refused: {r['upload_error'][:80]} |")
            continue
        lines.append(
            f"| {r['images']:,} | {r['zip_mb']:.0f} MB | {r['upload_s']:.1f} s ({r['upload_rate']:.0f}/s) | "
            f"{r['api_upload_mb']:.0f} / {r['api_mb']:.0f} MB | {_s(r, 'train_s')} | {_s(r, 'retrain_s')} | "
            f"{_mb(r, 'worker_mb')} | {r['db_bytes'] / 1e6:.1f} MB ({r['db_per_image'] / 1024:.1f} KB/image) | "
            f"{r['first_page_ms']:.0f} / {r['page_ms']:.0f} / {r.get('cursor_ms', 0):.0f} ms | {r['detail_ms']:.0f} ms | {r['delete_answer_ms']:.0f} ms / {r['delete_s']:.1f} s | "
            f"{(r.get('accuracy') or 0):.3f} | {_s3(r, 'held_out_accuracy')} |")
        if r.get("per_label_recall"):
            lines.append(f"|  | recall by label: {', '.join(f'{k} {v:.2f}' for k, v in sorted(r['per_label_recall'].items()))} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2000,10000,50000")
    ap.add_argument("--append", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folders")
    ap.add_argument("--no-train", action="store_true", help="upload, reads and delete only")
    ap.add_argument("--ten-labels", action="store_true", help="the ten CIFAR-10 classes as labels (not cat / other)")
    args = ap.parse_args()
    if not ARCHIVE.exists():
        sys.exit(f"no {ARCHIVE} (set FELIS_DATASETS)")
    work = Path(tempfile.mkdtemp(prefix="felis-scale-"))
    files = cifar_files(work / "cifar")
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        tmp = work / f"n{n}"
        tmp.mkdir()
        rows.append(one_size(files, n, tmp, train=not args.no_train, ten=args.ten_labels))
        print(rows[-1], flush=True)
    print_results(report(rows, cpu_name(), "the ten classes" if args.ten_labels else "cat / other"), append=args.append)
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
