"""Blob storage behind one interface: local disk (default) or an S3-compatible bucket.

Keys are relative paths, formatted only by the functions below: ``image_key`` gives
``images/ab/abcdef...`` (content-addressed by sha256, shared by every dataset) and
``model_keys`` gives ``models/<dataset id>/<training id>/<run>/model.pt``, ``.../model.onnx`` and
``.../heldout.npz`` (the training images' held-out predictions and label-error report; one folder per claim of a training: a version's files are written before its row exists, and a
run that lost its claim to another worker never overwrites the files the version points at).
``feature_key`` gives ``features/<extractor id>/ab/abcdef....f16``: an image's cached frozen-backbone
features (service.store.features), shared by every dataset with those bytes. Writes are atomic: a
reader sees the whole blob or none. ``list(prefix)`` walks the keys under a prefix, in order.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from service.config import Settings, get_settings
from service.errors import NotFound, StorageFull, TooLarge, Unavailable


class BlobStore(Protocol):
    def put(self, key: str, data: bytes) -> None: ...
    def put_many(self, items: list[tuple[str, bytes]]) -> None: ...  # as put for each; all durable when it returns
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str, *, start_after: str = "", recursive: bool = True) -> Iterator[str]: ...
    def check(self) -> None: ...


def image_key(sha256: str) -> str:
    return f"images/{sha256[:2]}/{sha256}"


def thumbnail_key(sha256: str, size: int) -> str:
    """A cached thumbnail of the image blob ``image_key(sha256)``: ``thumbs/<size>/ab/abcdef....jpg``
    (size: the longest side in pixels). Derived bytes: collecting the image blob removes them."""
    return f"thumbs/{int(size)}/{sha256[:2]}/{sha256}.jpg"


FEATURES_PREFIX = "features/"
# an extractor id is one safe path component: models.features builds them from the backbone's name,
# preprocessing, pooling, precision and weights hash (letters, digits, '.', '_', '-')
_EXTRACTOR_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FEATURE_KEY = re.compile(r"features/([A-Za-z0-9][A-Za-z0-9._-]{0,127})/([0-9a-f]{2})/([0-9a-f]{64})\.f16")


def feature_key(extractor_id: str, sha256: str) -> str:
    """The cached features of the image blob ``image_key(sha256)`` for one extractor:
    ``features/<extractor id>/ab/abcdef....f16`` (service.store.features writes and reads them)."""
    if not isinstance(extractor_id, str) or not _EXTRACTOR_ID.fullmatch(extractor_id):
        raise ValueError(f"invalid feature extractor id {extractor_id!r}: 1-128 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise ValueError(f"invalid image sha256 {sha256!r}: 64 lowercase hex digits")
    return f"{FEATURES_PREFIX}{extractor_id}/{sha256[:2]}/{sha256}.f16"


def parse_feature_key(key: str) -> tuple[str, str] | None:
    """(extractor id, sha256) of a ``feature_key``; None for any other key."""
    m = _FEATURE_KEY.fullmatch(key)
    return (m.group(1), m.group(3)) if m and m.group(3)[:2] == m.group(2) else None


def model_keys(dataset_id: int, training_id: str, run: str) -> tuple[str, str]:
    """The checkpoint's and the ONNX graph's keys for what one run (claim) of a training produced."""
    prefix = _model_prefix(dataset_id, training_id, run)
    return f"{prefix}/model.pt", f"{prefix}/model.onnx"


def heldout_key(dataset_id: int, training_id: str, run: str) -> str:
    """The key of one run's held-out predictions (service.domain.label_issues reads them)."""
    return f"{_model_prefix(dataset_id, training_id, run)}/heldout.npz"


def _model_prefix(dataset_id: int, training_id: str, run: str) -> str:
    return f"models/{dataset_id}/{training_id}/{run}"


def _safe_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid blob key {key!r}")
    return key


def _load_syncfs():
    """libc's syncfs(2) (Linux): flushes one filesystem, the one a descriptor is on."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    return fn


_SYNCFS = _load_syncfs()
_CAN_SYNCFS = _SYNCFS is not None


def _syncfs(folder: Path) -> None:
    import ctypes

    fd = os.open(folder, os.O_RDONLY)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, durable: bool) -> None:
    """``data`` as the file ``path`` (its folders made), all or nothing: a temp file beside it,
    renamed into place; the temp file removed on any failure. ``durable``: the file fsynced before
    the rename and its folder after it, so the write survives a crash (else a crash may lose it,
    never leave part of it). Raises what the filesystem raises (OSError)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)


class LocalBlobStore:
    """Files under one root. put() writes a temp file, fsyncs it and renames it into place;
    put_many() does the same for many blobs with one filesystem sync per step instead of two fsyncs
    a file (fsyncs were three quarters of an upload's time: 2,000 CIFAR images, 14 of 18.6 s)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / _safe_key(key)

    def put(self, key: str, data: bytes) -> None:
        try:
            write_atomic(self._path(key), data, durable=True)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull("no space left in blob storage", code="storage_full") from e
            raise

    def put_many(self, items: list[tuple[str, bytes]]) -> None:
        """Every (key, data) written atomically, all of them durable when it returns: the temp files
        written, one sync of the filesystem (their data), the renames, one more sync (the renames).
        A crash leaves each key's old blob or its new one, never part of one (and temp files, which
        sweep_temp removes). Where syncfs(2) is not available, each file is fsynced as put does."""
        if not _CAN_SYNCFS:
            for key, data in items:
                self.put(key, data)
            return
        staged: list[tuple[str, Path]] = []
        try:
            try:
                for key, data in items:
                    path = self._path(key)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
                    staged.append((tmp, path))
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
                _syncfs(self.root)  # the data of every temp file
                while staged:
                    tmp, path = staged[-1]
                    os.replace(tmp, path)
                    staged.pop()
                _syncfs(self.root)  # the renames
            finally:
                for tmp, _ in staged:  # written but not renamed: never a key
                    Path(tmp).unlink(missing_ok=True)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull("no space left in blob storage", code="storage_full") from e
            raise

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as e:
            raise NotFound(f"blob {key} is missing", code="blob_missing") from e

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str, *, start_after: str = "", recursive: bool = True) -> Iterator[str]:
        """The keys that start with ``prefix`` (a folder ``a/b/``, or any start of a key), after
        ``start_after``, lazily, folder by folder in name order (so a scan can stop anywhere and go
        on from the last key it saw). ``recursive=False``: only the level just under the prefix's
        folder, a subfolder as its key plus "/" (as S3's CommonPrefixes). Temp files are never keys."""
        folder, _, stem = prefix.rpartition("/")
        base = _safe_key(folder).split("/") if folder else []
        after = tuple(start_after.split("/")) if start_after else ()
        yield from self._walk(self.root.joinpath(*base), base, stem, after, recursive)

    def _walk(self, path: Path, parts: list[str], stem: str, after: tuple[str, ...], recursive: bool) -> Iterator[str]:
        try:
            entries = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in os.scandir(path))
        except (FileNotFoundError, NotADirectoryError):
            return
        for name, is_dir in entries:
            if not name.startswith(stem) or name.startswith(".tmp-"):
                continue
            here = (*parts, name)
            if is_dir:
                if here < after[:len(here)]:
                    continue  # the whole folder is before start_after
                if not recursive:
                    if here > after[:len(here)]:
                        yield "/".join(here) + "/"
                    continue
                yield from self._walk(path / name, [*here], "", after, recursive)
            elif here > after:
                yield "/".join(here)

    def sweep_temp(self, older_than_s: float = 3600) -> int:
        """Remove temp files a crashed writer left behind (a live writer's are younger)."""
        import time

        cutoff, removed = time.time() - older_than_s, 0
        for tmp in self.root.rglob(".tmp-*"):
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def check(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise Unavailable(f"blob storage {self.root} is not writable", code="storage_unavailable")


# S3 error codes that mean "no room left", from the S3-compatible servers people run; like a full
# local disk they are StorageFull (HTTP 507). Any answer with HTTP status 507 is too.
S3_STORAGE_FULL_CODES = frozenset({
    "QuotaExceeded",  # Ceph RGW (403): user or bucket quota; also services built on RGW
    "XMinioAdminBucketQuotaExceeded",  # MinIO (400): bucket quota (`mc quota set`)
    "XMinioStorageFull",  # MinIO (507; 500 in older releases) and SeaweedFS: drives past their free-space threshold
    "InsufficientStorage",  # HTTP 507 by name
    "StorageFull",
})
_S3_TOO_LARGE_CODES = frozenset({"EntityTooLarge"})  # one object over the server's size limit
_S3_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_S3_NO_BUCKET_CODES = frozenset({"NoSuchBucket", "404", "NotFound"})


def _s3_prefix(prefix: str) -> str:
    """"felis", "felis/" and "/felis/" all mean the folder ``felis/``; "" the bucket's root."""
    prefix = prefix.strip("/")
    return f"{prefix}/" if prefix else ""


class S3BlobStore:
    """An S3-compatible bucket (AWS S3, MinIO, Ceph RGW...), every key under ``prefix``.

    Writes are atomic by the protocol: a PUT is all-or-nothing, so a reader sees the old object, the
    whole new one, or none, never part of one (and S3, MinIO and RGW read their own writes at once).
    Credentials come from boto3's standard chain: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``
    (and ``AWS_SESSION_TOKEN``), ``AWS_PROFILE``, web identity (EKS IRSA) or the instance role.
    Every call is bounded: connect and read timeouts, and a few retries in botocore's ``standard``
    mode (throttling, 5xx, dropped connections) with backoff. Failures leave as domain errors: a
    missing key is NotFound (``blob_missing``), a full or over-quota store StorageFull
    (``storage_full``), anything else that keeps the store from answering Unavailable
    (``storage_unavailable``)."""

    list_page_size = 1000  # keys per ListObjectsV2 request (S3's most)

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str = "", region: str = "", *,
                 connect_timeout: float = 5, read_timeout: float = 30, max_attempts: int = 3,
                 max_pool_connections: int = 16):
        try:  # an optional dependency: only FELIS_STORAGE_BACKEND=s3 needs it
            import boto3
            from botocore.config import Config
        except ImportError as e:
            raise ImportError("FELIS_STORAGE_BACKEND=s3 needs boto3, which is not installed: "
                              "pip install 'felis[s3]' (the felis images include it)") from e
        self.bucket = bucket
        self.prefix = _s3_prefix(prefix)
        self.endpoint_url = endpoint_url or None
        self._boto3 = boto3
        self._client_args = {
            "endpoint_url": self.endpoint_url,
            "region_name": region or None,
            "config": Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                             retries={"mode": "standard", "total_max_attempts": max_attempts},
                             max_pool_connections=max_pool_connections),  # decode threads read in parallel
        }
        self._client, self._pid = self._new_client(), os.getpid()

    def _new_client(self):
        # a session of its own: credentials are looked up now, not once per process by boto3's default session
        return self._boto3.session.Session().client("s3", **self._client_args)

    @property
    def client(self):
        """The boto3 client; a new one in a forked child, which must not share the parent's sockets."""
        if self._pid != os.getpid():
            self._client, self._pid = self._new_client(), os.getpid()
        return self._client

    def _key(self, key: str) -> str:
        return self.prefix + _safe_key(key)

    def _where(self, key: str | None) -> str:
        return f"s3://{self.bucket}/{self._key(key)}" if key is not None else f"bucket {self.bucket!r}"

    @contextmanager
    def _errors(self, action: str, key: str | None = None) -> Iterator[None]:
        """botocore's exceptions, as the domain errors the API maps to HTTP."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            CredentialRetrievalError,
            NoCredentialsError,
            ParamValidationError,
            PartialCredentialsError,
        )

        try:
            yield
        except ClientError as e:
            raise self._client_error(e, action, key) from e
        except (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError) as e:
            raise Unavailable(f"no usable S3 credentials ({e}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                              "AWS_PROFILE, or a role", code="storage_unavailable") from e
        except ParamValidationError:
            raise  # a bug here, not an outage
        except BotoCoreError as e:  # connection refused or reset, timeouts, a cut-off body
            raise Unavailable(f"S3 storage at {self.endpoint_url or 'AWS'} is unreachable: {action} {self._where(key)}: {e}",
                              code="storage_unavailable") from e

    def _client_error(self, e, action: str, key: str | None) -> Exception:
        error = e.response.get("Error", {})
        code = str(error.get("Code") or "")
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        said = f"{code or status}: {error.get('Message') or 'no message'}"
        if code in S3_STORAGE_FULL_CODES or status == 507:
            return StorageFull(f"S3 storage is full or over quota ({said})", code="storage_full")
        if code in _S3_TOO_LARGE_CODES:
            return TooLarge(f"S3 refused {self._where(key)} as too large ({said})", code="blob_too_large")
        if key is None and (code in _S3_NO_BUCKET_CODES or status == 404):
            return Unavailable(f"bucket {self.bucket!r} does not exist at {self.endpoint_url or 'AWS'}",
                               code="storage_unavailable")
        return Unavailable(f"S3 refused to {action} {self._where(key)} ({said})", code="storage_unavailable")

    def put(self, key: str, data: bytes) -> None:
        with self._errors("write", key):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_many(self, items: list[tuple[str, bytes]]) -> None:
        """Each a PUT, eight at a time (the latency of one is most of its cost); the first error raised."""
        from concurrent.futures import ThreadPoolExecutor

        if len(items) <= 1:
            for key, data in items:
                self.put(key, data)
            return
        with ThreadPoolExecutor(max_workers=min(8, len(items))) as pool:
            for _ in pool.map(lambda item: self.put(*item), items):
                pass

    def get(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        with self._errors("read", key):  # the body is read inside: a cut-off body is Unavailable too
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in _S3_MISSING_CODES:
                    raise NotFound(f"blob {key} is missing", code="blob_missing") from e
                raise

    def exists(self, key: str) -> bool:
        """head_object: 404 is False; any other failure raises (403 included: without
        s3:ListBucket S3 answers 403 for a missing key, and the store needs that permission)."""
        from botocore.exceptions import ClientError

        with self._errors("look up", key):
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
                return True
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in _S3_MISSING_CODES:
                    return False
                raise

    def delete(self, key: str) -> None:
        """Idempotent, as on local disk: S3 answers 204 for a key that is not there."""
        from botocore.exceptions import ClientError

        with self._errors("delete", key):
            try:
                self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") not in _S3_MISSING_CODES:
                    raise

    def list(self, prefix: str, *, start_after: str = "", recursive: bool = True) -> Iterator[str]:
        """The keys that start with ``prefix``, after ``start_after``, in key order, lazily: one
        ListObjectsV2 page (up to 1,000 keys) at a time, as the caller reads on. ``recursive=False``:
        only the level under the prefix's folder, a subfolder as its key plus "/" (CommonPrefixes)."""
        folder = prefix.rpartition("/")[0]
        if folder:
            _safe_key(folder)
        args = {"Bucket": self.bucket, "Prefix": self.prefix + prefix}
        if start_after:
            args["StartAfter"] = self.prefix + start_after
        if not recursive:
            args["Delimiter"] = "/"
        cut = len(self.prefix)
        with self._errors(f"list the keys under {prefix!r} in"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                **args, PaginationConfig={"PageSize": self.list_page_size})
            for page in pages:
                names = [o["Key"] for o in page.get("Contents", [])] + [p["Prefix"] for p in page.get("CommonPrefixes", [])]
                for name in sorted(names):
                    if not start_after or name[cut:] > start_after:  # a folder equal to start_after's start: already begun
                        yield name[cut:]

    def check(self) -> None:
        """For /readyz: head_bucket, which needs the bucket, the credentials and s3:ListBucket."""
        with self._errors("reach"):
            self.client.head_bucket(Bucket=self.bucket)


def make_store(settings: Settings) -> BlobStore:
    if settings.storage_backend == "s3":
        return S3BlobStore(
            settings.s3_bucket, settings.s3_prefix, settings.s3_endpoint_url, settings.s3_region
        )
    assert settings.storage_path is not None
    return LocalBlobStore(settings.storage_path)


@lru_cache
def get_store() -> BlobStore:
    return make_store(get_settings())
