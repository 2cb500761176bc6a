"""Initial schema: instances, jobs, outbox, reviews.

Revision ID: 0001
Revises:
Create Date: 2026-11-26

Constraint names follow the convention pk_<table>, uq_<table>_<column>,
fk_<table>_<column>_<referred table>, ix_<table>_<column>, so later
migrations can drop them by name on SQLite and PostgreSQL alike. Enumerated
states are VARCHAR(16) holding the enum member names, without a CHECK
constraint, so adding a state needs no table rebuild.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JOB_STATES = ("RECEIVED", "CLASSIFIED", "RENDERED", "DELIVERED", "FAILED")
OUTBOX_STATES = ("PENDING", "SENT", "DEAD")


def lease_columns() -> list[sa.Column]:
    """Columns of rows that workers claim with an expiring lease (dermgate.db.LeaseMixin)."""
    return [
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("issuer_of_patient_id", sa.String(length=64), nullable=True),
        sa.Column("accession_number", sa.String(length=16), nullable=True),
        sa.Column("study_date", sa.String(length=8), nullable=True),
        sa.Column("study_time", sa.String(length=16), nullable=True),
        sa.Column("modality", sa.String(length=16), nullable=True),
        sa.Column("body_site", sa.String(length=64), nullable=True),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(length=255), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_instances"),
        sa.UniqueConstraint("sop_instance_uid", name="uq_instances_sop_instance_uid"),
    )
    op.create_index("ix_instances_patient_id", "instances", ["patient_id"])
    op.create_index("ix_instances_study_instance_uid", "instances", ["study_instance_uid"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.Enum(*JOB_STATES, name="jobstate", native_enum=False, length=16), nullable=False),
        sa.Column("correlation_id", sa.String(length=32), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("outputs", sa.JSON(), nullable=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        *lease_columns(),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.ForeignKeyConstraint(["instance_id"], ["instances.id"], name="fk_jobs_instance_id_instances"),
        sa.UniqueConstraint("instance_id", name="uq_jobs_instance_id"),
    )
    op.create_index("ix_jobs_claim", "jobs", ["state", "next_attempt_at"])

    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("channel", sa.String(length=64), nullable=False),
        sa.Column("business_key", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("state", sa.Enum(*OUTBOX_STATES, name="outboxstate", native_enum=False, length=16),
                  nullable=False),
        sa.Column("remote_ref", sa.String(length=255), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        *lease_columns(),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_outbox_job_id_jobs"),
        sa.UniqueConstraint("channel", "business_key", name="uq_outbox_channel_key"),
    )
    op.create_index("ix_outbox_claim", "outbox", ["state", "next_attempt_at"])
    op.create_index("ix_outbox_job_id", "outbox", ["job_id"])

    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("reviewer", sa.String(length=128), nullable=False),
        sa.Column("decision", sa.String(length=16), nullable=False),
        sa.Column("diagnosis", sa.String(length=16), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_reviews"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_reviews_job_id_jobs"),
    )
    op.create_index("ix_reviews_job_id", "reviews", ["job_id"])


def downgrade() -> None:
    for table in ("reviews", "outbox", "jobs", "instances"):
        op.drop_table(table)
