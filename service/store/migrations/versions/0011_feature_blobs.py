"""cached features move out of the metadata store into compact blobs: drop image_features

Revision ID: 0011_feature_blobs
Revises: 0010_customvision
Create Date: 2026-12-02

Issue 17. The frozen-backbone features cached per (extractor, image sha256) were a row each in
image_features (float32: 10 KB a row for the default extractor, about 24 KB an image in the
SQLite file at 20,000 images). They are now blobs in the blob store (service.store.features,
float16, ``features/<extractor>/ab/<sha256>.f16``). The rows are not copied: the table is
dropped with them, and each image's features are computed again, once, by the next training
that uses it (as for a new image; a linear training of 20,000 photos takes its feature time
again), then cached as blobs. Downgrade: an empty image_features table (the code before this
fills it again as it trains); the feature blobs stay until the collection removes those no image
uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_feature_blobs"
down_revision: str | Sequence[str] | None = "0010_customvision"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_table("image_features")


def downgrade() -> None:
    op.create_table(
        "image_features",
        sa.Column("extractor", sa.String(length=128), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("extractor", "sha256"),
    )
