"""Bounded load on loopback: uploads, predictions and a training at once, then an audit.

    python bench/load.py [--seconds 120] [--concurrency 16] [--url http://127.0.0.1:PORT]

Without --url it starts its own felis (`felis up`, embedded mode) in a temporary folder.
Every request's outcome is counted; the only acceptable failures are 429s. Afterwards every
image the service accepted is fetched back and checked against the bytes and label sent, and
every training started (the seed's and the one started under load) is waited for: each must
succeed, with its own version. Exits non-zero if any request failed otherwise, any accepted
image is missing or wrong, or a training did not succeed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import io
import json
import os
import random
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATASETS = Path(os.environ.get("FELIS_DATASETS", ROOT.parent / "shared" / "datasets"))


def _photos(split: str) -> list[tuple[Path, str]]:
    return [(p, label) for label in ("cat", "noncat") for p in sorted((DATASETS / "photos" / split / label).iterdir())]


async def run(base: str, seconds: float, concurrency: int) -> dict:
    stats: collections.Counter = collections.Counter()
    latencies: dict[str, list[float]] = collections.defaultdict(list)
    accepted: dict[str, tuple[str, str]] = {}  # image_id -> (sha256, label)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as c:
        await c.delete("/v1/datasets/load")
        assert (await c.post("/v1/datasets", json={"name": "load"})).status_code == 201
        # seed: a first model, so predictions have something to answer with
        seed = _photos("train")[:40] + _photos("train")[-40:]
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for p, label in seed:
                zf.write(p, f"{label}/{p.name}")
        r = await c.post("/v1/datasets/load/images", files={"archive": ("seed.zip", buf.getvalue())})
        for res, (p, label) in zip(r.json()["results"], seed):
            accepted[res["image_id"]] = (hashlib.sha256(p.read_bytes()).hexdigest(), label)
        trainings = [(await c.post("/v1/datasets/load/trainings", json={})).json()["id"]]
        await _final(c, trainings[0])

        uploads = collections.deque(_photos("train")[40:-40])
        random.Random(0).shuffle(uploads)
        tests = [p.read_bytes() for p, _ in _photos("test")[::5]]
        deadline = time.monotonic() + seconds
        training_started = False

        async def one(kind: str, coro) -> httpx.Response | None:
            t = time.perf_counter()
            try:
                r = await coro
            except httpx.HTTPError as e:
                stats[f"{kind}:error:{type(e).__name__}"] += 1
                return None
            latencies[kind].append(time.perf_counter() - t)
            stats[f"{kind}:{r.status_code}"] += 1
            return r

        async def user(i: int) -> None:
            nonlocal training_started
            rnd = random.Random(i)
            while time.monotonic() < deadline:
                roll = rnd.random()
                if roll < 0.25 and uploads:
                    batch = [uploads.popleft() for _ in range(min(4, len(uploads)))]
                    label = batch[0][1]
                    batch = [b for b in batch if b[1] == label] or batch[:1]
                    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p, _ in batch]
                    r = await one("upload", c.post("/v1/datasets/load/images", data={"label": label}, files=files))
                    if r is not None and r.status_code in (201, 207):
                        for res, (p, lab) in zip(r.json()["results"], batch):
                            if res["status"] == "created":
                                accepted[res["image_id"]] = (hashlib.sha256(p.read_bytes()).hexdigest(), lab)
                elif roll < 0.27 and not training_started and time.monotonic() > deadline - seconds * 0.7:
                    training_started = True
                    r = await one("train", c.post("/v1/datasets/load/trainings", json={}))
                    if r is not None and r.status_code == 202:
                        trainings.append(r.json()["id"])
                else:
                    img = rnd.choice(tests)
                    await one("predict", c.post("/v1/datasets/load/predict", files={"files": ("x.jpg", img)}))

        t0 = time.monotonic()
        await asyncio.gather(*(user(i) for i in range(concurrency)))
        elapsed = time.monotonic() - t0

        # audit: every accepted image is there, byte for byte, with its label
        missing = wrong = 0
        for image_id, (sha, label) in accepted.items():
            meta = await c.get(f"/v1/datasets/load/images/{image_id}")
            content = await c.get(f"/v1/datasets/load/images/{image_id}/content")
            if meta.status_code != 200 or content.status_code != 200:
                missing += 1
            elif hashlib.sha256(content.content).hexdigest() != sha or meta.json()["label"] != label:
                wrong += 1
        count = (await c.get("/v1/datasets/load")).json()["image_count"]
        # every training started: final, succeeded, one version each
        outcomes = [await _final(c, t) for t in trainings]
        versions = [m["version"] for m in (await c.get("/v1/datasets/load/models")).json()["data"]]
    bad = {k: v for k, v in stats.items() if not (k.endswith((":200", ":201", ":202", ":207", ":429")))}
    pct = lambda xs, q: sorted(xs)[int(q * (len(xs) - 1))] * 1000 if xs else None
    return {
        "seconds": round(elapsed, 1), "concurrency": concurrency, "requests": sum(stats.values()),
        "by_outcome": dict(sorted(stats.items())), "unexpected": bad,
        "latency_ms": {k: {"p50": round(pct(v, 0.5), 1), "p99": round(pct(v, 0.99), 1), "n": len(v)}
                       for k, v in latencies.items()},
        "images_accepted": len(accepted), "images_in_dataset": count, "missing": missing, "wrong": wrong,
        "trainings": [{"id": o["id"], "status": o["status"], "model_version": o["model_version"],
                       "attempts": o["attempts"], "error": o["error"]} for o in outcomes],
        "versions": versions,
    }


async def _final(c: httpx.AsyncClient, training_id: str, timeout: float = 1800) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = (await c.get(f"/v1/trainings/{training_id}")).json()
        if body["status"] in ("succeeded", "failed", "cancelled"):
            return body
        await asyncio.sleep(0.5)
    raise TimeoutError(f"training {training_id} still {body['status']} after {timeout} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url")
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    proc = None
    if args.url:
        base = args.url
    else:
        from tests.utils.processes import start_felis

        proc, base = start_felis("up", Path(tempfile.mkdtemp(prefix="felis-load-")))
    try:
        result = asyncio.run(run(base, args.seconds, args.concurrency))
    finally:
        if proc:
            proc.stop()
    print(json.dumps(result, indent=2))
    ok = not result["unexpected"] and not result["missing"] and not result["wrong"] \
        and result["images_in_dataset"] == result["images_accepted"] \
        and all(t["status"] == "succeeded" for t in result["trainings"]) \
        and sorted(t["model_version"] for t in result["trainings"]) == result["versions"]
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
