"""a model version's held-out predictions and its label-error count: model_versions.heldout_key, .label_issue_count

Revision ID: 0008_version_heldout
Revises: 0007_version_ood
Create Date: 2026-12-02

heldout_key: the blob (service.store.blobs.heldout_key, beside the checkpoint) holding, for every
image the version's training saw, its held-out probabilities (float16), the label it had then, and
the images the label-error rule flagged (models/label_issues.py, issue 15): one blob per version,
not a row per image. label_issue_count: how many it flagged. Both NULL for versions made before
this, for fine-tuned versions (no held-out predictions for their training split) and imports:
GET .../label-issues answers 409 label_issues_unavailable for them. Downgrade: the columns go;
the blobs stay until the version is deleted (cleanup lists every key a version names).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_version_heldout"
down_revision: str | Sequence[str] | None = "0007_version_ood"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("heldout_key", sa.String(255), nullable=True))
        batch.add_column(sa.Column("label_issue_count", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("label_issue_count")
        batch.drop_column("heldout_key")
