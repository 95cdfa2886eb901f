"""The metadata store's connections (service/store/db.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

# A process that holds the write lock of a fresh SQLite file (rollback journal: WAL not set yet),
# as a first `felis up` does while its other process migrates the new database.
HOLDER = textwrap.dedent("""
    import sqlite3, sys, time
    conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
    conn.execute("CREATE TABLE IF NOT EXISTS t(x)")
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO t VALUES (1)")
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    conn.execute("COMMIT")
""")


def test_a_connection_waits_for_another_process_holding_a_fresh_databases_write_lock(tmp_path):
    """Switching to WAL needs an exclusive lock, and SQLite answers "database is locked" at once
    (no busy timeout) while another connection holds the write lock: the API or the worker of a
    first `felis up` on a new data dir could die at start-up while the other migrated."""
    from sqlalchemy import text

    from service.store.db import make_engine

    path = tmp_path / "felis.db"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), "1.5"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        engine = make_engine(f"sqlite:///{path}")
        with engine.connect() as conn:  # waits for the lock, then switches to WAL
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("SELECT count(*) FROM t")).scalar() == 1  # after the holder's commit
        engine.dispose()
    finally:
        holder.wait(30)


@pytest.mark.production
def test_a_forked_process_never_uses_its_parents_pooled_connections(monkeypatch):
    """Celery's prefork pool forks each pool process (a new one after a child is OOM-killed or hits
    its time limit) from the worker's main process, whose sweep thread holds pooled PostgreSQL
    connections. A child that takes one of them shares its socket with the parent: the two
    interleave on one server session (errors seen: prepared statement "_pg3_2" does not exist, can't
    change 'autocommit' now: connection in transaction status INTRANS) and the re-queued training
    died. After a fork the child must open connections of its own."""
    from service.config import get_settings
    from service.store import db
    from tests.utils.processes import create_postgres_database

    url, drop = create_postgres_database()
    monkeypatch.setenv("FELIS_DATABASE_URL", url)
    get_settings.cache_clear()
    db.get_engine.cache_clear()
    try:
        engine = db.get_engine()
        with engine.connect() as conn:  # into the pool, as the sweep thread leaves it
            parent_backend = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: what a pool process's first query does
            try:
                with db.get_engine().connect() as conn:
                    os.write(write, str(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()).encode())
            finally:
                os._exit(0)
        os.close(write)
        child_backend = int(os.read(read, 64) or b"0")
        os.waitpid(pid, 0)
        assert child_backend and child_backend != parent_backend, "the child used the parent's connection"
        with engine.connect() as conn:  # and the parent's own is still sound
            assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    finally:
        db.get_engine().dispose()
        db.get_engine.cache_clear()
        get_settings.cache_clear()
        drop()
