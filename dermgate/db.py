"""The service database: the same schema on SQLite (embedded default) and PostgreSQL.

Tables: ``instances`` (what was received, with the sha256 of its bytes),
``jobs`` (one per instance: received -> classified -> rendered -> delivered,
or failed), ``outbox`` (one row per delivery to one channel, written in the
transaction that records the result), ``reviews`` (clinician decisions),
``audit_anchor`` (the audit trail's head, kept outside the trail so a trail cut
back or deleted no longer matches it), ``outcomes`` (the truth for a lesion:
histopathology, follow-up or consensus) and ``outcome_links`` (which AI results an outcome is the truth for);
for the web console: ``accounts`` (local sign-in accounts, Argon2id hashes)
and ``console_sessions`` (server-side sessions, only a token's sha256 kept).
"""

from __future__ import annotations

import enum
import os
from datetime import date, datetime, timezone
from typing import Any

from sqlalchemy import (JSON, BigInteger, Boolean, Date, DateTime, Enum, ForeignKey, Index, Integer, String, Text,
                        UniqueConstraint, create_engine, event)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(timezone.utc)




class TZDateTime(TypeDecorator[datetime]):
    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(timezone.utc) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value


class Base(DeclarativeBase):
    pass


class JobState(str, enum.Enum):
    RECEIVED = "received"
    CLASSIFIED = "classified"
    RENDERED = "rendered"
    DELIVERED = "delivered"
    FAILED = "failed"          # dead letter: retries exhausted or a permanent error


class OutboxState(str, enum.Enum):
    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"


class Instance(Base):
    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    patient_id: Mapped[str] = mapped_column(String(64), index=True)      # PHI, needed for the FHIR subject
    issuer_of_patient_id: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_time: Mapped[str | None] = mapped_column(String(16))
    modality: Mapped[str | None] = mapped_column(String(16))
    body_site: Mapped[str | None] = mapped_column(String(64))
    calling_ae: Mapped[str] = mapped_column(String(16))
    # Device and population, for live performance by subgroup (issue 11): from the DICOM header.
    manufacturer: Mapped[str | None] = mapped_column(String(64))
    manufacturer_model_name: Mapped[str | None] = mapped_column(String(64))
    station_name: Mapped[str | None] = mapped_column(String(16))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    patient_age_years: Mapped[int | None] = mapped_column(Integer)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(255))                       # relative to the store root
    received_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)


class LeaseMixin:
    """Columns for rows that workers claim with an expiring lease."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(TZDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow, onupdate=utcnow)


class Job(LeaseMixin, Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), unique=True)
    state: Mapped[JobState] = mapped_column(Enum(JobState, native_enum=False, length=16), default=JobState.RECEIVED)
    correlation_id: Mapped[str] = mapped_column(String(32))
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    outputs: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    completed_at: Mapped[datetime | None] = mapped_column(TZDateTime())
    recall_id: Mapped[int | None] = mapped_column(ForeignKey("model_recalls.id"), index=True)  # result recalled
    # Copies of two result fields the worklist sorts and filters on (reading them out of the JSON
    # for every row costs more than the 300 ms a worklist page may take at 10,000 results).
    risk: Mapped[str | None] = mapped_column(String(16))
    low_confidence: Mapped[bool | None] = mapped_column(Boolean)
    reviewed_at: Mapped[datetime | None] = mapped_column(TZDateTime())   # newest clinician review (reviews)
    __table_args__ = (Index("ix_jobs_claim", "state", "next_attempt_at"),)


@event.listens_for(Job, "before_insert")
@event.listens_for(Job, "before_update")
def _job_result_columns(mapper: Any, connection: Any, job: Job) -> None:
    """Keep the worklist's copies in step when a result is written through the ORM
    (the worker writes them itself in its fenced UPDATE)."""
    if job.result is not None:
        job.risk = job.result.get("risk")
        job.low_confidence = bool(job.result.get("low_confidence"))


class OutboxItem(LeaseMixin, Base):
    __tablename__ = "outbox"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    channel: Mapped[str] = mapped_column(String(64))
    business_key: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(32), default="report")     # report | review
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[OutboxState] = mapped_column(Enum(OutboxState, native_enum=False, length=16),
                                               default=OutboxState.PENDING)
    remote_ref: Mapped[str | None] = mapped_column(String(255))
    sent_at: Mapped[datetime | None] = mapped_column(TZDateTime())
    __table_args__ = (UniqueConstraint("channel", "business_key", name="uq_outbox_channel_key"),
                      Index("ix_outbox_claim", "state", "next_attempt_at"))


class Review(Base):
    __tablename__ = "reviews"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    reviewer: Mapped[str] = mapped_column(String(128))
    decision: Mapped[str] = mapped_column(String(16))                    # confirm | override
    diagnosis: Mapped[str | None] = mapped_column(String(16))            # one of the 7 classes on override
    comment: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)
    reviewer_reference: Mapped[str | None] = mapped_column(String(128))  # FHIR Practitioner/<id>, when known


class Account(Base):
    """A local console account (the fallback to the hospital's OpenID provider, and the demo's)."""
    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(128), unique=True)
    display_name: Mapped[str | None] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))                        # clinician | compliance | operator | admin
    password_hash: Mapped[str] = mapped_column(String(255))              # Argon2id, PHC string
    totp_secret: Mapped[str | None] = mapped_column(String(255))         # encrypted (Fernet) base32 secret
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(TZDateTime())
    practitioner_reference: Mapped[str | None] = mapped_column(String(128))
    password_changed_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(TZDateTime())
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)


class ConsoleSession(Base):
    """A signed-in console user: the cookie holds a random token, this row its sha256."""
    __tablename__ = "console_sessions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    username: Mapped[str] = mapped_column(String(128))
    display_name: Mapped[str | None] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    auth_method: Mapped[str] = mapped_column(String(16))                 # local | oidc
    practitioner_reference: Mapped[str | None] = mapped_column(String(128))
    csrf_token: Mapped[str] = mapped_column(String(64))
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)            # worklist / audit filters (may hold PHI)
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(TZDateTime())          # absolute lifetime
    ended_at: Mapped[datetime | None] = mapped_column(TZDateTime())
    end_reason: Mapped[str | None] = mapped_column(String(16))           # logout | idle | expired


@event.listens_for(Review, "after_insert")
def _review_marks_job(mapper: Any, connection: Any, review: Review) -> None:
    """A review makes its job reviewed for the worklist, in the same transaction."""
    jobs: Any = Job.__table__
    connection.execute(jobs.update().where(jobs.c.id == review.job_id).values(reviewed_at=review.created_at))


class AuditAnchor(Base):
    """The newest record of one audit log, as every writing process last saw it (``audit.anchor``).

    Only ever moves forward: a trail that ends before ``seq``, or holds another
    record there, was cut back or replaced.
    """
    __tablename__ = "audit_anchor"
    log_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)                          # newest durable record
    hash: Mapped[str] = mapped_column(String(64))
    checkpoint_seq: Mapped[int | None] = mapped_column(BigInteger)        # newest signed record
    checkpoint_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)


class Outcome(Base):
    """The truth for a lesion, from outside the AI: histopathology, follow-up or consensus.

    ``diagnosis`` is one of the 7 classes, or ``benign`` / ``malignant`` where only that
    is known. The identifying columns (accession number, Study Instance UID, patient and
    body site) are what it is linked to AI results by; an outcome that links to nothing
    stays here, unlinked, for a person to link (``dermgate outcomes link``)."""
    __tablename__ = "outcomes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    accession_number: Mapped[str | None] = mapped_column(String(16), index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)     # PHI
    body_site: Mapped[str | None] = mapped_column(String(64))
    diagnosis: Mapped[str] = mapped_column(String(16))
    malignant: Mapped[bool] = mapped_column(Boolean)
    outcome_date: Mapped[date] = mapped_column(Date)
    source: Mapped[str] = mapped_column(String(32))                  # histopathology | follow-up | consensus
    lab_reference: Mapped[str | None] = mapped_column(String(128))   # the laboratory's report or specimen number
    fitzpatrick: Mapped[str | None] = mapped_column(String(8))       # I..VI
    external_ref: Mapped[str] = mapped_column(String(255), unique=True)  # idempotency key (file row, FHIR report)
    note: Mapped[str | None] = mapped_column(Text)                   # e.g. the pathology conclusion text
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)


class OutcomeLink(Base):
    """One outcome is the truth for one AI result (a job). Made automatically or by a person; audited."""
    __tablename__ = "outcome_links"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    outcome_id: Mapped[int] = mapped_column(ForeignKey("outcomes.id"), index=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    method: Mapped[str] = mapped_column(String(32))      # accession | study_uid | patient_body_site | manual
    linked_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)
    __table_args__ = (UniqueConstraint("outcome_id", "job_id", name="uq_outcome_links_outcome_job"),)


class ModelRecall(Base):
    """A model version recalled by an operator: its results are withdrawn from the PACS (IOCM rejection
    note) and the EHR (entered-in-error or amended), each step through the outbox."""
    __tablename__ = "model_recalls"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_version: Mapped[str] = mapped_column(String(64), index=True)
    reason: Mapped[str] = mapped_column(Text)
    fhir_action: Mapped[str] = mapped_column(String(32))          # entered-in-error | amended
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow)
    n_results: Mapped[int] = mapped_column(Integer, default=0)


def make_engine(url: str) -> Engine:
    """An engine with the settings each backend needs for durable, concurrent use."""
    if url.startswith("sqlite"):
        _private_sqlite_files(url)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _: Any) -> None:
            dbapi_conn.isolation_level = None   # we issue BEGIN ourselves (below)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")   # a commit survives power loss before we answer Success
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # BEGIN IMMEDIATE takes the write lock up front: claims by several
            # worker processes serialise instead of deadlocking on upgrade.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)


def _private_sqlite_files(url: str) -> None:
    """The database holds PHI: create it 0600 before SQLite does (SQLite would use the umask; its
    -wal and -shm files then take the database file's mode), and tighten files an older release left."""
    from pathlib import Path

    from sqlalchemy.engine import make_url

    from dermgate.durable import private_dir, private_file
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    private_dir(path.parent, tighten=False)
    private_file(path)
    for suffix in ("-wal", "-shm", "-journal"):
        sidecar = path.with_name(path.name + suffix)
        if sidecar.exists():
            os.chmod(sidecar, 0o600)


def make_sessionmaker(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)


def create_schema(engine: Engine) -> None:
    """Create tables (embedded default). Production PostgreSQL uses Alembic migrations."""
    Base.metadata.create_all(engine)
