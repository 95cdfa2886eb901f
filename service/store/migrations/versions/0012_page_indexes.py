"""indexes for keyset pages and label counts: images and trainings by (dataset_id, created_at, id), images by (dataset_id, label)

Revision ID: 0012_page_indexes
Revises: 0011_feature_blobs
Create Date: 2026-12-02

service.domain.paging walks images oldest first and trainings newest first by (created_at, id)
within a dataset; with these indexes each page is an index seek plus `limit` rows, whatever its
depth (issue 17: any page of 100 within 50 ms at 50,000 images). A dataset's label counts (its
detail, every training request) read (dataset_id, label) from the index alone. Downgrade drops
them; everything still works, scanning the dataset's rows each time.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0012_page_indexes"
down_revision: str | Sequence[str] | None = "0011_feature_blobs"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_images_dataset_created", "images", ["dataset_id", "created_at", "id"])
    op.create_index("ix_trainings_dataset_created", "trainings", ["dataset_id", "created_at", "id"])
    op.create_index("ix_images_dataset_label", "images", ["dataset_id", "label"])


def downgrade() -> None:
    op.drop_index("ix_images_dataset_label", table_name="images")
    op.drop_index("ix_trainings_dataset_created", table_name="trainings")
    op.drop_index("ix_images_dataset_created", table_name="images")
