"""training_shards: a training's feature extraction fanned out over the worker pool

Revision ID: 0013_training_shards
Revises: 0012_page_indexes
Create Date: 2026-12-02

A linear training with many images whose features are not cached yet hands their extraction to
shards (service.domain.trainings: one row per range of sha256s, claimed, heartbeated and
finished like a training) and waits in the new `extracting` status without holding a worker;
the last shard to finish queues the training again for its head fit. Downgrade drops the
table: run it only with no training extracting (such a training would wait for shards that no
longer exist until the sweep's redelivery; cancel it first).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013_training_shards"
down_revision: str | Sequence[str] | None = "0012_page_indexes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "training_shards",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("training_id", sa.String(32), sa.ForeignKey("trainings.id", ondelete="CASCADE"), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("lo", sa.String(64), nullable=False),
        sa.Column("hi", sa.String(64), nullable=True),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("done", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(255), nullable=True),
        sa.Column("claim_token", sa.String(32), nullable=True),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.UniqueConstraint("training_id", "index", name="uq_shard_training_index"),
    )
    op.create_index("ix_training_shards_training_id", "training_shards", ["training_id"])
    op.create_index("ix_training_shards_status", "training_shards", ["status"])


def downgrade() -> None:
    op.drop_index("ix_training_shards_status", table_name="training_shards")
    op.drop_index("ix_training_shards_training_id", table_name="training_shards")
    op.drop_table("training_shards")
