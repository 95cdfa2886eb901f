"""Custom Vision compatibility: cv_projects, cv_tags, cv_iterations, cv_publish_aliases

Revision ID: 0010_customvision
Revises: 0009_unlabeled_images
Create Date: 2026-12-02

The Custom Vision API (service/api/customvision, issue 16) names projects, tags, iterations and
images by dashed UUIDs and free-text names; these tables map them onto felis's datasets, labels,
trainings and model versions (service.domain.customvision owns them). A publish name is an alias
of one version of a dataset, which /v1 predict accepts as ?alias=. All start empty; a dataset's
removal removes its rows (ON DELETE CASCADE). Downgrade: the tables go; the datasets, images,
trainings and versions they named stay, reachable through /v1.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_customvision"
down_revision: str | Sequence[str] | None = "0009_unlabeled_images"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "cv_projects",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("description", sa.String(length=1024), nullable=False),
        sa.Column("domain_id", sa.String(length=36), nullable=False),
        sa.Column("classification_type", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_modified", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("dataset_id"),
    )
    op.create_table(
        "cv_tags",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("project_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=False),
        sa.Column("description", sa.String(length=1024), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["project_id"], ["cv_projects.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("project_id", "label", name="uq_cv_tag_label"),
        sa.UniqueConstraint("project_id", "name", name="uq_cv_tag_name"),
    )
    op.create_index("ix_cv_tags_project_id", "cv_tags", ["project_id"])
    op.create_table(
        "cv_iterations",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("project_id", sa.String(length=36), nullable=False),
        sa.Column("training_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_modified", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["project_id"], ["cv_projects.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("training_id"),
    )
    op.create_index("ix_cv_iterations_project_id", "cv_iterations", ["project_id"])
    op.create_table(
        "cv_publish_aliases",
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("iteration_id", sa.String(length=36), nullable=False),
        sa.Column("prediction_id", sa.String(length=1024), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["iteration_id"], ["cv_iterations.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("dataset_id", "name"),
        sa.UniqueConstraint("iteration_id"),
    )


def downgrade() -> None:
    op.drop_table("cv_publish_aliases")
    op.drop_index("ix_cv_iterations_project_id", "cv_iterations")
    op.drop_table("cv_iterations")
    op.drop_index("ix_cv_tags_project_id", "cv_tags")
    op.drop_table("cv_tags")
    op.drop_table("cv_projects")
