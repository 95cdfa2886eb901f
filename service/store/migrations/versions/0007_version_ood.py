"""the open-set calibration of a model version: model_versions.ood

Revision ID: 0007_version_ood
Revises: 0006_training_key
Create Date: 2026-12-02

ood: JSON {method, threshold, flagged_fraction, quantiles, index_vectors, n_train} of the
version's open-set index (models/ood.py, issue 15): predict flags an image whose ood_score passes
`threshold`, and PUT .../ood-threshold moves it (from `quantiles` for a flagged_fraction).
Existing rows get NULL: versions made before it have no index, and answer ood_score null,
ood false. Downgrade: the column goes; the graphs keep their ood_score output, which is ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_version_ood"
down_revision: str | Sequence[str] | None = "0006_training_key"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("ood", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("ood")
