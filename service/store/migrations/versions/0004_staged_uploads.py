"""uploads all or nothing and blob collection: image_stage, blob_orphans

Revision ID: 0004_staged_uploads
Revises: 0003_dataset_deletes
Create Date: 2026-12-08

image_stage: the accepted files of an upload in progress, written chunk by chunk under the
upload's id and published into images in one short transaction at the end (or dropped: the
request failed, or the workers' sweep found its process dead). blob_orphans: blobs that may have
lost their last reference, and since when; the sweep deletes those still unreferenced after a
grace period (deletes no longer remove blobs inline). Both start empty; blobs left unreferenced
by earlier releases are not listed (nothing recorded them).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_staged_uploads"
down_revision: str | Sequence[str] | None = "0003_dataset_deletes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "image_stage",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("upload_id", sa.String(length=32), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=False),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("phash", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_image_stage_upload_id", "image_stage", ["upload_id"])
    op.create_index("ix_image_stage_sha256", "image_stage", ["sha256"])
    op.create_table(
        "blob_orphans",
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_index("ix_blob_orphans_since", "blob_orphans", ["since"])


def downgrade() -> None:
    op.drop_index("ix_blob_orphans_since", "blob_orphans")
    op.drop_table("blob_orphans")
    op.drop_index("ix_image_stage_sha256", "image_stage")
    op.drop_index("ix_image_stage_upload_id", "image_stage")
    op.drop_table("image_stage")
