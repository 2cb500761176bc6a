"""Encrypted, tamper-evident audit trail (HIPAA 164.312(b), (c)).

Producers record through the :class:`AuditSink` contract (``audit.api``); the
service opens one :class:`AuditTrail` (``audit.trail.open_trail`` or
``audit.cli.open_configured_trail``) and hands it out as the sink.
"""

from audit.api import AuditEvent, AuditSink, EventType, Outcome

__all__ = ["AuditEvent", "AuditSink", "EventType", "Outcome"]
