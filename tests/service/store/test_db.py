"""The metadata store's connections (service/store/db.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

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
