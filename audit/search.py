"""Search the audit trail by patient, user, AE title, event type and time range.

Searching decrypts, and reading the trail is itself a security-relevant act:
:func:`search` records an ``AUDIT_QUERY`` event (who asked, the filters, how
many records matched) before it hands back any result, and raises if that
record cannot be written. :func:`find` is the unaudited primitive for code in
this package that audits at its own level (exports, disclosure reports).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Iterator, Sequence

from audit.api import AuditEvent, EventType, Outcome
from audit.codes import OUTCOME_TEXT
from audit.format import AuditRecord, format_time
from audit.trail import AuditTrail

AE_DETAIL_KEYS = ("calling_ae", "called_ae", "ae_title", "destination_ae", "source_ae")


@dataclass(frozen=True)
class AuditQuery:
    """Filters; every one given must match. Times compare with the event's own time (UTC)."""
    patient_id: str | None = None
    actor: str | None = None
    ae_title: str | None = None
    event_types: tuple[EventType, ...] = ()
    since: datetime | None = None
    until: datetime | None = None
    limit: int | None = None

    def matches(self, event: AuditEvent, when: datetime) -> bool:
        if self.patient_id is not None and self.patient_id not in patients_of(event):
            return False
        if self.actor is not None and event.actor != self.actor:
            return False
        if self.ae_title is not None and self.ae_title.strip() not in ae_titles_of(event):
            return False
        if self.event_types and event.event not in self.event_types:
            return False
        if self.since is not None and when < self.since:
            return False
        return self.until is None or when <= self.until

    def describe(self) -> dict[str, Any]:
        """The filters as audit detail (the patient goes in the event's patient field instead)."""
        out: dict[str, Any] = {}
        if self.actor is not None:
            out["actor"] = self.actor
        if self.ae_title is not None:
            out["ae_title"] = self.ae_title
        if self.event_types:
            out["event_types"] = [e.value for e in self.event_types]
        if self.since is not None:
            out["since"] = format_time(self.since)
        if self.until is not None:
            out["until"] = format_time(self.until)
        if self.limit is not None:
            out["limit"] = self.limit
        return out


def patients_of(event: AuditEvent) -> set[str]:
    """Patients an event concerns: its patient, plus those listed by exports covering many."""
    found = {event.patient_id} if event.patient_id else set()
    listed = event.detail.get("patients")
    if isinstance(listed, list):
        found.update(str(p) for p in listed)
    return found


def ae_titles_of(event: AuditEvent) -> set[str]:
    """AE titles named anywhere in an event: actor, peers (``AE@host:port``) and detail."""
    values: list[Any] = [event.actor, event.source, event.destination]
    values += [event.detail.get(k) for k in AE_DETAIL_KEYS]
    titles = set()
    for value in values:
        if isinstance(value, str) and value:
            titles.add(value.split("@", 1)[0].strip())
    return titles


def find(trail: AuditTrail, query: AuditQuery) -> Iterator[AuditRecord]:
    """Matching event records, oldest first, without auditing the read."""
    count = 0
    for record in trail.events(since=query.since):
        assert record.event is not None
        if query.matches(record.event, record.event_time):
            yield record
            count += 1
            if query.limit is not None and count >= query.limit:
                return


def search(trail: AuditTrail, query: AuditQuery, *, requested_by: str, role: str | None = None,
           purpose: str | None = None, source: str | None = None) -> list[AuditRecord]:
    """Matching records; the search itself is audited (``AUDIT_QUERY``) before results are returned."""
    try:
        results = list(find(trail, query))
    except Exception as exc:
        trail.record(AuditEvent(event=EventType.AUDIT_QUERY, outcome=Outcome.SERIOUS_FAILURE, actor=requested_by,
                                actor_role=role, source=source, patient_id=query.patient_id, purpose=purpose,
                                detail={**query.describe(), "error": type(exc).__name__}))
        raise
    trail.record(AuditEvent(event=EventType.AUDIT_QUERY, outcome=Outcome.SUCCESS, actor=requested_by,
                            actor_role=role, source=source, patient_id=query.patient_id, purpose=purpose,
                            detail={**query.describe(), "matched": len(results)}))
    return results


# --- readable tables ---------------------------------------------------------------------------

TABLE_HEADERS = ("SEQ", "TIME (UTC)", "EVENT", "OUTCOME", "ACTOR", "ROLE", "PATIENT", "STUDY", "PEER", "DETAIL")
_MAX_WIDTH = {"STUDY": 28, "PEER": 28, "DETAIL": 48, "ACTOR": 24}


def table_row(record: AuditRecord) -> tuple[str, ...]:
    event = record.event
    assert event is not None
    peer = event.destination or event.source or ""
    detail = json.dumps(event.detail, sort_keys=True, separators=(",", ":"), default=str) if event.detail else ""
    return (str(record.seq), record.event_time.strftime("%Y-%m-%d %H:%M:%S"), event.event.value,
            OUTCOME_TEXT.get(event.outcome, event.outcome.value), event.actor, event.actor_role or "",
            event.patient_id or "", event.study_uid or "", peer, detail)


def format_table(rows: Iterable[Sequence[str]], headers: Sequence[str] = TABLE_HEADERS) -> str:
    """Left-aligned columns, long values cut with an ellipsis so one record stays on one line."""
    cut = [tuple(_clip(v, _MAX_WIDTH.get(h)) for h, v in zip(headers, row)) for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cut]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cut]
    return "\n".join(lines)


def _clip(value: str, width: int | None) -> str:
    value = value.replace("\n", " ")
    if width is None or len(value) <= width:
        return value
    return value[: width - 1] + "…"


def records_table(records: Iterable[AuditRecord]) -> str:
    return format_table(table_row(r) for r in records)
