"""The one table of channels and the audit package's codes cannot drift apart."""

from __future__ import annotations

import dataclasses

import pytest

from audit.api import EventType
from audit.codes import DISCLOSURE_EVENTS, EVENT_CODES
from dermgate import channels


def test_every_channel_event_is_coded_and_disclosing_channels_are_in_the_accounting() -> None:
    channels.check_audit_codes()
    for spec in channels.CHANNELS:
        assert EVENT_CODES[spec.audit_event].event_id.code == spec.audit_event_id
        if spec.disclosure:
            assert spec.audit_event in DISCLOSURE_EVENTS


def test_a_channel_whose_event_the_audit_tables_do_not_code_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new channel recorded under an event audit/codes.py does not know fails at import, not silently."""
    spec = dataclasses.replace(channels.CHANNELS[0], kind="new", audit_event=EventType.ECHO, audit_event_id="110106")
    monkeypatch.setattr(channels, "CHANNELS", (*channels.CHANNELS, spec))
    with pytest.raises(RuntimeError, match="must code"):
        channels.check_audit_codes()


def test_a_disclosing_channel_missing_from_the_accounting_of_disclosures_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("audit.codes.DISCLOSURE_EVENTS", DISCLOSURE_EVENTS - {EventType.HL7_DELIVERY})
    with pytest.raises(RuntimeError, match="DISCLOSURE_EVENTS"):
        channels.check_audit_codes()
