"""The metadata store: one SQLAlchemy engine per process (SQLite by default, PostgreSQL by URL)."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from service.config import get_settings


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # SQLAlchemy's pysqlite recipe, part one: pysqlite begins no transaction of its own (_sqlite_begin
    # does). Left to itself it began only before INSERT/UPDATE/DELETE, never before SAVEPOINT, so
    # a RELEASE SAVEPOINT committed everything before it and a rollback undid nothing.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_S * 1000}")  # wait for the other process's write instead of failing
    _wal(cur)  # readers never block the writer (API + worker processes)
    cur.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; WAL keeps it consistent
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


_BUSY_TIMEOUT_S = 30


def _wal(cur) -> None:
    """Switch to WAL, waiting for another process's write lock. Switching needs an exclusive lock,
    and while another connection holds the write lock of a database still in rollback-journal
    mode (a new one, which the other process of a first `felis up` is migrating) SQLite answers
    "database is locked" at once, without its busy timeout: so retry until that timeout."""
    deadline = time.monotonic() + _BUSY_TIMEOUT_S
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


_WRITES = frozenset({"INSERT", "UPDATE", "DELETE", "REPLACE", "SAVEPOINT", "CREATE", "DROP", "ALTER"})


def _sqlite_begin(conn, cursor, statement: str, _parameters, context, _executemany) -> None:
    """Part two: our own BEGIN, so that a SQLAlchemy transaction is one SQLite transaction.

    Not at the transaction's first statement, as the recipe's ``begin`` event does: a transaction
    that reads, then writes after another process has committed, cannot take the write lock
    (SQLITE_BUSY_SNAPSHOT, "database is locked" at once: busy_timeout does not apply). So reads
    run alone until the transaction's first write (or SAVEPOINT, or SELECT ... FOR UPDATE, which
    then means what it says), which sends ``BEGIN IMMEDIATE`` first: it waits for the write lock
    (busy_timeout) and holds it to the COMMIT, and everything from there is one transaction.
    """
    if cursor.connection.in_transaction or not conn.in_transaction():
        return
    keyword = statement.lstrip()[:9].split(None, 1)[0].upper() if statement.strip() else ""
    if keyword in _WRITES or (keyword == "SELECT" and _locks_rows(context)):
        cursor.execute("BEGIN IMMEDIATE")


def _locks_rows(context) -> bool:
    statement = getattr(getattr(context, "compiled", None), "statement", None)
    return getattr(statement, "_for_update_arg", None) is not None


DB_CONNECT_TIMEOUT_S = 5
DB_STATEMENT_TIMEOUT_MS = 30_000


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            from pathlib import Path

            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": _BUSY_TIMEOUT_S})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "before_cursor_execute", _sqlite_begin)
        return engine
    # Bounded waits: an unreachable server fails a connect in DB_CONNECT_TIMEOUT_S, a statement
    # stuck behind a lock or a slow disk in DB_STATEMENT_TIMEOUT_MS (migrations lift it for
    # their own connection), so no request or heartbeat hangs on the database.
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, pool_timeout=10,
                         connect_args={"connect_timeout": DB_CONNECT_TIMEOUT_S,
                                       "options": f"-c statement_timeout={DB_STATEMENT_TIMEOUT_MS}"})


@lru_cache
def get_engine() -> Engine:
    return make_engine(get_settings().database_url)


def _forget_inherited_connections() -> None:
    """In a forked child (Celery's pool processes, forked from a worker whose sweep thread holds
    pooled connections; a new one each time a child is OOM-killed or hits its time limit): a pool
    of its own, the parent's connections left open for the parent (SQLAlchemy's recipe for
    multiprocessing, dispose(close=False)). Sharing one would interleave two processes on one
    server session."""
    if get_engine.cache_info().currsize:
        get_engine().dispose(close=False)


os.register_at_fork(after_in_child=_forget_inherited_connections)


@lru_cache
def _sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


def new_session() -> Session:
    return _sessionmaker()()


@contextmanager
def session_scope() -> Iterator[Session]:
    """A unit of work: commit on success, roll back on any error."""
    session = new_session()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def init_db() -> None:
    """Make sure the database has this code's schema before the process uses it (every process
    calls it at start; the name predates migrations).

    Embedded mode (the default) migrates: ``service.store.migrate.upgrade``, one query when the
    schema is current, else under a lock so the API and the worker starting together migrate
    once. Production (``FELIS_MODE=production``) never migrates implicitly: ``felis migrate`` is
    its own deployment step, and here a schema that is not the code's raises
    ``service.errors.SchemaOutdated`` (naming ``felis migrate``), so the process refuses to start.
    """
    from service.store import migrate

    engine = get_engine()
    if get_settings().mode == "production":
        migrate.check_schema(engine)
    else:
        migrate.upgrade(engine)


def reset_caches() -> None:
    """Forget the engine (tests switch databases between cases)."""
    if get_engine.cache_info().currsize:
        get_engine().dispose()
    get_engine.cache_clear()
    _sessionmaker.cache_clear()


def is_unreachable(e: BaseException) -> bool:
    """A lost or refused connection (the database restarting, failing over), not a bad statement."""
    from sqlalchemy.exc import DBAPIError, OperationalError

    return isinstance(e, DBAPIError) and (e.connection_invalidated or isinstance(e, OperationalError))


def unreachable_reason(e: BaseException) -> str:
    """One line for a log: the driver's first line (a traceback per beat says nothing more)."""
    cause = getattr(e, "orig", None) or e
    return f"{type(cause).__name__}: {(str(cause).splitlines() or [''])[0]}"
