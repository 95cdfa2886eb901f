"""Near-duplicate search at scale: the pHash grouping behind GET .../images/near-duplicates and
the training splits, on real CIFAR-10 images.

    python bench/near_duplicates.py [--images 20000]

Unpacks ../shared/datasets/cifar10/cifar10-train.tar.gz into a temporary folder (never into the
project), hashes the first N images as uploads do (models.images.perceptual_hash), then times
models.split.near_duplicate_components at max_distance 6 (the default) and 16 (the cap) and
reports the process's peak memory growth during each call. Target (issue 14): 20,000 images in
under 2 s with under 200 MB of extra memory.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATASETS = Path(os.environ.get("FELIS_DATASETS", ROOT.parent / "shared" / "datasets"))


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20000)
    args = ap.parse_args()
    from models.images import perceptual_hash
    from models.split import near_duplicate_components

    with tempfile.TemporaryDirectory(prefix="felis-nd-") as tmp:
        with tarfile.open(DATASETS / "cifar10" / "cifar10-train.tar.gz") as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")), key=lambda m: m.name)
            step = max(1, len(members) // args.images)
            chosen = members[::step][: args.images]
            tar.extractall(tmp, members=chosen, filter="data")
        files = [Path(tmp) / m.name for m in chosen]
        t = time.perf_counter()
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            hashes = list(pool.map(lambda p: perceptual_hash(p.read_bytes()), files))
        print(f"{len(hashes)} CIFAR-10 images hashed in {time.perf_counter() - t:.1f} s")
    ok = True
    for bits in (6, 16):
        before = _peak_mb()
        t = time.perf_counter()
        roots, closest = near_duplicate_components(hashes, bits)
        seconds = time.perf_counter() - t
        grown = _peak_mb() - before
        grouped = int((closest <= bits).sum())
        print(f"max_distance {bits:2d}: {seconds:.2f} s, peak memory +{grown:.0f} MB, "
              f"{grouped} images in {len(set(roots[closest <= bits].tolist()))} groups")
        ok &= seconds < 2 and grown < 200
    print("PASS" if ok else "FAIL", "(target: < 2 s and < 200 MB extra at 20,000 images)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
