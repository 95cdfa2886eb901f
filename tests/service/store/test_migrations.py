"""Schema migrations (service.store.migrate, service/store/migrations): the head revision is the
schema tables.py describes, a database of felis 0.1.0 (create_all, no version) keeps its rows
through the upgrade, production never migrates implicitly, concurrent starts migrate once, and
`felis migrate` works from the command line. On SQLite, and on the local PostgreSQL
(`production` mark): a database of its own per case, dropped afterwards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    inspect,
    select,
    text,
)

from service.errors import SchemaOutdated
from service.store import migrate
from service.store.db import make_engine
from service.store.tables import Base
from tests.utils.processes import ROOT, create_postgres_database, felis_env

MIGRATIONS = Path(migrate.__file__).with_name("migrations")

# --- the schema of felis 0.1.0, frozen ---------------------------------------------------------
# What 0.1.0's init_db made (Base.metadata.create_all of its tables.py), copied here because
# tables.py moves on: a database of the release is built from this, never from today's models.
# test_the_baseline_revision_is_release_0_1_0 keeps it honest.

RELEASE_0_1_0 = MetaData()
TZ = DateTime(timezone=True)  # tables.UTCDateTime's column type
Table("datasets", RELEASE_0_1_0,
      Column("id", Integer, primary_key=True, autoincrement=True),
      Column("name", String(64), nullable=False),
      Column("created_at", TZ, nullable=False),
      Column("default_version", Integer, nullable=True),
      Index("ix_datasets_name", "name", unique=True))
Table("images", RELEASE_0_1_0,
      Column("id", String(32), primary_key=True),
      Column("dataset_id", Integer, ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False, index=True),
      Column("sha256", String(64), nullable=False, index=True),
      Column("label", String(64), nullable=False, index=True),
      Column("filename", String(255), nullable=False),
      Column("format", String(16), nullable=False),
      Column("width", Integer, nullable=False),
      Column("height", Integer, nullable=False),
      Column("size_bytes", Integer, nullable=False),
      Column("phash", String(16), nullable=False),
      Column("created_at", TZ, nullable=False),
      UniqueConstraint("dataset_id", "sha256", name="uq_image_dataset_sha"))
Table("trainings", RELEASE_0_1_0,
      Column("id", String(32), primary_key=True),
      Column("dataset_id", Integer, ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False, index=True),
      Column("status", String(16), nullable=False, index=True),
      Column("options", JSON, nullable=False),
      Column("progress", JSON, nullable=False),
      Column("error", JSON, nullable=True),
      Column("model_version", Integer, nullable=True),
      Column("cancel_requested", Boolean, nullable=False),
      Column("attempts", Integer, nullable=False),
      Column("worker", String(255), nullable=True),
      Column("request_id", String(64), nullable=True),
      Column("created_at", TZ, nullable=False),
      Column("started_at", TZ, nullable=True),
      Column("heartbeat_at", TZ, nullable=True),
      Column("finished_at", TZ, nullable=True))
Table("model_versions", RELEASE_0_1_0,
      Column("id", Integer, primary_key=True, autoincrement=True),
      Column("dataset_id", Integer, ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False, index=True),
      Column("version", Integer, nullable=False),
      Column("training_id", String(32), nullable=False, unique=True),
      Column("architecture", String(64), nullable=False),
      Column("labels", JSON, nullable=False),
      Column("metrics", JSON, nullable=False),
      Column("evaluation", JSON, nullable=False),
      Column("config", JSON, nullable=False),
      Column("snapshot", JSON, nullable=False),
      Column("thresholds", JSON, nullable=False),
      Column("checkpoint_key", String(255), nullable=False),
      Column("onnx_key", String(255), nullable=True),
      Column("created_at", TZ, nullable=False),
      UniqueConstraint("dataset_id", "version", name="uq_version_dataset_number"))
Table("image_features", RELEASE_0_1_0,
      Column("extractor", String(128), primary_key=True),
      Column("sha256", String(64), primary_key=True),
      Column("vector", LargeBinary, nullable=False))
Table("api_keys", RELEASE_0_1_0,
      Column("id", String(16), primary_key=True),
      Column("name", String(128), nullable=False),
      Column("scopes", JSON, nullable=False),
      Column("key_hash", String(64), nullable=False),
      Column("created_at", TZ, nullable=False),
      Column("revoked", Boolean, nullable=False))


# --- helpers ---------------------------------------------------------------------------------------


def schema(engine: Engine) -> dict:
    """Everything the inspector sees of the felis tables, in a comparable form (column order aside:
    an added column comes last after ALTER, where tables.py has it is create_all's order)."""
    insp = inspect(engine)
    out: dict = {}
    for table in sorted(set(insp.get_table_names()) - {migrate.VERSION_TABLE}):
        out[table] = {
            "columns": {c["name"]: (c["type"].compile(engine.dialect), c["nullable"], c.get("default"),
                                    c.get("autoincrement"))
                        for c in insp.get_columns(table)},
            "primary key": (insp.get_pk_constraint(table)["name"], insp.get_pk_constraint(table)["constrained_columns"]),
            "foreign keys": sorted((fk["name"] or "", tuple(fk["constrained_columns"]), fk["referred_table"],
                                    tuple(fk["referred_columns"]), fk["options"].get("ondelete") or "")
                                   for fk in insp.get_foreign_keys(table)),
            "indexes": sorted((ix["name"], tuple(ix["column_names"]), bool(ix["unique"]),
                               sorted((k, str(v)) for k, v in ix.get("dialect_options", {}).items()))  # partial: WHERE
                              for ix in insp.get_indexes(table)),
            "unique constraints": sorted((uc["name"] or "", tuple(uc["column_names"]))
                                         for uc in insp.get_unique_constraints(table)),
            "check constraints": sorted((ck["name"] or "", ck["sqltext"]) for ck in insp.get_check_constraints(table)),
        }
    if engine.dialect.name == "postgresql":
        out["<sequences>"] = sorted(insp.get_sequence_names())
    return out


def model_diff(engine: Engine) -> list:
    """What autogenerate would put in a new revision: the models (tables.py) against the database."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "target_metadata": Base.metadata})
        return compare_metadata(context, Base.metadata)


def upgrade_to(engine: Engine, revision: str) -> None:
    """The schema at an older revision, as a database last migrated by that release has it."""
    with migrate.migration_connection(engine) as conn:
        command.upgrade(migrate.alembic_config(conn), revision)


def version_rows(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(text(f"SELECT version_num FROM {migrate.VERSION_TABLE}")).scalars())


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.production)])
def new_db(request, tmp_path) -> Iterator[Callable[[], Engine]]:
    """new_db() -> the engine (service.store.db.make_engine) of a fresh, empty database."""
    engines: list[Engine] = []
    drops: list[Callable[[], None]] = []

    def new() -> Engine:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path / f'felis-{len(engines)}.db'}"
        else:
            url, drop = create_postgres_database()
            drops.append(drop)
        engines.append(make_engine(url))
        return engines[-1]

    yield new
    for engine in engines:
        engine.dispose()
    for drop in drops:
        drop()


@pytest.fixture
def sqlite_db(tmp_path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'felis.db'}")
    yield engine
    engine.dispose()


@pytest.fixture
def extra_revision(tmp_path, monkeypatch) -> Callable[[str, str], str]:
    """extra_revision(name, upgrade body) -> its id: the code's revisions plus one more on top, as
    the next release will have them (a copy of the migrations folder, used for this test only)."""
    folder = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, folder, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(migrate, "MIGRATIONS", folder)
    migrate._script.cache_clear()
    head = [migrate.head_revision()]

    def add(name: str, body: str) -> str:
        (folder / "versions" / f"{name}.py").write_text(
            "import sqlalchemy as sa\nfrom alembic import op\n\n"
            f"revision = {name!r}\ndown_revision = {head[0]!r}\n\n\n"
            "def upgrade():\n" + textwrap.indent(textwrap.dedent(body).strip(), "    ") + "\n")
        migrate._script.cache_clear()
        head[0] = name
        assert migrate.head_revision() == name
        return name

    yield add
    monkeypatch.undo()
    migrate._script.cache_clear()


# --- the head is the models' schema ------------------------------------------------------------


def test_upgrade_on_an_empty_database_gives_the_create_all_schema(new_db):
    migrated, created = new_db(), new_db()
    assert migrate.upgrade(migrated) == (None, migrate.head_revision())
    Base.metadata.create_all(created)
    assert schema(migrated) == schema(created)
    assert set(schema(migrated)) >= migrate.BASELINE_TABLES - DROPPED_AT_HEAD
    assert version_rows(migrated) == [migrate.head_revision()]


def test_the_models_and_the_migrations_agree(new_db):
    """A column added to tables.py without a revision fails here. Write the revision with
    `python -m service.store.migrate revision --autogenerate --rev-id 000N_<what> -m "<what>"`
    (FELIS_DATABASE_URL: a database at the current head)."""
    engine = new_db()
    migrate.upgrade(engine)
    assert model_diff(engine) == []


def test_the_baseline_revision_is_release_0_1_0(new_db):
    """0001_baseline builds what 0.1.0's create_all built: the frozen copy above is that schema."""
    baseline, release = new_db(), new_db()
    upgrade_to(baseline, migrate.BASELINE)
    RELEASE_0_1_0.create_all(release)
    assert schema(baseline) == schema(release)
    assert set(RELEASE_0_1_0.tables) == migrate.BASELINE_TABLES


def test_there_is_one_line_of_revisions_from_the_baseline():
    script = migrate._script()
    assert script.get_heads() == [migrate.head_revision()]
    assert script.get_bases() == [migrate.BASELINE]
    for rev in script.walk_revisions():
        assert len(rev.revision) <= 32, f"{rev.revision}: alembic_version.version_num is VARCHAR(32)"
        assert Path(rev.path).name == f"{rev.revision}.py", "file names are the revision ids"


# --- the release test: a 0.1.0 database with data in it -------------------------------------------

T0 = datetime(2025, 6, 1, 12, 30, 15, 123456, tzinfo=timezone.utc)


def fill_release_database(engine: Engine) -> dict[str, object]:
    """A dataset with images, a finished and a queued training, a model version, cached
    features and an API key, written as 0.1.0 wrote them. Returns the generated ids."""
    t = RELEASE_0_1_0.tables
    with engine.begin() as conn:
        dataset_id = conn.execute(t["datasets"].insert().values(name="cats-vs-dogs", created_at=T0,
                                                                default_version=None)).inserted_primary_key[0]
        conn.execute(t["images"].insert(), [
            {"id": f"{i:032x}", "dataset_id": dataset_id, "sha256": f"{i:064x}", "label": "cat" if i % 2 else "dog",
             "filename": f"IMG_{i:04d}.jpg", "format": "JPEG", "width": 640 + i, "height": 480, "size_bytes": 91_000 + i,
             "phash": f"{i:016x}", "created_at": T0 + timedelta(seconds=i)}
            for i in range(1, 7)])
        done, queued = "a" * 32, "b" * 32
        conn.execute(t["trainings"].insert(), [
            {"id": done, "dataset_id": dataset_id, "status": "succeeded", "options": {"epochs": 3, "precision": "int8"},
             "progress": {"epoch": 3, "loss": 0.125, "phase": "done"}, "error": None, "model_version": 1,
             "cancel_requested": False, "attempts": 1, "worker": "celery@gpu-1", "request_id": "req-1",
             "created_at": T0, "started_at": T0 + timedelta(seconds=1), "heartbeat_at": T0 + timedelta(seconds=50),
             "finished_at": T0 + timedelta(seconds=60)},
            {"id": queued, "dataset_id": dataset_id, "status": "queued", "options": {}, "progress": {},
             "error": {"code": "worker_lost", "message": "retrying"}, "model_version": None,
             "cancel_requested": True, "attempts": 2, "worker": None, "request_id": None, "created_at": T0,
             "started_at": None, "heartbeat_at": None, "finished_at": None},
        ])
        version_id = conn.execute(t["model_versions"].insert().values(
            dataset_id=dataset_id, version=1, training_id=done, architecture="efficientnet_lite0",
            labels=["cat", "dog"], metrics={"accuracy": 0.9375, "per_label": {"cat": {"f1": 0.94}}},
            evaluation={"confusion": [[15, 1], [1, 15]]}, config={"image_size": 288, "mode": "linear"},
            snapshot={"images": 6, "labels": {"cat": 3, "dog": 3}, "hash": "f" * 64},
            thresholds={"cat": 0.5, "dog": 0.625}, checkpoint_key="models/1/1/model.pt",
            onnx_key="models/1/1/model.onnx", created_at=T0 + timedelta(seconds=61))).inserted_primary_key[0]
        conn.execute(t["datasets"].update().values(default_version=1))
        conn.execute(t["image_features"].insert(), [
            {"extractor": "lite0-288-int8", "sha256": f"{i:064x}", "vector": bytes(range(256)) * 10 + bytes([i])}
            for i in range(1, 7)])
        conn.execute(t["api_keys"].insert(), [
            {"id": "k" * 16, "name": "ci uploader", "scopes": ["predict", "write"], "key_hash": "e" * 64,
             "created_at": T0, "revoked": False},
            {"id": "r" * 16, "name": "", "scopes": ["admin"], "key_hash": "d" * 64, "created_at": T0, "revoked": True},
        ])
    return {"dataset": dataset_id, "version": version_id, "training": done}


# 0.1.0 tables a later revision drops on purpose, rows and all: image_features (0011_feature_blobs:
# cached features became blobs, computed again by the next training)
DROPPED_AT_HEAD = frozenset({"image_features"})


def release_rows(engine: Engine) -> dict[str, list[dict]]:
    """Every row of every 0.1.0 table the database still has, in its 0.1.0 columns."""
    with engine.connect() as conn:
        present = set(inspect(conn).get_table_names())
        return {name: [dict(r._mapping) for r in conn.execute(select(table).order_by(*table.primary_key.columns))]
                for name, table in RELEASE_0_1_0.tables.items() if name in present}


def kept_at_head(rows: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """What of a 0.1.0 database's rows a database upgraded to head still has."""
    return {name: r for name, r in rows.items() if name not in DROPPED_AT_HEAD}


def all_rows(engine: Engine) -> dict[str, list[dict]]:
    """Every row of every felis table, in all the columns the database has now."""
    tables = MetaData()
    tables.reflect(engine)
    with engine.connect() as conn:
        return {name: [dict(r._mapping) for r in conn.execute(select(table).order_by(*table.primary_key.columns))]
                for name, table in tables.tables.items() if name != migrate.VERSION_TABLE}


def filled_database_at_head(engine: Engine) -> dict[str, list[dict]]:
    """A database at head with the release's rows in it (written at the baseline, then upgraded,
    as they would have been); returns all its rows."""
    upgrade_to(engine, migrate.BASELINE)
    fill_release_database(engine)
    migrate.upgrade(engine)
    return all_rows(engine)


def test_a_release_database_keeps_every_row_through_the_upgrade(new_db):
    engine = new_db()
    RELEASE_0_1_0.create_all(engine)  # what 0.1.0 does at start: no alembic_version
    ids = fill_release_database(engine)
    before = release_rows(engine)
    assert {name: len(rows) for name, rows in before.items()} == {
        "datasets": 1, "images": 6, "trainings": 2, "model_versions": 1, "image_features": 6, "api_keys": 2}

    assert migrate.upgrade(engine) == (None, migrate.head_revision())

    assert version_rows(engine) == [migrate.head_revision()]
    assert release_rows(engine) == kept_at_head(before)
    fresh = new_db()
    Base.metadata.create_all(fresh)
    assert schema(engine) == schema(fresh), "a 0.1.0 database upgraded differs from a new one"
    assert model_diff(engine) == []

    # and today's code reads and writes it
    from sqlalchemy.orm import Session

    from service.store.tables import ApiKey, Dataset, Image, ModelVersion, Training

    with Session(engine) as s:
        dataset = s.get(Dataset, ids["dataset"])
        assert (dataset.name, dataset.default_version, dataset.created_at) == ("cats-vs-dogs", 1, T0)
        training = s.get(Training, ids["training"])
        assert (training.status, training.options, training.finished_at) == (
            "succeeded", {"epochs": 3, "precision": "int8"}, T0 + timedelta(seconds=60))
        version = s.get(ModelVersion, ids["version"])
        assert (version.labels, version.thresholds["dog"]) == (["cat", "dog"], 0.625)
        assert s.get(ApiKey, "r" * 16).revoked is True
        s.add(Dataset(name="birds"))
        s.flush()
        s.add(Image(dataset_id=s.scalars(select(Dataset.id).where(Dataset.name == "birds")).one(), sha256="0" * 64,
                    label="robin", filename="a.png", format="PNG", width=8, height=8, size_bytes=10, phash="0" * 16))
        s.commit()  # a new id from the sequence / rowid the 0.1.0 rows left
        assert s.scalar(select(Dataset.id).where(Dataset.name == "birds")) != ids["dataset"]

    assert migrate.upgrade(engine) == (migrate.head_revision(),) * 2  # and again: nothing to do


def test_a_database_some_revisions_behind_is_upgraded_with_its_rows(new_db):
    engine = new_db()
    upgrade_to(engine, migrate.BASELINE)
    if migrate.head_revision() == migrate.BASELINE:
        pytest.skip("only the baseline revision exists")
    fill_release_database(engine)
    before = release_rows(engine)
    assert migrate.upgrade(engine) == (migrate.BASELINE, migrate.head_revision())
    assert release_rows(engine) == kept_at_head(before)
    assert model_diff(engine) == []


def test_0006_adds_the_training_key_and_downgrades_without_losing_trainings(new_db):
    """trainings.key_id (the per-key cap on unfinished trainings): NULL for the rows before it;
    the downgrade drops the column and keeps every training."""
    engine = new_db()
    upgrade_to(engine, "0005_key_scopes")
    fill_release_database(engine)
    before = release_rows(engine)
    upgrade_to(engine, "0006_training_key")
    with engine.begin() as conn:
        assert conn.execute(text("SELECT count(*) FROM trainings WHERE key_id IS NULL")).scalar() == 2
        conn.execute(text("UPDATE trainings SET key_id = 'k' WHERE status = 'queued'"))
    with migrate.migration_connection(engine) as conn:
        command.downgrade(migrate.alembic_config(conn), "0005_key_scopes")
    assert "key_id" not in {c["name"] for c in inspect(engine).get_columns("trainings")}
    assert release_rows(engine) == before
    migrate.upgrade(engine)
    assert model_diff(engine) == []


def test_0007_adds_the_version_ood_and_downgrades_without_losing_versions(new_db):
    """model_versions.ood (the open-set calibration): NULL for the versions before it, which then
    answer ood_score null; the downgrade drops the column and keeps every version."""
    engine = new_db()
    upgrade_to(engine, "0006_training_key")
    fill_release_database(engine)
    before = release_rows(engine)
    upgrade_to(engine, "0007_version_ood")
    with engine.begin() as conn:
        assert conn.execute(text("SELECT count(*) FROM model_versions WHERE ood IS NULL")).scalar() == 1
        table = Table("model_versions", MetaData(), autoload_with=conn)
        conn.execute(table.update().values(ood={"threshold": 0.25, "quantiles": [0.0] * 1001}))
    from service.domain import versions

    with engine.connect() as conn:  # what predict reads: the threshold alone, out of the JSON
        assert versions.for_serving(conn, "cats-vs-dogs", 1).ood_threshold == 0.25
    with migrate.migration_connection(engine) as conn:
        command.downgrade(migrate.alembic_config(conn), "0006_training_key")
    assert "ood" not in {c["name"] for c in inspect(engine).get_columns("model_versions")}
    assert release_rows(engine) == before
    migrate.upgrade(engine)
    assert model_diff(engine) == []


def test_0009_reserves_unlabeled_and_lets_images_have_no_label(new_db, caplog):
    """images labelled exactly `unlabeled` get the first free `unlabeled_N` (logged); afterwards
    an image may have no label and a suggestion per version; the downgrade gives unlabeled images
    the label `unlabeled` back and keeps every image."""
    engine = new_db()
    upgrade_to(engine, "0008_version_heldout")
    fill_release_database(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE images SET label = 'unlabeled' WHERE label = 'dog'"))
        conn.execute(text("UPDATE images SET label = 'unlabeled_1' WHERE id = :id"), {"id": f"{1:032x}"})
    with caplog.at_level("WARNING", logger="alembic.runtime.migration"):
        upgrade_to(engine, "0009_unlabeled_images")
    assert "now labelled 'unlabeled_2'" in caplog.text
    with engine.begin() as conn:
        labels = dict(conn.execute(text("SELECT id, label FROM images")).all())
        assert sorted(labels.values()) == ["cat", "cat", "unlabeled_1", "unlabeled_2", "unlabeled_2", "unlabeled_2"]
        conn.execute(text("UPDATE images SET label = NULL WHERE label = 'unlabeled_1'"))
        conn.execute(text("INSERT INTO suggestions (image_id, version, dataset_id, label, probability, ood_score, created_at) "
                          "SELECT id, 1, dataset_id, 'cat', 0.75, 0.125, created_at FROM images WHERE label IS NULL"))
    with migrate.migration_connection(engine) as conn:
        command.downgrade(migrate.alembic_config(conn), "0008_version_heldout")
    with engine.begin() as conn:
        after = dict(conn.execute(text("SELECT id, label FROM images")).all())
    assert after == {**labels, f"{1:032x}": "unlabeled"} and "suggestions" not in inspect(engine).get_table_names()
    migrate.upgrade(engine)
    assert model_diff(engine) == []


def test_0011_drops_the_feature_rows_and_downgrades_to_an_empty_table(new_db):
    """image_features goes with its rows (features become blobs, computed again by the next
    training) and every other row stays; the downgrade makes the table again, empty."""
    engine = new_db()
    upgrade_to(engine, "0010_customvision")
    fill_release_database(engine)
    before = release_rows(engine)
    assert len(before["image_features"]) == 6
    upgrade_to(engine, "0011_feature_blobs")
    assert "image_features" not in inspect(engine).get_table_names()
    assert release_rows(engine) == kept_at_head(before)
    with migrate.migration_connection(engine) as conn:
        command.downgrade(migrate.alembic_config(conn), "0010_customvision")
    assert release_rows(engine) == {**before, "image_features": []}
    with engine.begin() as conn:  # the code before it can cache features there again
        conn.execute(RELEASE_0_1_0.tables["image_features"].insert().values(extractor="e", sha256="0" * 64, vector=b"\0" * 8))
    migrate.upgrade(engine)
    assert "image_features" not in inspect(engine).get_table_names()
    assert model_diff(engine) == []


def test_a_revision_that_rebuilds_a_parent_table_keeps_the_rows_that_reference_it(new_db, extra_revision):
    """SQLite's ALTER is a copy, drop and rename (batch mode). With foreign keys on, as felis's
    connections have them, dropping `datasets` would cascade to every image and training."""
    engine = new_db()
    before = filled_database_at_head(engine)
    rev = extra_revision("0099_rebuild_datasets", """
        sqlite = op.get_bind().dialect.name == "sqlite"  # PostgreSQL alters in place
        with op.batch_alter_table("datasets", recreate="always" if sqlite else "auto") as batch:
            batch.add_column(sa.Column("note", sa.String(32), nullable=True))
    """)
    migrate.upgrade(engine)
    assert version_rows(engine) == [rev]
    after = all_rows(engine)
    assert [{k: v for k, v in row.items() if k != "note"} for row in after.pop("datasets")] == before.pop("datasets")
    assert after == before
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:  # back on for the app once the migration is done
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_a_failing_revision_leaves_the_database_as_it_was(new_db, extra_revision):
    engine = new_db()
    before, head = filled_database_at_head(engine), migrate.head_revision()
    columns = schema(engine)
    extra_revision("0099_fails_halfway", """
        op.add_column("datasets", sa.Column("note", sa.String(32), nullable=True))
        op.execute("UPDATE datasets SET name = 'changed'")
        raise RuntimeError("the revision fails halfway")
    """)
    with pytest.raises(RuntimeError, match="fails halfway"):
        migrate.upgrade(engine)
    assert version_rows(engine) == [head]
    assert all_rows(engine) == before
    assert schema(engine) == columns


# --- production never migrates implicitly -------------------------------------------------------


@pytest.fixture
def production(tmp_path, monkeypatch) -> Iterator[Engine]:
    """FELIS_MODE=production with SQLite under tmp_path; yields the process's engine."""
    from service.config import get_settings
    from service.store import db

    for key in list(os.environ):
        if key.startswith("FELIS_") and key != "FELIS_DATASETS":
            monkeypatch.delenv(key)
    monkeypatch.setenv("FELIS_MODE", "production")
    monkeypatch.setenv("FELIS_DATA_DIR", str(tmp_path / "var"))
    get_settings.cache_clear()
    db.reset_caches()
    yield db.get_engine()
    get_settings.cache_clear()
    db.reset_caches()


def refused() -> SchemaOutdated:
    from service.store.db import init_db

    with pytest.raises(SchemaOutdated) as info:
        init_db()
    err = info.value
    assert err.code == "schema_outdated"
    assert err.details["head"] == migrate.head_revision()
    return err


def test_production_refuses_an_empty_database_and_creates_nothing(production):
    err = refused()
    assert "`felis migrate`" in err.message and err.details["state"] == "empty"
    assert inspect(production).get_table_names() == []


def test_production_refuses_a_release_database_and_leaves_it_alone(production):
    RELEASE_0_1_0.create_all(production)
    fill_release_database(production)
    before = release_rows(production)
    err = refused()
    assert "`felis migrate`" in err.message and "0.1.0" in err.message and err.details["state"] == "baseline"
    assert migrate.VERSION_TABLE not in inspect(production).get_table_names()
    assert release_rows(production) == before


def test_production_refuses_an_older_schema(production, extra_revision):
    from service.store.db import init_db

    init_db_head = migrate.head_revision()
    migrate.upgrade(production)
    init_db()  # at head: starts
    extra_revision("0099_next_release", 'op.add_column("datasets", sa.Column("note", sa.String(32)))')
    err = refused()
    assert err.details == {**err.details, "state": "older", "current": init_db_head, "head": "0099_next_release"}
    assert "`felis migrate`" in err.message and init_db_head in err.message and "0099_next_release" in err.message
    assert version_rows(production) == [init_db_head]
    migrate.upgrade(production)  # what `felis migrate` does
    init_db()


def test_a_schema_newer_than_the_code_is_refused_in_both_modes(production, monkeypatch):
    from service.config import get_settings
    from service.store.db import init_db

    migrate.upgrade(production)
    with production.begin() as conn:
        conn.execute(text(f"UPDATE {migrate.VERSION_TABLE} SET version_num = '0999_from_the_future'"))
    err = refused()
    assert err.details["state"] == "unknown" and "newer felis" in err.message and "0999_from_the_future" in err.message
    monkeypatch.setenv("FELIS_MODE", "embedded")
    get_settings.cache_clear()
    with pytest.raises(SchemaOutdated, match="newer felis"):
        init_db()  # embedded migrates, but never downgrades
    assert version_rows(production) == ["0999_from_the_future"]


def test_embedded_init_db_upgrades_and_then_costs_one_query(felis_env):
    from service.store.db import get_engine, init_db

    assert migrate.current_revision(get_engine()) == migrate.head_revision()  # the fixture's init_db
    start = time.perf_counter()
    for _ in range(20):
        init_db()
    assert (time.perf_counter() - start) / 20 < 0.05


# --- concurrent starts: one migrates, the others wait and find it done ------------------------------

CHILD = r"""
import json, sys, time
from pathlib import Path
from service.store import migrate
from service.store.db import make_engine

url, go = sys.argv[1], Path(sys.argv[2])
engine = make_engine(url)
migrate.head_revision()
real = migrate.command.upgrade
def slow(*args, **kwargs):  # hold the lock long enough that the other process must wait for it
    time.sleep(0.5)
    return real(*args, **kwargs)
migrate.command.upgrade = slow
print("ready", flush=True)
while not go.exists():
    time.sleep(0.002)
before, after = migrate.upgrade(engine)
print(json.dumps({"before": before, "after": after}), flush=True)
"""


def test_concurrent_upgrades_migrate_once(new_db, tmp_path):
    engine = new_db()
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, engine.url.render_as_string(hide_password=False), str(go)],
                              cwd=ROOT, env=felis_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.communicate(timeout=30)[1]
        go.touch()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    head = migrate.head_revision()
    assert all(r["after"] == head for r in results)
    assert sorted(results, key=lambda r: r["before"] or "") == [{"before": None, "after": head},
                                                                 {"before": head, "after": head}], results
    fresh = new_db()
    Base.metadata.create_all(fresh)
    assert schema(engine) == schema(fresh)
    assert version_rows(engine) == [head]


# --- the command line -------------------------------------------------------------------------------


def felis(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_felis_migrate_and_check(tmp_path):
    head = migrate.head_revision()
    env = felis_env(FELIS_MODE="production", FELIS_DATA_DIR=str(tmp_path / "var"))
    engine = make_engine(f"sqlite:///{tmp_path / 'var' / 'felis.db'}")
    try:
        RELEASE_0_1_0.create_all(engine)
        fill_release_database(engine)
        before = release_rows(engine)

        check = felis("migrate", "--check", env=env)
        assert check.returncode == 1, check
        assert "`felis migrate`" in check.stderr

        run = felis("migrate", env=env)
        assert run.returncode == 0, run.stderr
        assert "before: none (the tables of felis 0.1.0" in run.stdout
        assert f"after: {head} (head)" in run.stdout
        assert release_rows(engine) == kept_at_head(before)

        check = felis("migrate", "--check", env=env)
        assert check.returncode == 0, check.stderr
        assert f"revision: {head} (head)" in check.stdout

        again = felis("migrate", env=env)
        assert again.returncode == 0, again.stderr
        assert f"before: {head}" in again.stdout and f"after: {head} (head)" in again.stdout
    finally:
        engine.dispose()


def test_the_api_refuses_to_start_on_an_unmigrated_database(tmp_path):
    env = felis_env(FELIS_MODE="production", FELIS_DATA_DIR=str(tmp_path / "var"), FELIS_PORT="0")
    api = felis("api", "--port", "0", env=env)
    assert api.returncode != 0
    assert "`felis migrate`" in api.stdout + api.stderr


@pytest.mark.production
def test_postgresql_connections_have_bounded_waits():
    """A statement stuck behind a lock fails in DB_STATEMENT_TIMEOUT_MS instead of hanging a request
    or a heartbeat; the migration's connection lifts the limit and gives it back to the pool."""
    from sqlalchemy import text

    from service.store import db, migrate
    from tests.utils.processes import create_postgres_database

    url, drop = create_postgres_database()
    try:
        engine = db.make_engine(url)
        with engine.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar() == f"{db.DB_STATEMENT_TIMEOUT_MS // 1000}s"
        migrate.upgrade(engine)
        with engine.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar() == f"{db.DB_STATEMENT_TIMEOUT_MS // 1000}s"
        engine.dispose()
    finally:
        drop()
