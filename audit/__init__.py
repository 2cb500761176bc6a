"""Encrypted, tamper-evident audit trail (HIPAA 164.312(b), (c))."""

from audit.api import AuditEvent, AuditSink, EventType, Outcome

__all__ = ["AuditEvent", "AuditSink", "EventType", "Outcome"]
