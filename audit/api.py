"""The audit contract every other package records through.

Producers build an :class:`AuditEvent` and hand it to an :class:`AuditSink`;
``record`` returns only once the record is durable (fsync), so the caller may
then acknowledge the action it audits (e.g. answer a C-STORE).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from collections.abc import Sequence
from typing import Any, Protocol


class Outcome(str, Enum):
    """DICOM PS3.15 A.5 EventOutcomeIndicator."""
    SUCCESS = "0"
    MINOR_FAILURE = "4"
    SERIOUS_FAILURE = "8"
    MAJOR_FAILURE = "12"


class EventType(str, Enum):
    """Application event names; mapped to DCM codes (110100 ...) by the audit package."""
    APP_START = "app.start"                      # 110100 Application Activity
    APP_STOP = "app.stop"                        # 110100
    ASSOCIATION = "dicom.association"            # 110122 Login / 110100 (accepted or rejected)
    ECHO = "dicom.echo"                          # 110100
    STORE_RECEIVED = "dicom.store"               # 110104 DICOM Instances Transferred (Source)
    CLASSIFIED = "inference.classified"          # 110100 / 110110 Patient Record (created)
    FORWARDED = "dicom.forward"                  # 110104 (Destination)
    FHIR_DELIVERY = "fhir.delivery"              # 110106 Export
    HL7_DELIVERY = "hl7.delivery"                # 110106 Export (HL7 v2 ORU^R01 over MLLP)
    REVIEW = "clinician.review"                  # 110110 Patient Record (updated)
    API_ACCESS = "api.access"                    # 110110 Patient Record (read)
    AUDIT_QUERY = "audit.query"                  # 110112 Query
    AUDIT_EXPORT = "audit.export"                # 110106 Export
    CONFIG_CHANGE = "config.change"              # 110100 + 110128 Network Configuration / 110129
    KEY_CHANGE = "security.key"                  # 110137 Security Alert? (key material)
    AUTH_FAILURE = "security.auth"               # 110114 User Authentication
    JOB_ADMIN = "job.admin"                      # 110100 (retry / purge by an operator)
    OUTCOME = "outcome.link"                     # 110110 Patient Record (truth recorded / linked to a result)
    MODEL_RECALL = "model.recall"                # 110113 Security Alert, Use of Restricted Function (an operator recall)
    LOGIN = "security.login"                     # 110114 User Authentication / 110122 Login
    LOGOUT = "security.logout"                   # 110114 / 110123 Logout (sign-out, idle timeout, expiry)
    USER_ADMIN = "security.user"                 # 110113 Security Alert / 110137 User Security Attributes Changed


@dataclass(frozen=True)
class AuditEvent:
    event: EventType
    outcome: Outcome
    actor: str                                   # user name, or calling AE title, or "dermgate"
    action: str = "E"                            # C/R/U/D/E (PS3.15 EventActionCode)
    actor_role: str | None = None                # clinician, compliance, operator, modality, ehr
    source: str | None = None                    # network address the action came from
    destination: str | None = None               # where data went (AE@host:port, URL)
    patient_id: str | None = None                # PHI: lives only inside the encrypted body
    study_uid: str | None = None
    sop_instance_uids: tuple[str, ...] = ()
    purpose: str | None = None                   # purpose of use for API reads
    detail: dict[str, Any] = field(default_factory=dict)  # reason, status codes, counts
    time: datetime | None = None                 # set by the sink when None (UTC)


class AuditSink(Protocol):
    def record(self, event: AuditEvent) -> int:
        """Persist durably (fsync) and return the record's sequence number."""
        ...


def record_all(sink: AuditSink, events: Sequence[AuditEvent]) -> list[int]:
    """Record ``events`` with one durable write when the sink can (``record_many``), else one by one."""
    many = getattr(sink, "record_many", None)
    if many is not None:
        return list(many(events))
    return [sink.record(e) for e in events]
