"""Schema migrations of the metadata store (Alembic), run from code: no alembic.ini.

The revisions live in ``service/store/migrations/versions``, one line of history from
``0001_baseline``: the tables of felis 0.1.0, which made them with ``create_all`` and kept no
version. The code's schema is the head revision, and ``service.store.tables`` must describe the
same schema (tests/service/store/test_migrations.py compares them).

- ``upgrade(engine)``: brings the database to head, under a lock so that processes starting
  together migrate once. A database of felis 0.1.0 (its tables, no ``alembic_version``) is
  stamped at the baseline first; an empty one is built from the first revision.
- ``check_schema(engine)``: raises ``SchemaOutdated`` unless the database is at head (production
  runs migrations as their own step, ``felis migrate``, and never implicitly).
- ``current_revision(engine)``, ``head_revision()``, ``describe(engine)`` (for people).

Writing a revision (the alembic command line, configured the same way; the URL is
``FELIS_DATABASE_URL``, a database at head)::

    python -m service.store.migrate revision --autogenerate --rev-id 000N_<what> -m "<what>"

Revision ids are the file names (versions/000N_<what>.py), 32 characters at most.
"""

from __future__ import annotations

import logging
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import lru_cache
from pathlib import Path

# Importing alembic logs seven INFO lines ("setup plugin ...") once logging is configured, as it
# is in the API and the workers before init_db: keep them out of every process's start.
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.exc import SQLAlchemyError

from service.errors import SchemaOutdated

log = logging.getLogger("felis.migrate")

MIGRATIONS = Path(__file__).resolve().with_name("migrations")
BASELINE = "0001_baseline"
# What felis 0.1.0's create_all made: a database with these tables and no alembic_version is at BASELINE.
BASELINE_TABLES = frozenset({"datasets", "images", "trainings", "model_versions", "image_features", "api_keys"})
# The advisory lock key 0.1.0's init_db took around create_all: old and new processes exclude each other.
PG_LOCK_KEY = 72657
MIGRATE_COMMAND = "felis migrate"
VERSION_TABLE = "alembic_version"  # Alembic's default name


def alembic_config(connection: Connection | None = None) -> Config:
    """The Alembic configuration, built in code. With a connection, env.py migrates on it (the
    caller holds the lock); without one, env.py opens FELIS_DATABASE_URL and takes the lock."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("file_template", "%%(rev)s")  # versions/0002_<what>.py from --rev-id 0002_<what>
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@lru_cache
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The revision this code's schema is (service.store.tables describes the same schema)."""
    head = _script().get_current_head()  # raises if the history has branched: one line only
    if head is None:
        raise RuntimeError(f"no revisions in {MIGRATIONS / 'versions'}")
    return head


def _known(revision: str) -> bool:
    try:
        return _script().get_revision(revision) is not None
    except CommandError:  # ResolutionError: not a revision of this code
        return False


@contextmanager
def _connection(bind: Engine | Connection) -> Iterator[Connection]:
    if isinstance(bind, Connection):
        yield bind
    else:
        with bind.connect() as conn:
            yield conn


def current_revision(bind: Engine | Connection) -> str | None:
    """The database's revision; None when it has no alembic_version (empty, or made by 0.1.0).
    Two queries, and quiet (Alembic's MigrationContext logs two INFO lines per look)."""
    with _connection(bind) as conn:
        if not inspect(conn).has_table(VERSION_TABLE):
            return None
        revisions = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
    if len(revisions) > 1:  # branches: never made by this code's single line of revisions
        raise SchemaOutdated(f"the database is at several schema revisions at once ({', '.join(sorted(revisions))})",
                             details={"current": sorted(revisions), "state": "unknown"})
    return revisions[0] if revisions else None


def _where(conn: Connection) -> str:
    return conn.engine.url.render_as_string(hide_password=True)


def _baseline_state(conn: Connection) -> tuple[str, set[str]]:
    """For a database without a revision: 'empty' (no felis table), 'baseline' (every table of
    0.1.0) or 'unrecognised' (some of them), and the baseline tables that are missing."""
    present = BASELINE_TABLES & set(inspect(conn).get_table_names())
    if not present:
        return "empty", set(BASELINE_TABLES)
    if present == BASELINE_TABLES:
        return "baseline", set()
    return "unrecognised", set(BASELINE_TABLES - present)


def _mismatch(conn: Connection, current: str | None, head: str) -> SchemaOutdated:
    """The error for a database that is not at head, saying what it is and what to do."""
    where = _where(conn)
    details = {"current": current, "head": head, "database": where}
    if current is None:
        state, missing = _baseline_state(conn)
        if state == "empty":
            message = (f"the database {where} has no felis tables yet (this code's schema is {head}): "
                       f"run `{MIGRATE_COMMAND}` to create them")
        elif state == "baseline":
            message = (f"the database {where} has the tables of felis 0.1.0 but no migration history; this "
                       f"code needs schema {head}: run `{MIGRATE_COMMAND}` (it records the baseline, then upgrades)")
        else:
            message = (f"the database {where} has some felis tables but not {', '.join(sorted(missing))}, and no "
                       f"migration history: it is no schema felis made, so `{MIGRATE_COMMAND}` will not touch it")
        return SchemaOutdated(message, details={**details, "state": state})
    if _known(current):
        return SchemaOutdated(f"the database {where} is at schema revision {current}, this code needs {head}: "
                              f"run `{MIGRATE_COMMAND}` to upgrade it", details={**details, "state": "older"})
    return SchemaOutdated(f"the database {where} is at schema revision {current}, which this code does not know "
                          f"(its newest is {head}): it was migrated by a newer felis. Run that version (or restore "
                          f"a backup); `{MIGRATE_COMMAND}` never downgrades", details={**details, "state": "unknown"})


def describe(bind: Engine | Connection) -> str:
    """The database's revision, for people: the revision, or what a database without one holds."""
    with _connection(bind) as conn:
        current = current_revision(conn)
        if current is not None:
            return current if _known(current) else f"{current} (unknown to this code: a newer felis's?)"
        state, _ = _baseline_state(conn)
    return {"empty": "none (no felis tables)",
            "baseline": "none (the tables of felis 0.1.0, no migration history)",
            "unrecognised": "none (some felis tables, but no schema felis made)"}[state]


def check_schema(bind: Engine | Connection) -> str:
    """The head revision if the database is at it; else raises SchemaOutdated naming `felis migrate`
    (older, never migrated, or empty) or saying it is newer than this code."""
    head = head_revision()
    with _connection(bind) as conn:
        current = current_revision(conn)
        if current != head:
            raise _mismatch(conn, current, head)
    return head


# --- the lock: one migrator at a time ----------------------------------------------------------


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: BEGIN IMMEDIATE alone serializes the migrators
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # waits for the other migrator; released when closed
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextmanager
def migration_connection(engine: Engine) -> Iterator[Connection]:
    """A connection that only one process at a time holds, to migrate on; committed at the end.

    PostgreSQL: a session advisory lock (kept through any commit a revision makes); Alembic runs
    each revision in a transaction of its own. SQLite: an flock on ``<db>.migrate.lock`` and one
    ``BEGIN IMMEDIATE`` transaction for the whole upgrade, with foreign keys off meanwhile (a batch
    ALTER copies and drops a table: with them on, the drop would cascade to the rows that
    reference it) and checked before the commit.
    """
    if engine.dialect.name == "sqlite":
        with _sqlite_migration_connection(engine) as conn:
            yield conn
        return
    with engine.connect() as conn:
        locked = engine.dialect.name == "postgresql"
        if locked:
            conn.execute(text("SET statement_timeout = 0"))  # a revision may rewrite a big table
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": PG_LOCK_KEY})
            conn.commit()
        try:
            yield conn
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        finally:
            if locked:
                try:
                    conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": PG_LOCK_KEY})
                    conn.execute(text("RESET statement_timeout"))  # back to the engine's, for the pool
                    conn.commit()
                except SQLAlchemyError:  # the connection broke: discarding it ends the session and its lock
                    conn.invalidate()


@contextmanager
def _sqlite_migration_connection(engine: Engine) -> Iterator[Connection]:
    database = engine.url.database
    on_disk = bool(database) and database != ":memory:" and not database.startswith("file:")
    with _file_lock(Path(f"{database}.migrate.lock")) if on_disk else nullcontext(), engine.connect() as conn:
        raw = conn.connection.dbapi_connection  # the sqlite3 connection, not in a transaction yet
        raw.execute("PRAGMA foreign_keys=OFF")  # only outside a transaction does it take effect
        try:
            if conn.exec_driver_sql("PRAGMA foreign_keys").scalar() != 0:
                raise RuntimeError("could not turn SQLite's foreign keys off to migrate")
            # pysqlite sends no BEGIN before DDL (each statement would commit alone): send it, and take
            # the write lock now. Unless the engine already sent one (SQLAlchemy's pysqlite BEGIN recipe).
            if not raw.in_transaction:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            yield conn
            broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise RuntimeError(f"the migration left rows without their parent (table, rowid, parent, fk): {broken[:10]}")
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        finally:
            try:
                raw.execute("PRAGMA foreign_keys=ON")  # as db.py's connections have it
            except sqlite3.Error:  # a broken or closed connection: never hand it out again
                conn.invalidate()


def _end_reads(conn: Connection) -> None:
    """PostgreSQL: close the transaction our reads opened, so Alembic runs its own per revision.
    SQLite: keep the BEGIN IMMEDIATE transaction open (migration_connection commits it)."""
    if conn.dialect.name != "sqlite":
        conn.commit()


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Bring the database to the head revision; returns (revision before, revision after).

    Cheap when it is already there (two small queries, no lock). Otherwise, under the migration lock: an
    empty database gets every revision, one made by felis 0.1.0 is stamped at 0001_baseline and
    upgraded; one at a revision this code does not know (a newer felis's) raises SchemaOutdated.
    """
    head = head_revision()
    current = current_revision(engine)
    if current == head:
        return current, head
    with migration_connection(engine) as conn:
        before = current_revision(conn)  # again: another process may have migrated while we waited
        if before == head:
            return before, head
        state = None
        if before is None:
            state, _ = _baseline_state(conn)
            if state == "unrecognised":
                raise _mismatch(conn, before, head)
            if state == "baseline":
                log.info("database made by felis 0.1.0 (no migration history): recording it at %s", BASELINE)
                _end_reads(conn)
                command.stamp(alembic_config(conn), BASELINE)
        elif not _known(before):
            raise _mismatch(conn, before, head)
        _end_reads(conn)
        log.info("migrating the database from %s to %s",
                 before or ("an empty schema" if state == "empty" else BASELINE), head)
        command.upgrade(alembic_config(conn), "head")
        after = current_revision(conn)
        _end_reads(conn)
    return before, after


def main(argv: list[str] | None = None) -> int:
    """The alembic command line on this configuration, for writing revisions (operators run
    `felis migrate`)."""
    from alembic.config import CommandLine

    cli = CommandLine(prog="python -m service.store.migrate")
    options = cli.parser.parse_args(argv)
    if not hasattr(options, "cmd"):
        cli.parser.error("too few arguments")
    cli.run_cmd(alembic_config(), options)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
