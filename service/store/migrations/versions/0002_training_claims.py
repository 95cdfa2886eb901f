"""training claims and the outbox: trainings.claim_token and trainings.enqueued_at

Revision ID: 0002_training_claims
Revises: 0001_baseline
Create Date: 2026-12-01

claim_token: the token of the run that owns a running training; every write of that run
checks it, so a worker that lost its claim writes nothing more (service.domain.trainings).
enqueued_at: when the training's message was confirmed sent to the broker; queued trainings
without it are sent by the workers' sweep. Existing rows: finished ones need neither; queued
ones are left NULL and so are sent (again) by the sweep, which the claim makes harmless.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_training_claims"
down_revision: str | Sequence[str] | None = "0001_baseline"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("trainings") as batch:
        batch.add_column(sa.Column("claim_token", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("trainings") as batch:
        batch.drop_column("enqueued_at")
        batch.drop_column("claim_token")
