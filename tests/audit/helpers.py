"""Shared builders for the audit tests."""

from __future__ import annotations

from audit.api import AuditEvent, EventType, Outcome


def store_event(i: int = 0, patient: str = "PAT-0001", **overrides: object) -> AuditEvent:
    """A C-STORE received from a modality, the most common audited event."""
    fields: dict[str, object] = dict(
        event=EventType.STORE_RECEIVED, outcome=Outcome.SUCCESS, actor="DERMCAM1", action="C",
        actor_role="modality", source="127.0.0.1", patient_id=patient, study_uid=f"1.2.826.0.1.3680043.8.498.{i}",
        sop_instance_uids=(f"1.2.826.0.1.3680043.8.498.{i}.1",),
        detail={"called_ae": "DERMGATE", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.77.1.7", "n": i})
    fields.update(overrides)
    return AuditEvent(**fields)  # type: ignore[arg-type]
