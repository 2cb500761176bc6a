"""On-disk format of the audit log: one canonical JSON record per line.

A line is ``canonical_json(envelope) + "\\n"``; canonical means sorted keys, no
whitespace, UTF-8, so the bytes are reproducible and any edit shows. Envelope
fields (all records)::

    v     format version            seq   0, 1, 2 ... without gaps
    kind  genesis|event|checkpoint|repair
    time  UTC time the record was written (RFC 3339, microseconds, "Z")
    prev  SHA-256 (hex) of the previous record's line; 64 zeros for seq 0
    hash  SHA-256 (hex) of canonical_json(envelope without "hash")

``event`` records add ``kid`` (key id), ``kcv`` (key check value), ``nonce``
and ``ct`` (AES-256-GCM ciphertext of the canonical event body, base64). The
associated data binds log id, seq, time, kind, kid, kcv and prev, so a record
moved, renumbered or spliced from another log does not decrypt.

Signed records (``genesis``, ``checkpoint``, ``repair``) add ``log`` (the log
id), ``signer`` (fingerprint of the Ed25519 public key) and ``sig`` (signature
over ``SIGNATURE_DOMAIN + canonical_json(envelope without sig and hash)``).
A checkpoint signs ``prev``, i.e. the head of the chain before it, and so every
record before it. A ``repair`` record also names the torn bytes it cut off.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import PurePath
from typing import Any
from uuid import UUID

from audit.api import AuditEvent, EventType, Outcome

FORMAT_VERSION = 1
GENESIS_PREV = "0" * 64
SIGNATURE_DOMAIN = b"dermgate-audit-signature-v1\n"
AAD_DOMAIN = b"dermgate-audit-record-v1\n"

LOG_FILE = "audit.log"
WITNESS_FILE = "checkpoint.json"           # copy of the newest signed record
TORN_PREFIX = "torn-"                       # quarantined torn tails: torn-<seq>-<time>.bin


class Kind(str, enum.Enum):
    GENESIS = "genesis"
    EVENT = "event"
    CHECKPOINT = "checkpoint"
    REPAIR = "repair"


SIGNED_KINDS = frozenset({Kind.GENESIS.value, Kind.CHECKPOINT.value, Kind.REPAIR.value})


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8: one byte string per value."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False, default=_json_default).encode("utf-8")


def _json_default(value: Any) -> Any:
    # detail dicts come from many producers; coerce the usual types rather than lose an event
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (PurePath, UUID)):
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value, key=str) if isinstance(value, (set, frozenset)) else list(value)
    return str(value)


def format_time(value: datetime) -> str:
    """RFC 3339 UTC with microseconds and a ``Z``; naive datetimes are taken as UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(timezone.utc)


def record_hash(envelope: dict[str, Any]) -> str:
    body = {k: v for k, v in envelope.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def seal(envelope: dict[str, Any]) -> bytes:
    """Add the hash and return the line to append."""
    envelope["hash"] = record_hash(envelope)
    return canonical_json(envelope) + b"\n"


def signed_payload(envelope: dict[str, Any]) -> bytes:
    body = {k: v for k, v in envelope.items() if k not in ("sig", "hash")}
    return SIGNATURE_DOMAIN + canonical_json(body)


def associated_data(log_id: str, envelope: dict[str, Any]) -> bytes:
    bound = {"log": log_id, **{k: envelope[k] for k in ("seq", "time", "kind", "kid", "kcv", "prev")}}
    return AAD_DOMAIN + canonical_json(bound)


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64d(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


# --- the encrypted body ------------------------------------------------------------------

def event_to_body(event: AuditEvent) -> dict[str, Any]:
    return {
        "event": event.event.value,
        "outcome": event.outcome.value,
        "actor": event.actor,
        "action": event.action,
        "actor_role": event.actor_role,
        "source": event.source,
        "destination": event.destination,
        "patient_id": event.patient_id,
        "study_uid": event.study_uid,
        "sop_instance_uids": list(event.sop_instance_uids),
        "purpose": event.purpose,
        "detail": event.detail,
        "time": format_time(event.time) if event.time else None,
    }


def body_to_event(body: dict[str, Any]) -> AuditEvent:
    return AuditEvent(
        event=EventType(body["event"]),
        outcome=Outcome(body["outcome"]),
        actor=body["actor"],
        action=body.get("action", "E"),
        actor_role=body.get("actor_role"),
        source=body.get("source"),
        destination=body.get("destination"),
        patient_id=body.get("patient_id"),
        study_uid=body.get("study_uid"),
        sop_instance_uids=tuple(body.get("sop_instance_uids") or ()),
        purpose=body.get("purpose"),
        detail=dict(body.get("detail") or {}),
        time=parse_time(body["time"]) if body.get("time") else None,
    )


@dataclass(frozen=True)
class AuditRecord:
    """One record as read back: envelope facts plus, for events, the decrypted event."""
    seq: int
    kind: str
    time: datetime                      # when the record was written
    key_id: str | None
    event: AuditEvent | None            # None for genesis/checkpoint/repair, or when not decrypted
    envelope: dict[str, Any]

    @property
    def event_time(self) -> datetime:
        """When the audited action happened (falls back to the write time)."""
        return self.event.time if self.event and self.event.time else self.time
