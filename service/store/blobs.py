"""Blob storage behind one interface: local disk (default) or an S3-compatible bucket.

Keys are relative paths, formatted only by the functions below: ``image_key`` gives
``images/ab/abcdef...`` (content-addressed by sha256, shared by every dataset) and
``model_keys`` gives ``models/<dataset id>/<training id>/model.pt`` and ``.../model.onnx`` (one
folder per training, so a version's files are written before its row exists and a training that
runs twice writes the same keys). Writes are atomic: a reader sees the whole blob or none.
"""

from __future__ import annotations

import errno
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from service.config import Settings, get_settings
from service.errors import NotFound, StorageFull, Unavailable


class BlobStore(Protocol):
    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def check(self) -> None: ...


def image_key(sha256: str) -> str:
    return f"images/{sha256[:2]}/{sha256}"


def model_keys(dataset_id: int, training_id: str) -> tuple[str, str]:
    """The checkpoint's and the ONNX graph's keys for what one training produced."""
    prefix = f"models/{dataset_id}/{training_id}"
    return f"{prefix}/model.pt", f"{prefix}/model.onnx"


def _safe_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid blob key {key!r}")
    return key


class LocalBlobStore:
    """Files under one root. put() writes a temp file, fsyncs it and renames it into place."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / _safe_key(key)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # make the rename itself durable
            finally:
                os.close(dir_fd)
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


class S3BlobStore:
    """An S3-compatible bucket (AWS S3, MinIO, Ceph...). PUTs are atomic by the protocol."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str = "", region: str = ""):
        import boto3  # optional dependency: only production with FELIS_STORAGE_BACKEND=s3 needs it

        self.bucket = bucket
        self.prefix = prefix
        self.client = boto3.client(
            "s3", endpoint_url=endpoint_url or None, region_name=region or None
        )

    def _key(self, key: str) -> str:
        return self.prefix + _safe_key(key)

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except self.client.exceptions.NoSuchKey as e:
            raise NotFound(f"blob {key} is missing", code="blob_missing") from e

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except Exception:
            return False

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as e:
            raise Unavailable(f"bucket {self.bucket} unreachable: {e}", code="storage_unavailable") from e


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
