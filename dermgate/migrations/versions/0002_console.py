"""Web console: local accounts, server-side sessions, the reviewer's Practitioner reference, and
the result's risk and low-confidence flag and the newest review's time copied into ``jobs`` for
the worklist (filled here from the stored results and reviews).

Revision ID: 0002
Revises: 0003_i11_recall
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0003_i11_recall"   # re-chained after outcomes and recalls
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("reviews") as batch:
        batch.add_column(sa.Column("reviewer_reference", sa.String(length=128), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("risk", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("low_confidence", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE jobs SET reviewed_at = (SELECT max(r.created_at) FROM reviews r WHERE r.job_id = jobs.id)")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("UPDATE jobs SET risk = result::json ->> 'risk', "
                   "low_confidence = (result::json ->> 'low_confidence')::boolean WHERE result IS NOT NULL")
    else:
        op.execute("UPDATE jobs SET risk = json_extract(result, '$.risk'), "
                   "low_confidence = json_extract(result, '$.low_confidence') WHERE result IS NOT NULL")

    op.create_table(
        "accounts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(length=128), nullable=False),
        sa.Column("display_name", sa.String(length=255), nullable=True),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=False),
        sa.Column("totp_secret", sa.String(length=255), nullable=True),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("failed_logins", sa.Integer(), nullable=False),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("practitioner_reference", sa.String(length=128), nullable=True),
        sa.Column("password_changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_login_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_accounts"),
        sa.UniqueConstraint("username", name="uq_accounts_username"),
    )

    op.create_table(
        "console_sessions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("username", sa.String(length=128), nullable=False),
        sa.Column("display_name", sa.String(length=255), nullable=True),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("auth_method", sa.String(length=16), nullable=False),
        sa.Column("practitioner_reference", sa.String(length=128), nullable=True),
        sa.Column("csrf_token", sa.String(length=64), nullable=False),
        sa.Column("data", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("end_reason", sa.String(length=16), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_console_sessions"),
        sa.UniqueConstraint("token_hash", name="uq_console_sessions_token_hash"),
    )


def downgrade() -> None:
    op.drop_table("console_sessions")
    op.drop_table("accounts")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("reviewed_at")
        batch.drop_column("low_confidence")
        batch.drop_column("risk")
    with op.batch_alter_table("reviews") as batch:
        batch.drop_column("reviewer_reference")
