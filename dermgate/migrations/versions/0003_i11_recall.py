"""Model recalls: the recall record and the recalled results.

Revision ID: 0003_i11_recall
Revises: 0002_i11_outcomes
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_i11_recall"
down_revision: str | Sequence[str] | None = "0002_i11_outcomes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "model_recalls",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("fhir_action", sa.String(length=32), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("n_results", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_model_recalls"),
    )
    op.create_index("ix_model_recalls_model_version", "model_recalls", ["model_version"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("recall_id", sa.Integer(), nullable=True))
        batch.create_foreign_key("fk_jobs_recall_id_model_recalls", "model_recalls", ["recall_id"], ["id"])
        batch.create_index("ix_jobs_recall_id", ["recall_id"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_recall_id")
        batch.drop_constraint("fk_jobs_recall_id_model_recalls", type_="foreignkey")
        batch.drop_column("recall_id")
    op.drop_table("model_recalls")
