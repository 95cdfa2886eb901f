"""Frozen-backbone features cached as compact blobs, keyed by (extractor, image sha256).

One blob per image and extractor in the blob store (``blobs.feature_key``:
``features/<extractor id>/ab/abcdef....f16``), shared by every dataset with those bytes and every
worker, so a retrain on the same images skips the backbone entirely. Implements
models.features.FeatureCache (``get_many``, ``put_many``), plus ``get_matrix``, which fills one
(N, D) float16 matrix without a dict of arrays.

A blob is a 16-byte header and the vector as float16, little-endian (2 bytes a value: 5 KB for
the default extractor's 2,560): magic ``FELF``, format 1, dtype 1 (float16), dim (uint32) and
the CRC-32 of the values. A blob that is truncated, foreign, of another format or whose values do
not match their CRC reads as missing: its features are computed again (and the blob rewritten),
never read as features. float16 keeps 11 significant bits (a relative error of at most 2**-11
a value) and reaches +-65504: EfficientNet-Lite's features are ReLU6 outputs pooled by average
or max, so within [0, 6]; a vector with a value beyond float16's range, or not finite, is not
cached at all (logged), so it is computed anew each time instead of being stored wrong.

Reads: with the local blob store (FELIS_STORAGE_BACKEND=local) the blobs are read in place. With
S3 every blob read is kept in a local on-disk cache on the worker (FELIS_FEATURE_CACHE_DIR,
bounded by FELIS_FEATURE_CACHE_BYTES, least recently used evicted first), so a warm retraining
reads local files and fetches only what it has not seen; a cold one lists each ``ab/`` folder
that many lookups fall in (one request for up to 1,000 keys) instead of asking for every missing
blob, and fetches on a pool of threads.
"""

from __future__ import annotations

import logging
import os
import struct
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Event, Lock

import numpy as np

from service.config import Settings, get_settings
from service.errors import NotFound, StorageFull, TooLarge, Unavailable
from service.store.blobs import BlobStore, LocalBlobStore, feature_key, get_store, write_atomic

log = logging.getLogger("felis.features")

MAGIC, FORMAT, FLOAT16 = b"FELF", 1, 1
_HEADER = struct.Struct("<4sHHII")  # magic, format, dtype, dim, crc32 of the values
HEADER_BYTES = _HEADER.size  # 16: the values start 2-byte aligned (memory-mappable as float16)
MAX_DIM = 1 << 16  # values in one vector; the default extractor has 2,560
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
MAX_LOOKUP = 2_000_000  # sha256s in one get_many / get_matrix call (the matrix is N x D x 2 bytes)
_LIST_FROM = 16  # a cold S3 read lists an ab/ folder that at least this many missing lookups fall in
_TOUCH_AFTER_S = 600  # a local copy read is marked used again (its mtime) at most this often
_BLOCK = 4096  # local copies are counted in whole blocks, as the disk holds them


def encode(vector: np.ndarray) -> bytes | None:
    """A feature vector as a blob; None when it cannot be one exactly enough: not finite, or a
    value beyond float16's range (it would become inf). Raises ValueError for what is no vector."""
    v = np.asarray(vector)
    if v.ndim != 1 or not 1 <= v.shape[0] <= MAX_DIM or v.dtype.kind not in "fiu":
        raise ValueError(f"a feature vector is 1-D, 1..{MAX_DIM} numbers; got shape {v.shape}, dtype {v.dtype}")
    if not np.isfinite(v).all() or np.abs(v).max() > FLOAT16_MAX:
        return None
    values = v.astype("<f2").tobytes()
    return _HEADER.pack(MAGIC, FORMAT, FLOAT16, v.shape[0], zlib.crc32(values)) + values


def decode(data: bytes) -> np.ndarray | None:
    """The float16 vector in a blob (a read-only view of ``data``), or None for anything that is
    not a whole blob of this format: truncated, foreign, corrupted."""
    if len(data) < HEADER_BYTES:
        return None
    magic, fmt, dtype, dim, crc = _HEADER.unpack_from(data)
    if magic != MAGIC or fmt != FORMAT or dtype != FLOAT16 or not 1 <= dim <= MAX_DIM or len(data) != HEADER_BYTES + 2 * dim:
        return None
    values = memoryview(data)[HEADER_BYTES:]
    if zlib.crc32(values) != crc:
        return None
    return np.frombuffer(values, dtype="<f2")


def _read_file(path: str, touch: bool = False) -> bytes | None:
    """A file's bytes, or None when it is not there; ``touch``: mark it used (mtime) for the LRU."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        st = os.fstat(fd)
        if st.st_size > HEADER_BYTES + 2 * MAX_DIM:
            return b""  # no blob of ours: reads as missing
        data = os.read(fd, st.st_size + 1)
        if touch and time.time() - st.st_mtime > _TOUCH_AFTER_S:
            os.utime(fd)
        return data
    finally:
        os.close(fd)


class LocalFeatureCache:
    """Local copies of feature blobs under ``root`` (the blob's key as the path), at most about
    ``max_bytes`` of disk: when a write takes it past that, the least recently used copies go
    until it is at 90 %. Several processes may share the folder (writes are renames; another
    process's writes are counted at the next scan, which runs at least every tenth of the bound
    written). A copy that does not read as a blob is deleted and fetched again."""

    def __init__(self, root: Path, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError("a local feature cache needs max_bytes > 0")
        self.root, self.max_bytes = Path(root), int(max_bytes)
        self._root = str(self.root)
        self._lock = Lock()
        self._size: int | None = None  # disk bytes of the copies, as of the last scan plus our writes
        self._written = 0  # disk bytes written since the last scan

    def path(self, key: str) -> Path:
        return self.root / key  # keys come from blobs.feature_key: safe relative paths

    def read(self, key: str) -> bytes | None:
        return _read_file(f"{self._root}/{key}", touch=True)  # a str: pathlib costs more than the read

    def drop(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def write(self, key: str, data: bytes) -> None:
        """Keep a copy (no fsync: a copy lost in a crash is fetched again). A full local disk
        only means no copy."""
        try:
            write_atomic(self.path(key), data, durable=False)
        except OSError as e:
            log.warning("could not keep a local copy of %s in %s: %s", key, self.root, e)
            return
        blocks = -(-len(data) // _BLOCK) * _BLOCK
        with self._lock:
            if self._size is None:
                self._scan()
            else:
                self._size += blocks
                self._written += blocks
            if self._size > self.max_bytes or self._written > self.max_bytes // 10:
                self._scan()

    def size(self) -> int:
        """The disk bytes the copies take now (a scan)."""
        with self._lock:
            return self._scan(evict=False)

    def _files(self) -> Iterator[os.DirEntry]:
        stack = [self.root]
        while stack:
            try:
                with os.scandir(stack.pop()) as it:
                    for entry in it:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(Path(entry.path))
                        elif entry.is_file(follow_symlinks=False):
                            yield entry
            except FileNotFoundError:
                continue

    def _scan(self, evict: bool = True) -> int:
        """Count the copies; past the bound, delete the least recently used down to 90 % of it
        (and any temp file a crashed writer left, after an hour)."""
        files, total, now = [], 0, time.time()
        for entry in self._files():
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if entry.name.startswith(".tmp-"):
                if now - st.st_mtime > 3600:
                    Path(entry.path).unlink(missing_ok=True)
                continue
            disk = max(st.st_blocks * 512, st.st_size) if hasattr(st, "st_blocks") else -(-st.st_size // _BLOCK) * _BLOCK
            files.append((st.st_mtime, disk, entry.path))
            total += disk
        if evict and total > self.max_bytes:
            files.sort()
            target, gone = self.max_bytes * 9 // 10, 0
            for _, disk, path in files:
                if total <= target:
                    break
                Path(path).unlink(missing_ok=True)
                total -= disk
                gone += 1
            log.info("feature cache %s: evicted %d least recently used copies, %d bytes left", self.root, gone, total)
        self._size, self._written = total, 0
        return total


class BlobFeatureCache:
    """models.features.FeatureCache over the blob store (see the module's docstring).

    ``store`` and ``settings`` default to the configured ones; ``cache_dir`` and ``max_bytes`` to
    the settings' FELIS_FEATURE_CACHE_DIR and FELIS_FEATURE_CACHE_BYTES (used only for a store
    that is not on local disk; max_bytes 0: no local copies). ``workers``: threads that fetch and
    write blobs (boto3's pool keeps 16 connections)."""

    def __init__(self, store: BlobStore | None = None, settings: Settings | None = None, *,
                 cache_dir: Path | None = None, max_bytes: int | None = None, workers: int = 16):
        if store is None or cache_dir is None or max_bytes is None:
            settings = settings or get_settings()
            store = store or get_store()
            cache_dir = cache_dir or settings.feature_cache_dir
            max_bytes = settings.feature_cache_bytes if max_bytes is None else max_bytes
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.store, self.workers = store, max(1, int(workers))
        self.in_place = isinstance(store, LocalBlobStore)  # read the blobs where they are
        self._root = str(store.root) if self.in_place else ""
        use_local = not self.in_place and bool(max_bytes) and cache_dir is not None
        self.local = LocalFeatureCache(Path(cache_dir), int(max_bytes)) if use_local else None

    # --- reading -------------------------------------------------------------------------------

    def get_many(self, extractor_id: str, sha256s: list[str]) -> dict[str, np.ndarray]:
        """{sha256: float16 vector} for the images whose features are cached (missing ones left
        out). The vectors are rows of one matrix: N x D x 2 bytes in all."""
        unique = list(dict.fromkeys(sha256s))
        matrix, found = self.get_matrix(extractor_id, unique)
        return {sha: matrix[i] for i, sha in enumerate(unique) if found[i]}

    def get_matrix(self, extractor_id: str, sha256s: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(features, found): an (N, D) float16 matrix with row i the features of sha256s[i], and
        a boolean mask of the rows found (the others are zeros). D is the cached vectors' length
        (0 when none is cached); a blob of another length than the first found reads as missing.
        A store that does not answer raises (Unavailable): the training's images are there too."""
        if len(sha256s) > MAX_LOOKUP:
            raise ValueError(f"at most {MAX_LOOKUP} images per feature lookup, got {len(sha256s)}")
        keys = [feature_key(extractor_id, sha) for sha in sha256s]
        fill = _Fill(len(keys))
        missing = []
        for i, key in enumerate(keys):
            data = _read_file(f"{self._root}/{key}") if self.in_place else self.local.read(key) if self.local else None
            if data is not None and fill.put(i, data):
                continue
            if data is not None and self.local is not None:
                self.local.drop(key)  # a bad local copy: fetch it again
            missing.append(i)
        if missing and not self.in_place:
            self._fetch(keys, missing, fill)
        return fill.result()

    def missing(self, extractor_id: str, sha256s: list[str]) -> list[str]:
        """Of these images, those whose features are not cached, in order, each once, from the
        blobs' existence alone (nothing is read): on local disk a stat each; on a store that is
        not, the local copies, then one listing of each ab/ folder the others fall in (at most
        256 folders, a request per 1,000 keys in each)."""
        unique = list(dict.fromkeys(sha256s))
        keys = [feature_key(extractor_id, sha) for sha in unique]
        if self.in_place:
            return [sha for sha, key in zip(unique, keys) if not os.path.exists(f"{self._root}/{key}")]
        local = [self.local is not None and self.local.path(key).exists() for key in keys]
        present = self._present([key for key, here in zip(keys, local) if not here], list_from=1)
        return [sha for sha, key, here in zip(unique, keys, local) if not here and key not in present]

    def _fetch(self, keys: list[str], missing: list[int], fill: "_Fill") -> None:
        """Fetch the missing blobs from the store, keep local copies, fill their rows."""
        present = self._present([keys[i] for i in missing])
        todo = [i for i in missing if keys[i] in present]

        def get(i: int) -> bytes | None:
            try:
                return self.store.get(keys[i])
            except NotFound:
                return None

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for start in range(0, len(todo), 8 * self.workers):  # a chunk at a time: bounded memory
                chunk = todo[start:start + 8 * self.workers]
                for i, data in zip(chunk, pool.map(get, chunk)):
                    if data is None:
                        continue
                    if fill.put(i, data):
                        if self.local is not None:
                            self.local.write(keys[i], data)
                    else:
                        log.warning("feature blob %s is not a feature vector of this format: computing it again", keys[i])

    def _present(self, keys: list[str], list_from: int = _LIST_FROM) -> set[str]:
        """Of these keys, those that may exist: an ab/ folder with list_from of them or more is
        listed (one request per 1,000 keys there), the others are taken as possibly there."""
        folders: dict[str, list[str]] = {}
        for key in keys:
            folders.setdefault(key.rsplit("/", 1)[0] + "/", []).append(key)
        present = set()
        for folder, inside in folders.items():
            if len(inside) < list_from:
                present.update(inside)
            else:
                listed = set(self.store.list(folder))
                present.update(k for k in inside if k in listed)
        return present

    # --- writing -------------------------------------------------------------------------------

    def put_many(self, extractor_id: str, features: dict[str, np.ndarray]) -> None:
        """Store each vector as a blob (and a local copy). A vector float16 cannot hold is left
        uncached (logged). The store failing (full, unreachable) stops the writes with a warning:
        the features are a cache, and the training that computed them goes on."""
        if not features:
            return
        items = [(feature_key(extractor_id, sha), vector) for sha, vector in features.items()]
        refused, failed = [], Event()
        errors: list[Exception] = []

        def put(item: tuple[str, np.ndarray]) -> None:
            key, vector = item
            data = encode(vector)
            if data is None:
                refused.append(key)
                return
            if failed.is_set():
                return
            try:
                self.store.put(key, data)
            except (StorageFull, Unavailable, TooLarge) as e:
                errors.append(e)
                failed.set()
                return
            if self.local is not None:
                self.local.write(key, data)

        if isinstance(self.store, LocalBlobStore):  # one filesystem sync per batch instead of two fsyncs a blob
            for start in range(0, len(items), _LOCAL_BATCH):
                batch = []
                for key, vector in items[start:start + _LOCAL_BATCH]:
                    data = encode(vector)
                    if data is None:
                        refused.append(key)
                    else:
                        batch.append((key, data))
                try:
                    self.store.put_many(batch)
                except (StorageFull, Unavailable, TooLarge) as e:
                    errors.append(e)
                    break
        else:
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                for start in range(0, len(items), 8 * self.workers):
                    list(pool.map(put, items[start:start + 8 * self.workers]))
        if refused:
            log.warning("%d feature vectors of %s not cached: values beyond float16's range (|x| > %g) or not finite",
                        len(refused), extractor_id, FLOAT16_MAX)
        if errors:
            log.warning("feature blobs of %s not all stored (%s): the rest are computed again next time",
                        extractor_id, errors[0])


_LOCAL_BATCH = 512  # feature blobs (about 5 KB each) written with one put_many on local disk


class _Fill:
    """The matrix get_matrix fills, allocated at the first blob (its length gives D)."""

    def __init__(self, n: int):
        self.n, self.matrix, self.found = n, None, np.zeros(n, dtype=bool)

    def put(self, i: int, data: bytes) -> bool:
        vector = decode(data)
        if vector is None:
            return False
        if self.matrix is None:
            self.matrix = np.zeros((self.n, vector.shape[0]), dtype=np.float16)
        elif vector.shape[0] != self.matrix.shape[1]:
            return False
        self.matrix[i] = vector
        self.found[i] = True
        return True

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        matrix = self.matrix if self.matrix is not None else np.zeros((self.n, 0), dtype=np.float16)
        return matrix, self.found
