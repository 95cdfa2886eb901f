"""service.store.blobs: atomic, content-addressed local blobs; disk full is a clean StorageFull."""

from __future__ import annotations

import errno
import os

import pytest

from service.errors import NotFound, StorageFull
from service.store import blobs
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


def test_put_many_writes_every_blob_atomically_and_leaves_no_temp_file(tmp_path):
    store = LocalBlobStore(tmp_path)
    store.put("images/aa/old", b"old")
    items = [(f"images/{i:02x}/{i:064x}", bytes([i]) * (i + 1)) for i in range(40)] + [("images/aa/old", b"new")]
    store.put_many(items)
    assert all(store.get(k) == v for k, v in items)
    assert not list(tmp_path.rglob(".tmp-*"))
    store.put_many([])


def test_put_many_on_a_full_disk_stores_none_of_them(tmp_path, monkeypatch):
    store = LocalBlobStore(tmp_path)
    store.put("k/old", b"old")
    monkeypatch.setattr(blobs, "_syncfs", lambda folder: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(StorageFull):
        store.put_many([("k/new", b"new"), ("k/old", b"newer")])
    monkeypatch.undo()
    assert store.get("k/old") == b"old" and not store.exists("k/new")
    assert not list(tmp_path.rglob(".tmp-*"))


def test_put_many_without_syncfs_fsyncs_each_file(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(blobs, "_CAN_SYNCFS", False)
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    store = LocalBlobStore(tmp_path)
    store.put_many([("a/1", b"x"), ("a/2", b"y")])
    assert store.get("a/1") == b"x" and store.get("a/2") == b"y" and len(synced) == 4  # file + folder each


_KILLED_MIDWAY = """
import os, signal, sys
from pathlib import Path
from service.store import blobs
store = blobs.LocalBlobStore(Path(sys.argv[1]))
real = blobs._syncfs
def sync_then_die(folder):
    real(folder)
    os.kill(os.getpid(), signal.SIGKILL)  # the data is on disk, no rename has happened
blobs._syncfs = sync_then_die
store.put_many([("k/new", b"new" * 1000), ("k/old", b"newer" * 1000)])
"""


def test_put_many_killed_between_its_writes_and_its_renames_leaves_the_old_blobs(tmp_path):
    """SIGKILL at the moment that matters (every temp file written and synced, none renamed): no
    key shows a new blob, the old ones are whole, and the temp files are what sweep_temp removes."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    store = LocalBlobStore(tmp_path)
    store.put("k/old", b"old")
    proc = subprocess.run([sys.executable, "-c", _KILLED_MIDWAY, str(tmp_path)], cwd=ROOT, capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    assert store.get("k/old") == b"old" and not store.exists("k/new")
    assert len(list(tmp_path.rglob(".tmp-*"))) == 2
    assert store.sweep_temp(older_than_s=-1) == 2 and not list(tmp_path.rglob(".tmp-*"))


def test_sweep_removes_only_old_temp_files(tmp_path):
    store = LocalBlobStore(tmp_path)
    (tmp_path / "images").mkdir()
    old, fresh = tmp_path / "images" / ".tmp-old", tmp_path / "images" / ".tmp-new"
    old.write_bytes(b"half")
    fresh.write_bytes(b"half")
    os.utime(old, (1, 1))
    assert store.sweep_temp(older_than_s=60) == 1
    assert not old.exists() and fresh.exists()
