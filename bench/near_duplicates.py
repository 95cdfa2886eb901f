"""Near-duplicate search at scale: the pHash grouping behind GET .../images/near-duplicates and
the training splits, before and after multi-index hashing, on synthetic and real CIFAR-10 pHashes.

    python bench/near_duplicates.py [--images 20000] [--sizes 2000,10000,50000] [--distances 6,16]
                                    [--repeat 3] [--synthetic-only]

Synthetic: random 64-bit pHashes, a tenth of them replaced by near copies (0..6 flipped bits) of
others and a few exact copies. Real: unpacks ../shared/datasets/cifar10/cifar10-train.tar.gz into a
temporary folder (never into the project) and hashes the first images as uploads do
(models.images.perceptual_hash). For each size and max_distance it times the block scan as it was
before multi-index hashing (every pair, `_before` below, kept here as the reference), the scan
that is still the fallback (models.split._components(..., "scan")) and
models.split.near_duplicate_components, checks that all three agree exactly, and reports the
best of --repeat timings and the peak memory of each call (tracemalloc). Target (issue 14):
20,000 real images in under 2 s with under 200 MB of extra memory.
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import tempfile
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATASETS = Path(os.environ.get("FELIS_DATASETS", ROOT.parent / "shared" / "datasets"))


def _before(phashes: list[str | None], max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """models.split.near_duplicate_components as it was before multi-index hashing: every pair
    compared, 128 rows x n at a time, matches merged per block."""
    from models.split import _roots, _union

    n = len(phashes)
    parent = np.arange(n, dtype=np.int64)
    closest = np.full(n, 64, dtype=np.int64)
    have = np.array([i for i, h in enumerate(phashes) if h], dtype=np.int64)
    if len(have) < 2:
        return parent, closest
    bits = np.array([int(phashes[i], 16) for i in have], dtype=np.uint64)
    m = len(bits)
    xor = np.empty((128, m), dtype=np.uint64)
    count = np.empty((128, m), dtype=np.uint8)
    for start in range(0, m, 128):
        stop = min(start + 128, m)
        rows, width = stop - start, m - start
        x = np.bitwise_xor(bits[start:stop, None], bits[None, start:], out=xor[:rows, :width])
        c = np.bitwise_count(x, out=count[:rows, :width])
        r, col = np.nonzero(c <= max_distance)
        upper = col > r
        a, b = have[r[upper] + start], have[col[upper] + start]
        if len(a):
            d = c[r[upper], col[upper]].astype(np.int64)
            np.minimum.at(closest, a, d)
            np.minimum.at(closest, b, d)
            _union(parent, a, b)
    return _roots(parent), closest


def synthetic(n: int, seed: int = 0) -> list[str]:
    """Random pHashes; a tenth near copies (0..6 bits flipped) of others, a hundredth exact copies."""
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    near = rng.choice(n, size=n // 10, replace=False)
    flips = np.zeros(len(near), dtype=np.uint64)
    for k in range(6):
        flipped = rng.integers(0, 7, len(near)) > k  # 0..6 flips, some of them twice the same bit
        flips ^= np.where(flipped, np.uint64(1) << rng.integers(0, 64, len(near)).astype(np.uint64), 0)
    values[near] = values[rng.integers(0, n, len(near))] ^ flips
    copies = rng.choice(n, size=n // 100, replace=False)
    values[copies] = values[rng.integers(0, n, len(copies))]
    return [f"{int(v):016x}" for v in values]


def real(n: int) -> list[str]:
    from models.images import perceptual_hash

    with tempfile.TemporaryDirectory(prefix="felis-nd-") as tmp:
        with tarfile.open(DATASETS / "cifar10" / "cifar10-train.tar.gz") as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")), key=lambda m: m.name)
            step = max(1, len(members) // n)
            chosen = members[::step][:n]
            tar.extractall(tmp, members=chosen, filter="data")
        files = [Path(tmp) / m.name for m in chosen]
        t = time.perf_counter()
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            hashes = list(pool.map(lambda p: perceptual_hash(p.read_bytes()), files))
        print(f"{len(hashes)} CIFAR-10 images hashed in {time.perf_counter() - t:.1f} s")
    return hashes


def timed(fn, *args, repeat: int = 1) -> tuple[tuple[np.ndarray, np.ndarray], float, float]:
    """fn(*args), its best seconds of `repeat` runs (the machine may be shared) and the peak
    memory it allocated (tracemalloc, first run; timed apart from it)."""
    tracemalloc.start()
    try:
        out = fn(*args)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    seconds = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn(*args)
        seconds.append(time.perf_counter() - t)
    return out, min(seconds), peak


def compare(name: str, hashes: list[str], distances: list[int], repeat: int) -> dict[int, tuple[float, float]]:
    from models.split import _components, near_duplicate_components

    after = {}
    for bits in distances:
        want, before_s, before_mb = timed(_before, hashes, bits, repeat=repeat)
        scan, scan_s, _ = timed(_components, hashes, bits, "scan", repeat=repeat)
        got, after_s, after_mb = timed(near_duplicate_components, hashes, bits, repeat=repeat)
        same = all(np.array_equal(w, s) and np.array_equal(w, g) for w, s, g in zip(want, scan, got))
        roots, closest = got
        grouped = closest <= bits
        print(f"{name:>9} n={len(hashes):6d} max_distance {bits:2d}: before {before_s:6.3f} s ({before_mb:3.0f} MB), "
              f"scan {scan_s:6.3f} s, after {after_s:6.3f} s ({after_mb:3.0f} MB), x{before_s / after_s:5.1f}, "
              f"{int(grouped.sum())} images in {len(set(roots[grouped].tolist()))} groups, {'same' if same else 'DIFFERENT'}")
        if not same:
            raise SystemExit("near_duplicate_components disagrees with the reference scan")
        after[bits] = (after_s, after_mb)
    return after


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20000, help="real images for the target check")
    ap.add_argument("--sizes", default="2000,10000,50000")
    ap.add_argument("--distances", default="6,16")
    ap.add_argument("--repeat", type=int, default=3, help="runs timed per call; the best is reported")
    ap.add_argument("--synthetic-only", action="store_true")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    distances = [int(d) for d in args.distances.split(",")]
    print(f"CPU: {_cpu()}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for n in sizes:
        compare("synthetic", synthetic(n), distances, args.repeat)
    if args.synthetic_only:
        return 0
    hashes = real(max(sizes + [args.images]))
    for n in sizes:
        compare("CIFAR-10", hashes[:n], distances, args.repeat)
    after = compare("CIFAR-10", hashes[:args.images], sorted({6, 16} | set(distances)), args.repeat)
    ok = all(s < 2 and mb < 200 for s, mb in after.values())
    print("PASS" if ok else "FAIL", f"(target: < 2 s and < 200 MB extra at {args.images:,} images)",
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0 if ok else 1


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x {os.cpu_count()}"
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs"


if __name__ == "__main__":
    sys.exit(main())
