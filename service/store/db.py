"""The metadata store: one SQLAlchemy engine per process (SQLite by default, PostgreSQL by URL)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from service.config import get_settings


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer (API + worker processes)
    cur.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; WAL keeps it consistent
    cur.execute("PRAGMA busy_timeout=30000")  # wait for the other process's write instead of failing
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            from pathlib import Path

            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


@lru_cache
def get_engine() -> Engine:
    return make_engine(get_settings().database_url)


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
