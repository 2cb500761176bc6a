"""An in-memory AuditSink for tests that check what a component records.

A test double on purpose: the encrypted, durable trail is the audit package's
and is tested against real files in tests/audit (and end to end in
tests/dermgate); elsewhere only *what* a component records matters.
"""

from __future__ import annotations

from audit.api import AuditEvent, EventType


class ListAudit:
    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def record(self, event: AuditEvent) -> int:
        self.events.append(event)
        return len(self.events)

    def of(self, kind: EventType) -> list[AuditEvent]:
        return [e for e in self.events if e.event is kind]
