"""scopes users can reason about, and keys limited to datasets: api_keys.limited, api_key_datasets

Revision ID: 0005_key_scopes
Revises: 0004_staged_uploads
Create Date: 2026-12-08

The scopes become predict ⊂ read ⊂ write ⊂ admin: predict no longer reads images, downloads,
evaluations or trainings (read does). Keys made before keep what they could do: a stored key
that granted predict and nothing above it gets read too (keys with write or admin already have
it). limited: the key sees only the datasets listed for it in api_key_datasets (by id, so a
dataset made again under a deleted one's name is not included); existing keys see every dataset.
Downgrade: read becomes predict again (which then reads everything); limited keys are revoked,
as the older schema cannot limit them.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_key_scopes"
down_revision: str | Sequence[str] | None = "0004_staged_uploads"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_keys = sa.table("api_keys", sa.column("id", sa.String), sa.column("scopes", sa.JSON),
                 sa.column("revoked", sa.Boolean), sa.column("limited", sa.Boolean))


def _rewrite_scopes(change) -> None:
    conn = op.get_bind()
    for key_id, scopes in conn.execute(sa.select(_keys.c.id, _keys.c.scopes)).all():
        new = change(list(scopes or []))
        if new != scopes:
            conn.execute(_keys.update().where(_keys.c.id == key_id).values(scopes=new))


def _add_read(scopes: list[str]) -> list[str]:
    if "predict" in scopes and not {"read", "write", "admin"} & set(scopes):
        return sorted({*scopes, "read"})
    return scopes


def _drop_read(scopes: list[str]) -> list[str]:
    if "read" not in scopes:
        return scopes
    return sorted({s for s in scopes if s != "read"} | {"predict"})


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("limited", sa.Boolean(), server_default="0", nullable=False))
    op.create_table(
        "api_key_datasets",
        sa.Column("key_id", sa.String(length=16), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("key_id", "dataset_id"),
    )
    op.create_index("ix_api_key_datasets_dataset_id", "api_key_datasets", ["dataset_id"])
    _rewrite_scopes(_add_read)


def downgrade() -> None:
    _rewrite_scopes(_drop_read)
    op.execute(_keys.update().where(_keys.c.limited == sa.true()).values(revoked=True))
    op.drop_index("ix_api_key_datasets_dataset_id", "api_key_datasets")
    op.drop_table("api_key_datasets")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("limited")
