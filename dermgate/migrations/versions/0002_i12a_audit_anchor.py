"""Audit anchor: the audit trail's newest record, kept in the database as well as in the trail.

Revision ID: 0002_i12a
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_i12a"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_anchor",
        sa.Column("log_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("checkpoint_seq", sa.BigInteger(), nullable=True),
        sa.Column("checkpoint_hash", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("log_id", name="pk_audit_anchor"),
    )


def downgrade() -> None:
    op.drop_table("audit_anchor")
