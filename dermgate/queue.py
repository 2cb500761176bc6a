"""Leased work queues over database rows (jobs and outbox items).

Many workers on many hosts claim rows safely: on PostgreSQL with
``SELECT ... FOR UPDATE SKIP LOCKED``; on SQLite every write transaction is
``BEGIN IMMEDIATE`` (see ``db.make_engine``), which serialises claims. A claim
is a lease that expires, so a worker killed with -9 releases its rows when the
lease runs out. Every later write is fenced on the lease owner: a worker whose
lease was taken over can no longer complete the row, so nothing completes twice.

A lease owner names its host and process (:func:`owner_id`). A worker that starts
on a host where a process it can prove dead still holds leases (its id no longer
exists, or it is this very id from before a container restart) releases them at
once (:func:`release_dead_owners`) instead of waiting for them to expire.
"""

from __future__ import annotations

import os
import random
import re
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from dermgate.db import LeaseMixin, utcnow
from dermgate.durable import host_tag, pid_alive

Row = TypeVar("Row", bound=LeaseMixin)

# One value per process: tells this process's leases from an earlier process's with the same id.
PROCESS_TOKEN = uuid.uuid4().hex[:8]
_OWNER = re.compile(r"[a-z]+@(?P<host>[A-Za-z0-9-]+):(?P<pid>\d+):(?P<token>[0-9a-f]{8}):[0-9a-f]{8}")


def owner_id(kind: str) -> str:
    """A lease owner: ``<kind>@<host>:<pid>:<process token>:<random>`` (at most 64 characters)."""
    return f"{kind[:8]}@{host_tag()}:{os.getpid()}:{PROCESS_TOKEN}:{uuid.uuid4().hex[:8]}"


def dead_owner(owner: str) -> bool:
    """Whether ``owner`` is a process of this host that is gone (never guessed for other hosts)."""
    m = _OWNER.fullmatch(owner)
    if m is None or m["host"] != host_tag():
        return False
    pid = int(m["pid"])
    if pid == os.getpid():
        return m["token"] != PROCESS_TOKEN      # this id, an earlier process (a restarted container)
    return not pid_alive(pid)


def claim(session: Session, model: type[Row], states: Sequence[Any], owner: str, lease_s: float,
          limit: int = 1, *where: Any, now: datetime | None = None) -> list[Row]:
    """Claim up to ``limit`` due rows in ``states`` (and matching ``where``); caller commits."""
    now = now or utcnow()
    stmt = (select(model)
            .where(model.state.in_(states),                      # type: ignore[attr-defined]
                   model.next_attempt_at <= now,
                   or_(model.lease_expires_at.is_(None), model.lease_expires_at < now), *where)
            .order_by(model.next_attempt_at, model.id)           # type: ignore[attr-defined]
            .limit(limit))
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    rows = list(session.scalars(stmt))
    for row in rows:
        row.lease_owner = owner
        row.lease_expires_at = now + timedelta(seconds=lease_s)
    return rows


def fenced_update(session: Session, model: type[Row], row_id: int, owner: str, **values: Any) -> bool:
    """Update a row only while ``owner`` still holds its lease; False if the lease was lost."""
    res = session.execute(update(model)
                          .where(model.id == row_id, model.lease_owner == owner)  # type: ignore[attr-defined]
                          .values(**values, updated_at=utcnow()))
    return res.rowcount == 1  # type: ignore[attr-defined]


def backoff(attempt: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Exponential back-off with full jitter (AWS architecture blog): uniform in [0, min(max, base*2^n)]."""
    rng = rng or random.Random()
    cap = min(max_s, base_s * (2 ** max(attempt - 1, 0)))
    return max(base_s / 2, rng.uniform(0, cap))


def release_dead_owners(session: Session, model: type[Row], now: datetime | None = None) -> list[str]:
    """Release the unexpired leases held by dead processes of this host; returns their owners."""
    now = now or utcnow()
    owners = session.scalars(select(model.lease_owner).distinct().where(   # type: ignore[attr-defined]
        model.lease_owner.like(f"%@{host_tag()}:%"), model.lease_expires_at >= now)).all()  # type: ignore[attr-defined]
    dead = [o for o in owners if o and dead_owner(o)]
    for owner in dead:
        release(session, model, owner)
    return dead


def release(session: Session, model: type[Row], owner: str) -> int:
    """Release every lease ``owner`` holds (graceful shutdown); returns how many."""
    res = session.execute(update(model).where(model.lease_owner == owner)  # type: ignore[attr-defined]
                          .values(lease_owner=None, lease_expires_at=None))
    return res.rowcount  # type: ignore[attr-defined]
