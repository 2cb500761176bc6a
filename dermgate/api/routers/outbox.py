"""Deliveries for IT: the dead letters (retry and purge are in the CLI and the console's IT page)."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select

from dermgate.api.deps import AUTH_RESPONSES, RuntimeDep, User, require
from dermgate.api.models import DeadLetterOut
from dermgate.db import OutboxItem, OutboxState

router = APIRouter(prefix="/api/v1/outbox", tags=["ops"], responses=AUTH_RESPONSES)


@router.get("/dead", response_model=list[DeadLetterOut])
def dead_letters(rt: RuntimeDep, user: User = require("operator")) -> list[DeadLetterOut]:
    with rt.sessions() as s:
        rows = s.scalars(select(OutboxItem).where(OutboxItem.state == OutboxState.DEAD)
                         .order_by(OutboxItem.id).limit(500))
        return [DeadLetterOut(id=o.id, channel=o.channel, kind=o.kind, attempts=o.attempts,
                              last_error=o.last_error) for o in rows]
