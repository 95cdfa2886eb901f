"""What a GPU worker's decode threads cost an image, float32 pixels against uint8 ones (issue 17).

    python bench/decode.py [--threads 1,2] [--images 3000] [--seconds 5]

A GPU worker's features and a GPU predictor are fed by CPU threads that decode and resize each
image (Pillow, the served preprocessing at the default 288 px). Those threads used to hand the
network float32 pixels, normalised on the CPU (preprocess.preprocess); they now stop at uint8
(preprocess.preprocess_uint8) and the GPU normalises them with the same float32 operations.
This prints images/s of the decode stage alone, each way, for CIFAR-10 (32 x 32 JPEGs, the
50,000-image training of bench/gpu_check.py's scale phase) and photos/test (500 x 375 JPEGs,
the serving load), on 1 and on every core: the stage that bounded the H200 host's 50,000-image
features (908 images/s on its 8 decode threads) and its GPU predict (bench/RESULTS.md). The last
column decodes on as many processes instead: where it outgrows the threads, Python's per-image
work under the GIL (small images), not the cores, limits the threads.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_check import _cifar  # noqa: E402  (bench/gpu_check.py: CIFAR-10 images read from the archive)
from ood import DATASETS, cpu_name  # noqa: E402  (bench/ood.py)

from models import networks  # noqa: E402
from models.malloc import keep_freed_memory  # noqa: E402
from models.preprocess import preprocess, preprocess_uint8  # noqa: E402


def rate(fn, images: list[bytes], threads: int, seconds: float) -> float:
    """Images/s of fn over the images, cycled, on `threads` threads, for about `seconds`."""
    done, stop = [0] * threads, time.perf_counter() + seconds

    def work(w: int) -> None:
        for data in itertools.islice(itertools.cycle(images), w, None, threads):
            fn(data)
            done[w] += 1
            if done[w] % 16 == 0 and time.perf_counter() >= stop:
                return

    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(threads)))
    return sum(done) / (time.perf_counter() - t)


def _decode_chunk(chunk: list[bytes]) -> int:
    prep = networks.default_preprocessing("efficientnet_lite0", 288)
    return sum(preprocess_uint8(d, prep).shape[0] > 0 for d in chunk)


def process_rate(images: list[bytes], processes: int, seconds: float) -> float:
    """Images/s of preprocess_uint8 on `processes` processes (no GIL shared; the pixels are not sent
    back here, so this is an upper bound for a process pool)."""
    import multiprocessing

    chunks = [images[i : i + 64] for i in range(0, len(images), 64)]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        pool.map(_decode_chunk, chunks[:processes])  # started
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            n += sum(pool.map(_decode_chunk, chunks))
        return n / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    keep_freed_memory()  # as the worker and the API do at start (models/malloc.py): no mmap + page faults per image
    prep = networks.default_preprocessing("efficientnet_lite0", 288)
    sets = {"CIFAR-10 32x32": [data for _, _, data in _cifar(DATASETS / "cifar10" / "cifar10-train.tar.gz", args.images)],
            "photos/test": [p.read_bytes() for p in sorted((DATASETS / "photos" / "test").glob("*/*.jpg"))]}
    print(f"machine: {cpu_name()}; {prep.image_size} px, {args.seconds:.0f} s a figure")
    print("| images | threads (or processes) | float32 (preprocess) img/s | uint8 (preprocess_uint8) img/s | uint8 / float32 | uint8 on as many processes |")
    print("|---|---|---|---|---|---|")
    for name, images in sets.items():
        for threads in (int(t) for t in args.threads.split(",")):
            f32 = rate(lambda d: preprocess(d, prep), images, threads, args.seconds)
            u8 = rate(lambda d: preprocess_uint8(d, prep), images, threads, args.seconds)
            procs = process_rate(images, threads, args.seconds)
            print(f"| {name} | {threads} | {f32:,.0f} | {u8:,.0f} | {u8 / f32:.2f}x | {procs:,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
