"""From a zip to a model, through the HTTP API, timed: the user's minute.

    python bench/zip_to_model.py [--set ../shared/datasets/photos] [--url http://127.0.0.1:PORT] [-- option=value ...]

Zips the set's train/ folder (a folder per label), uploads it, requests a training with default
options (or the ones given), waits for the version, then predicts every image of test/ through
the API and reports accuracy overall and per file-name prefix, with the timings. Without --url it
starts its own `felis up` (embedded mode) in a temporary folder, as a user's first run would.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
import zipfile
from collections import defaultdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATASETS = Path(os.environ.get("FELIS_DATASETS", ROOT.parent / "shared" / "datasets"))


def _zip(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:  # JPEGs do not compress
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(folder).as_posix())
    return buf.getvalue()


def _prefix(name: str) -> str:
    return name.split("_", 1)[0] + "_" if "_" in name else "(none)"


def run(base: str, data: Path, options: dict) -> dict:
    out: dict = {"set": data.name, "options": options}
    with httpx.Client(base_url=base, timeout=600) as c:
        name = f"bench-{int(time.time())}"
        c.post("/v1/datasets", json={"name": name}).raise_for_status()
        archive = _zip(data / "train")
        t0 = time.perf_counter()
        r = c.post(f"/v1/datasets/{name}/images", files={"archive": ("train.zip", archive, "application/zip")})
        out["upload_s"] = round(time.perf_counter() - t0, 2)
        out["upload"] = {k: r.json()[k] for k in ("created", "duplicates", "rejected")}
        t0 = time.perf_counter()
        tid = c.post(f"/v1/datasets/{name}/trainings", json=options).json()["id"]
        while (t := c.get(f"/v1/trainings/{tid}").json())["status"] not in ("succeeded", "failed", "cancelled"):
            time.sleep(0.2)
        out["train_request_to_version_s"] = round(time.perf_counter() - t0, 2)
        assert t["status"] == "succeeded", t
        version = c.get(f"/v1/datasets/{name}/models/{t['model_version']}").json()
        out["validation"] = {k: version["metrics"].get(k) for k in ("accuracy", "ece", "cv_accuracy", "cv_ece")}
        correct, total = defaultdict(int), defaultdict(int)
        probs_true = []
        for label_dir in sorted((data / "test").iterdir()):
            paths = sorted(label_dir.iterdir())
            for i in range(0, len(paths), 16):
                chunk = paths[i : i + 16]
                r = c.post(f"/v1/datasets/{name}/predict", files=[("files", (p.name, p.read_bytes())) for p in chunk])
                for p, pred in zip(chunk, r.json()["predictions"]):
                    for key in ("all", _prefix(p.name)):
                        total[key] += 1
                        correct[key] += pred["label"] == label_dir.name
                    probs_true.append((pred["probabilities"], label_dir.name))
        out["test_accuracy"] = {k: f"{correct[k] / total[k]:.4f} ({total[k] - correct[k]} errors / {total[k]})" for k in total}
        out["test_ece"] = round(_ece(probs_true), 4)
        c.delete(f"/v1/datasets/{name}")
    return out


def _ece(rows: list[tuple[dict, str]], bins: int = 15) -> float:
    acc, conf, count = [0.0] * bins, [0.0] * bins, [0] * bins
    for probs, truth in rows:
        label = max(probs, key=probs.__getitem__)
        b = min(int(probs[label] * bins), bins - 1)
        count[b] += 1
        conf[b] += probs[label]
        acc[b] += label == truth
    n = sum(count)
    return sum(abs(acc[b] - conf[b]) for b in range(bins) if count[b]) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", type=Path, default=DATASETS / "photos")
    ap.add_argument("--url")
    ap.add_argument("options", nargs="*", help="training options as key=value (JSON values)")
    args = ap.parse_args()
    options = {k: json.loads(v) if v[:1] in "0123456789-[{tfn\"" else v
               for k, v in (o.split("=", 1) for o in args.options)}
    proc = None
    base = args.url
    if not base:
        from tests.utils.processes import start_felis

        proc, base = start_felis("up", Path(tempfile.mkdtemp(prefix="felis-bench-")))
    try:
        print(json.dumps(run(base, args.set, options), indent=2))
    finally:
        if proc:
            proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
