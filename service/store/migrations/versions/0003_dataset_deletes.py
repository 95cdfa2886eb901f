"""deleting datasets in the background and deleting versions: datasets.deleted_at, datasets.last_version

Revision ID: 0003_dataset_deletes
Revises: 0002_training_claims
Create Date: 2026-12-01

deleted_at: a deleted dataset is marked at once and removed in the background; its name is free
for a new dataset immediately, so the unique index on name becomes a partial one over the
datasets not deleted. last_version: the highest version number ever given, so that deleting a
version never lets its number be given again; existing datasets start at their current maximum.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_dataset_deletes"
down_revision: str | Sequence[str] | None = "0002_training_claims"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_LIVE = sa.text("deleted_at IS NULL")


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("last_version", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
        batch.drop_index("ix_datasets_name")
    op.create_index("uq_datasets_live_name", "datasets", ["name"], unique=True,
                    sqlite_where=_LIVE, postgresql_where=_LIVE)
    op.execute("UPDATE datasets SET last_version = COALESCE((SELECT MAX(version) FROM model_versions "
               "WHERE model_versions.dataset_id = datasets.id), 0)")


def downgrade() -> None:
    op.drop_index("uq_datasets_live_name", "datasets")
    with op.batch_alter_table("datasets") as batch:
        batch.create_index("ix_datasets_name", ["name"], unique=True)
        batch.drop_column("deleted_at")
        batch.drop_column("last_version")
