"""What the benchmarks through the HTTP API share (bench/label_issues_api.py, suggestions_api.py,
ood_api.py, scale.py): a felis to ask (a given URL, or a fresh `felis up` in embedded mode),
files posted in chunks, a training waited for, and the report printed and appended to
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.utils.processes

RESULTS = ROOT / "bench" / "RESULTS.md"
FINISHED = ("succeeded", "failed", "cancelled")  # a training's status once it has ended


def arguments(doc: str, *, seeds: int | None = None) -> argparse.ArgumentParser:
    """A parser described by ``doc``'s first line, with the options every API benchmark takes:
    --url (a felis to ask instead of starting one), --append, and with ``seeds`` --seeds (that
    many by default)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--url", help="a running felis to ask (default: start a `felis up` in a temporary folder)")
    if seeds is not None:
        ap.add_argument("--seeds", type=int, default=seeds)
    ap.add_argument("--append", action="store_true", help="append the figures to bench/RESULTS.md")
    return ap


def need_photos(datasets: Path) -> None:
    """Exit (a message) unless the shared datasets hold photos/."""
    if not (datasets / "photos").is_dir():
        sys.exit(f"no photos at {datasets / 'photos'} (set FELIS_DATASETS)")


@contextmanager
def start_or_use(url: str | None = None, *, prefix: str = "felis-bench-", folder: Path | None = None) -> Iterator[tuple[str, object]]:
    """(base URL, the felis process or None): ``url`` as it is, or else a `felis up` (embedded
    mode: API + worker) with its data under ``folder`` (default: a new temporary folder named
    ``prefix...``), stopped when the block ends."""
    if url:
        yield url, None
        return
    from tests.utils.processes import start_felis

    proc, base = start_felis("up", folder if folder is not None else Path(tempfile.mkdtemp(prefix=prefix)))
    try:
        yield base, proc
    finally:
        proc.stop()


def run_seeds(url: str | None, prefix: str, seeds: list, one_seed: Callable[[httpx.Client, object], dict],
              shown: Callable[[dict], object] = lambda row: row) -> list[dict]:
    """``one_seed(client, seed)`` for each seed, against ``url`` or a `felis up` of its own (see
    start_or_use), each row printed (``shown(row)``) as it comes; the rows."""
    rows = []
    with start_or_use(url, prefix=prefix) as (base, _), httpx.Client(base_url=base, timeout=900) as c:
        for seed in seeds:
            rows.append(one_seed(c, seed))
            print(shown(rows[-1]), flush=True)
    return rows


def post_files(c: httpx.Client, url: str, paths: list[Path], chunk: int = 100, **kw) -> list[dict]:
    """POST ``paths`` as the ``files`` field (JPEG), ``chunk`` a request (``kw``: the rest of each
    request, e.g. ``data={"label": ...}``); what the answers list, in order (an upload's
    ``results``, a prediction's ``predictions``)."""
    out = []
    for i in range(0, len(paths), chunk):
        r = c.post(url, files=[("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths[i : i + chunk]], **kw)
        r.raise_for_status()
        out.extend(r.json().get("predictions", r.json().get("results", [])))
    return out


def wait_training(c: httpx.Client, training_id: str, timeout: float = math.inf) -> dict:
    """The training once it has ended (succeeded, failed or cancelled), polled every 0.5 s; an
    AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (t := c.get(f"/v1/trainings/{training_id}").json())["status"] not in FINISHED:
        assert time.monotonic() < deadline, t
        time.sleep(0.5)
    return t


def run_training(c: httpx.Client, dataset: str, timeout: float = math.inf) -> tuple[dict, float]:
    """A default training of ``dataset``: (the training once ended, seconds from the request)."""
    t0 = time.perf_counter()
    training = wait_training(c, c.post(f"/v1/datasets/{dataset}/trainings", json={}).json()["id"], timeout)
    return training, time.perf_counter() - t0


def print_results(text: str, *, append: bool) -> None:
    """Print the report; ``append`` (--append): add it to bench/RESULTS.md as well."""
    print(text)
    if append:
        with open(RESULTS, "a") as f:
            f.write("\n" + text)
