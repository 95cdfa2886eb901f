"""service.store.blobs: atomic, content-addressed local blobs; disk full is a clean StorageFull."""

from __future__ import annotations

import errno
import os

import pytest

from service.errors import NotFound, StorageFull
from service.store.blobs import LocalBlobStore


def test_put_get_delete(tmp_path):
    store = LocalBlobStore(tmp_path)
    store.put("images/ab/abc", b"data")
    assert store.get("images/ab/abc") == b"data" and store.exists("images/ab/abc")
    store.put("images/ab/abc", b"new")
    assert store.get("images/ab/abc") == b"new"
    store.delete("images/ab/abc")
    with pytest.raises(NotFound):
        store.get("images/ab/abc")
    assert not list(tmp_path.rglob(".tmp-*"))


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "a/./b", ""])
def test_keys_cannot_escape_the_root(tmp_path, key):
    with pytest.raises(ValueError):
        LocalBlobStore(tmp_path).put(key, b"x")


def test_disk_full_leaves_nothing_behind(tmp_path, monkeypatch):
    store = LocalBlobStore(tmp_path)
    store.put("k/old", b"old")

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(StorageFull):
        store.put("k/old", b"new")
    monkeypatch.undo()
    assert store.get("k/old") == b"old"
    assert not list(tmp_path.rglob(".tmp-*"))


def test_sweep_removes_only_old_temp_files(tmp_path):
    store = LocalBlobStore(tmp_path)
    (tmp_path / "images").mkdir()
    old, fresh = tmp_path / "images" / ".tmp-old", tmp_path / "images" / ".tmp-new"
    old.write_bytes(b"half")
    fresh.write_bytes(b"half")
    os.utime(old, (1, 1))
    assert store.sweep_temp(older_than_s=60) == 1
    assert not old.exists() and fresh.exists()
