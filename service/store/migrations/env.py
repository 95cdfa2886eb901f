"""The Alembic environment of felis, configured in code (service.store.migrate.alembic_config).

service.store.migrate passes the connection to migrate on, with the migration lock held. Without
one (``python -m service.store.migrate ...``, to write revisions) this opens FELIS_DATABASE_URL
(or the config's sqlalchemy.url) and takes the same lock.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import Connection

from service.store.tables import Base, UTCDateTime

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    from service.config import get_settings

    return config.get_main_option("sqlalchemy.url") or get_settings().database_url


def _render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    """Autogenerate writes UTCDateTime as the column type it is, so revisions import nothing of
    service.store.tables (a revision must keep meaning the same schema when tables.py changes)."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _migrate(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite's ALTER TABLE: copy and move
        compare_type=True,
        render_item=_render_item,
        # PostgreSQL: a transaction per revision, so a failure keeps the revisions before it and a
        # revision may use op.get_context().autocommit_block(). SQLite: migrate.py holds one
        # transaction around them all (its DDL would otherwise commit statement by statement).
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_offline() -> None:
    """``--sql``: print the DDL instead of running it."""
    url = _url()
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True, render_item=_render_item,
                      render_as_batch=url.startswith("sqlite"), transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
        return
    from service.store.db import make_engine
    from service.store.migrate import migration_connection

    engine = make_engine(_url())
    try:
        with migration_connection(engine) as connection:
            _migrate(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
