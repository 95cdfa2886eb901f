"""unlabeled images and suggested labels: images.label nullable, the reserved label `unlabeled`, suggestions

Revision ID: 0009_unlabeled_images
Revises: 0008_version_heldout
Create Date: 2026-12-02

Issue 15, part 3. An image without a label (an upload without `label`, a zip's top-level images
or its `unlabeled/` folder) is stored with label NULL; trainings ignore it. `unlabeled` becomes a
reserved label name: a dataset that has images labelled exactly `unlabeled` gets them renamed to
the first free one of `unlabeled_1`, `unlabeled_2`, ... (each rename is logged as a warning, and
versions trained before keep the old name in their labels). suggestions: one row per (image,
version): the label that version suggests for an unlabeled image, its probability and open-set
score (flagged against the version's threshold as it is when read; service.domain.suggestions owns them). Downgrade: the suggestions go; unlabeled images get
the label `unlabeled` back (so that the column can be NOT NULL again); the renames stay.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_unlabeled_images"
down_revision: str | Sequence[str] | None = "0008_version_heldout"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("alembic.runtime.migration")
RESERVED = "unlabeled"


def upgrade() -> None:
    conn = op.get_bind()
    images = sa.table("images", sa.column("dataset_id", sa.Integer), sa.column("label", sa.String))
    stages = sa.table("image_stage", sa.column("dataset_id", sa.Integer), sa.column("label", sa.String))
    for (dataset_id,) in conn.execute(sa.select(images.c.dataset_id).where(images.c.label == RESERVED).distinct()).all():
        taken = {r[0] for r in conn.execute(sa.select(images.c.label).where(images.c.dataset_id == dataset_id).distinct())}
        n = 1
        while f"{RESERVED}_{n}" in taken:
            n += 1
        new = f"{RESERVED}_{n}"
        count = conn.execute(images.update().where(images.c.dataset_id == dataset_id, images.c.label == RESERVED)
                             .values(label=new)).rowcount
        log.warning("dataset %s: %s images labelled %r are now labelled %r ('%s' now means no label)",
                    dataset_id, count, RESERVED, new, RESERVED)
    conn.execute(stages.update().where(stages.c.label == RESERVED).values(label=f"{RESERVED}_1"))  # unfinished uploads
    with op.batch_alter_table("images") as batch:
        batch.alter_column("label", existing_type=sa.String(64), nullable=True)
    with op.batch_alter_table("image_stage") as batch:
        batch.alter_column("label", existing_type=sa.String(64), nullable=True)
    op.create_table(
        "suggestions",
        sa.Column("image_id", sa.String(32), sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("version", sa.Integer(), primary_key=True),
        sa.Column("dataset_id", sa.Integer(), sa.ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False),
        sa.Column("label", sa.String(64), nullable=False),
        sa.Column("probability", sa.Float(), nullable=False),
        sa.Column("ood_score", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_suggestions_dataset_version_probability", "suggestions", ["dataset_id", "version", "probability"])


def downgrade() -> None:
    op.drop_index("ix_suggestions_dataset_version_probability", table_name="suggestions")
    op.drop_table("suggestions")
    conn = op.get_bind()
    for name in ("images", "image_stage"):
        t = sa.table(name, sa.column("label", sa.String))
        conn.execute(t.update().where(t.c.label.is_(None)).values(label=RESERVED))
        with op.batch_alter_table(name) as batch:
            batch.alter_column("label", existing_type=sa.String(64), nullable=False)
