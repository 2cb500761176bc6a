"""Operator actions on the queues: retry failed jobs, retry or purge dead letters.

One core for the CLI (``dermgate jobs|outbox``) and the console's IT page; each action is
audited (``job.admin``) by the caller's name and role.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import sessionmaker

from audit.api import AuditEvent, EventType, Outcome
from dermgate.db import Job, JobState, OutboxItem, OutboxState, utcnow


def retry_jobs(sessions: sessionmaker, audit: Any, ids: Sequence[int] | None, *, actor: str,
               role: str = "operator", source: str | None = None) -> int:
    """Queue failed jobs again (all failed ones when ``ids`` is None)."""
    with sessions.begin() as s:
        q = select(Job).where(Job.state == JobState.FAILED)
        if ids is not None:
            q = q.where(Job.id.in_(list(ids)))
        jobs = list(s.scalars(q))
        for job in jobs:
            job.state = JobState.CLASSIFIED if job.result else JobState.RECEIVED
            job.attempts, job.next_attempt_at, job.lease_owner, job.lease_expires_at = 0, utcnow(), None, None
        done = [j.id for j in jobs]
    audit.record(AuditEvent(event=EventType.JOB_ADMIN, outcome=Outcome.SUCCESS, actor=actor, actor_role=role,
                            action="U", source=source, detail={"retry_jobs": done[:100], "count": len(done)}))
    return len(done)


def retry_dead_letters(sessions: sessionmaker, audit: Any, ids: Sequence[int] | None, *, actor: str,
                       role: str = "operator", source: str | None = None) -> int:
    with sessions.begin() as s:
        q = select(OutboxItem).where(OutboxItem.state == OutboxState.DEAD)
        if ids is not None:
            q = q.where(OutboxItem.id.in_(list(ids)))
        items = list(s.scalars(q))
        for o in items:
            o.state, o.attempts, o.next_attempt_at = OutboxState.PENDING, 0, utcnow()
            o.lease_owner, o.lease_expires_at = None, None
        done = [o.id for o in items]
    audit.record(AuditEvent(event=EventType.JOB_ADMIN, outcome=Outcome.SUCCESS, actor=actor, actor_role=role,
                            action="U", source=source,
                            detail={"outbox": "retry", "retry": done[:100], "count": len(done)}))
    return len(done)


def purge_dead_letters(sessions: sessionmaker, audit: Any, ids: Sequence[int] | None, *, actor: str,
                       role: str = "operator", source: str | None = None) -> int:
    """Delete dead letters (their payloads hold PHI); the report they carried is not sent."""
    with sessions.begin() as s:
        q = delete(OutboxItem).where(OutboxItem.state == OutboxState.DEAD)
        if ids is not None:
            q = q.where(OutboxItem.id.in_(list(ids)))
        n = s.execute(q).rowcount
    audit.record(AuditEvent(event=EventType.JOB_ADMIN, outcome=Outcome.SUCCESS, actor=actor, actor_role=role,
                            action="D", source=source,
                            detail={"outbox": "purge-dead", "ids": list(ids or [])[:100], "purged": n}))
    return int(n or 0)


def outbox_counts(sessions: sessionmaker) -> list[tuple[str, str, int]]:
    with sessions() as s:
        return [(ch, st.value, int(n)) for ch, st, n in s.execute(
            select(OutboxItem.channel, OutboxItem.state, func.count())
            .group_by(OutboxItem.channel, OutboxItem.state).order_by(OutboxItem.channel))]
