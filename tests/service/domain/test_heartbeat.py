"""service.domain.heartbeat: a beat that fails is logged and tried again; a database outage in
one line a beat (before: a traceback of 110 lines every 20 s per training while it lasted)."""

from __future__ import annotations

import logging
import time

from sqlalchemy import create_engine, text

from service.domain.heartbeat import Heartbeat


def _refused() -> bool:
    """A beat against a PostgreSQL that is not there: the driver's own connection refusal."""
    engine = create_engine("postgresql+psycopg://felis@127.0.0.1:9/felis", connect_args={"connect_timeout": 2})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    finally:
        engine.dispose()
    return True


def _beats(beat, caplog) -> list[logging.LogRecord]:
    with caplog.at_level(logging.WARNING, logger="felis.heartbeat"):
        hb = Heartbeat(beat, 0.05, "training t")
        hb.start()
        deadline = time.monotonic() + 20
        while len(caplog.records) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        hb.stop()
    return list(caplog.records)


def test_a_database_outage_is_one_line_a_beat(caplog):
    records = _beats(_refused, caplog)
    assert len(records) >= 2 and all(r.exc_info is None for r in records), [r.getMessage() for r in records]
    assert records[0].getMessage().startswith("heartbeat for training t: the database is unreachable (OperationalError: ")


def test_any_other_failure_keeps_its_traceback(caplog):
    def broken() -> bool:
        raise ValueError("a bug")

    records = _beats(broken, caplog)
    assert records and records[0].exc_info is not None and records[0].getMessage() == "heartbeat for training t failed"
