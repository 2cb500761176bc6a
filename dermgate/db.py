"""The service database: the same schema on SQLite (embedded default) and PostgreSQL.

Tables: ``instances`` (what was received, with the sha256 of its bytes),
``jobs`` (one per instance: received -> classified -> rendered -> delivered,
or failed), ``outbox`` (one row per delivery to one channel, written in the
transaction that records the result), ``reviews`` (clinician decisions);
for the web console: ``accounts`` (local sign-in accounts, Argon2id hashes)
and ``console_sessions`` (server-side sessions, only a token's sha256 kept).
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (JSON, Boolean, DateTime, Enum, ForeignKey, Index, Integer, String, Text, UniqueConstraint,
                        create_engine, event)
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
    jobs = Job.__table__
    connection.execute(jobs.update().where(jobs.c.id == review.job_id).values(reviewed_at=review.created_at))


def make_engine(url: str) -> Engine:
    """An engine with the settings each backend needs for durable, concurrent use."""
    if url.startswith("sqlite"):
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


def make_sessionmaker(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)


def create_schema(engine: Engine) -> None:
    """Create tables (embedded default). Production PostgreSQL uses Alembic migrations."""
    Base.metadata.create_all(engine)
