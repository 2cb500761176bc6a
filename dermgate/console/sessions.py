"""Console sessions: server-side rows, a random token in an HttpOnly, SameSite cookie.

The cookie (``__Host-dermgate`` under TLS: Secure, Path=/, no Domain) holds 32 random bytes;
the database keeps only their sha256, the user, the role, a CSRF token and when the session
started and was last used. A session ends on sign-out, after ``idle_timeout_s`` without a
request (automatic logoff) and after ``absolute_lifetime_s`` whatever happens; each end is
audited (``security.logout`` with the reason).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import sessionmaker

from audit.api import AuditEvent, EventType, Outcome
from dermgate.db import ConsoleSession, utcnow
from dermgate.settings import ConsoleSettings

COOKIE = "dermgate_session"
SECURE_COOKIE = "__Host-dermgate_session"
PURPOSE_OF_USE = {"clinician": "TREAT", "compliance": "HCOMPL", "operator": "HOPERAT", "admin": "HOPERAT"}


@dataclass(frozen=True)
class ConsoleUser:
    session_id: int
    username: str
    display_name: str | None
    role: str
    auth_method: str
    practitioner_reference: str | None
    csrf_token: str
    data: dict[str, Any]
    expires_at: datetime

    @property
    def purpose(self) -> str:
        return PURPOSE_OF_USE.get(self.role, "HOPERAT")

    @property
    def label(self) -> str:
        return self.display_name or self.username


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Sessions:
    def __init__(self, db: sessionmaker, settings: ConsoleSettings, audit: Any) -> None:
        self.db, self.settings, self.audit = db, settings, audit

    def create(self, *, username: str, role: str, auth_method: str, display_name: str | None = None,
               practitioner_reference: str | None = None, now: datetime | None = None) -> str:
        """A new session; returns the cookie token (shown only to the browser)."""
        now = now or utcnow()
        token = secrets.token_urlsafe(32)
        with self.db.begin() as s:
            s.add(ConsoleSession(token_hash=_digest(token), username=username, display_name=display_name, role=role,
                                 auth_method=auth_method, practitioner_reference=practitioner_reference,
                                 csrf_token=secrets.token_urlsafe(32), data={}, created_at=now, last_seen_at=now,
                                 expires_at=now + timedelta(seconds=self.settings.absolute_lifetime_s)))
        return token

    def resolve(self, token: str | None, *, source: str | None = None, touch: bool = True,
                now: datetime | None = None) -> tuple[ConsoleUser | None, str | None]:
        """(the user, None) for a live session, else (None, why): missing, ended, idle, expired.
        An idle or expired session is ended (and audited) here, on its first use after the limit."""
        if not token:
            return None, "missing"
        now = now or utcnow()
        with self.db.begin() as s:
            row = s.scalar(select(ConsoleSession).where(ConsoleSession.token_hash == _digest(token)))
            if row is None or row.ended_at is not None:
                return None, "ended"
            reason = None
            if now >= row.expires_at:
                reason = "expired"
            elif now - row.last_seen_at >= timedelta(seconds=self.settings.idle_timeout_s):
                reason = "idle"
            if reason:
                row.ended_at, row.end_reason = now, reason
                user, role, method = row.username, row.role, row.auth_method
            else:
                if touch:
                    row.last_seen_at = now
                return ConsoleUser(row.id, row.username, row.display_name, row.role, row.auth_method,
                                   row.practitioner_reference, row.csrf_token, dict(row.data or {}),
                                   row.expires_at), None
        self.audit.record(AuditEvent(
            event=EventType.LOGOUT, outcome=Outcome.SUCCESS, actor=user, actor_role=role, action="E", source=source,
            detail={"reason": "idle timeout" if reason == "idle" else "session lifetime reached",
                    "idle_timeout_s": self.settings.idle_timeout_s, "auth": method}))
        return None, reason

    def end(self, user: ConsoleUser, *, source: str | None = None) -> None:
        with self.db.begin() as s:
            s.execute(update(ConsoleSession).where(ConsoleSession.id == user.session_id,
                                                   ConsoleSession.ended_at.is_(None))
                      .values(ended_at=utcnow(), end_reason="logout"))
        self.audit.record(AuditEvent(event=EventType.LOGOUT, outcome=Outcome.SUCCESS, actor=user.username,
                                     actor_role=user.role, action="E", source=source,
                                     detail={"reason": "sign-out", "auth": user.auth_method}))

    def save_data(self, user: ConsoleUser, key: str, value: Any) -> None:
        """Keep per-session state (filters that may hold a patient id: never in a URL)."""
        with self.db.begin() as s:
            row = s.get(ConsoleSession, user.session_id)
            if row is not None:
                row.data = {**(row.data or {}), key: value}

    @staticmethod
    def csrf_ok(user: ConsoleUser, submitted: str | None) -> bool:
        return bool(submitted) and hmac.compare_digest(user.csrf_token, submitted or "")
