"""the API key that requested a training: trainings.key_id

Revision ID: 0006_training_key
Revises: 0005_key_scopes
Create Date: 2026-12-02

key_id: the id of the API key (api_keys.id) a training was requested with, so that unfinished
(queued or running) trainings can be capped per key as well as per dataset
(service.domain.trainings.request). No foreign key: keys are only revoked today, but a
training's row should not stop a key's from being removed. Existing rows get NULL (no key),
which no per-key cap counts; only the per-dataset cap applies to them.
Downgrade: the column goes, and with it the per-key accounting.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_training_key"
down_revision: str | Sequence[str] | None = "0005_key_scopes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("trainings") as batch:
        batch.add_column(sa.Column("key_id", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("trainings") as batch:
        batch.drop_column("key_id")
