"""Outcomes (the truth for a lesion) and their links to AI results; device and population columns.

Revision ID: 0002_i11_outcomes
Revises: 0002_i12a
Create Date: 2026-12-02

``instances`` gains the DICOM header fields that live performance is broken
down by (Manufacturer, Manufacturer's Model Name, Station Name, Patient's Sex,
age in years); ``outcomes`` holds histopathology / follow-up / consensus truth
and ``outcome_links`` which results each outcome is the truth for.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_i11_outcomes"
down_revision: str | Sequence[str] | None = "0002_i12a"   # re-chained after the audit anchor
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INSTANCE_COLUMNS = (
    ("manufacturer", sa.String(length=64)),
    ("manufacturer_model_name", sa.String(length=64)),
    ("station_name", sa.String(length=16)),
    ("patient_sex", sa.String(length=16)),
    ("patient_age_years", sa.Integer()),
)


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        for name, type_ in INSTANCE_COLUMNS:
            batch.add_column(sa.Column(name, type_, nullable=True))

    op.create_table(
        "outcomes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("accession_number", sa.String(length=16), nullable=True),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.Column("body_site", sa.String(length=64), nullable=True),
        sa.Column("diagnosis", sa.String(length=16), nullable=False),
        sa.Column("malignant", sa.Boolean(), nullable=False),
        sa.Column("outcome_date", sa.Date(), nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("lab_reference", sa.String(length=128), nullable=True),
        sa.Column("fitzpatrick", sa.String(length=8), nullable=True),
        sa.Column("external_ref", sa.String(length=255), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_outcomes"),
        sa.UniqueConstraint("external_ref", name="uq_outcomes_external_ref"),
    )
    op.create_index("ix_outcomes_accession_number", "outcomes", ["accession_number"])
    op.create_index("ix_outcomes_patient_id", "outcomes", ["patient_id"])

    op.create_table(
        "outcome_links",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("outcome_id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("linked_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_outcome_links"),
        sa.ForeignKeyConstraint(["outcome_id"], ["outcomes.id"], name="fk_outcome_links_outcome_id_outcomes"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_outcome_links_job_id_jobs"),
        sa.UniqueConstraint("outcome_id", "job_id", name="uq_outcome_links_outcome_job"),
    )
    op.create_index("ix_outcome_links_outcome_id", "outcome_links", ["outcome_id"])
    op.create_index("ix_outcome_links_job_id", "outcome_links", ["job_id"])


def downgrade() -> None:
    op.drop_table("outcome_links")
    op.drop_table("outcomes")
    with op.batch_alter_table("instances") as batch:
        for name, _ in reversed(INSTANCE_COLUMNS):
            batch.drop_column(name)
