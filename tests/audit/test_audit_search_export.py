"""What a compliance officer gets: search, exports that parse, disclosures, and every use audited."""

from __future__ import annotations

import csv
import io
import xml.etree.ElementTree as ET
from datetime import datetime, timedelta, timezone

import pytest
from fhir.resources.R4B.bundle import Bundle

from audit.api import AuditEvent, EventType, Outcome
from audit.export import (PROFILE_DISCLOSURE, PROFILE_PATIENT_QUERY, PROFILE_PATIENT_READ, ExportContext,
                          disclosures, export, to_dicom_xml)
from audit.search import AuditQuery, find, records_table, search
from tests.audit.helpers import store_event

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=timezone.utc)
ALICE, BOB = "PAT-ALICE", "PAT-BOB"


@pytest.fixture
def trail(make_trail):
    trail = make_trail()
    events = [
        AuditEvent(EventType.ASSOCIATION, Outcome.MINOR_FAILURE, actor="ROGUE", source="10.0.0.66",
                   detail={"reason": "calling AE title not allowed", "called_ae": "DERMGATE"}, time=T0),
        store_event(1, patient=ALICE, time=T0 + timedelta(minutes=1)),
        AuditEvent(EventType.CLASSIFIED, Outcome.SUCCESS, actor="dermgate", action="C", patient_id=ALICE,
                   study_uid="1.2.826.0.1.3680043.8.498.1", detail={"risk": "High"}, time=T0 + timedelta(minutes=2)),
        AuditEvent(EventType.FORWARDED, Outcome.SUCCESS, actor="dermgate", action="R", patient_id=ALICE,
                   destination="PACS@10.0.0.9:104", study_uid="1.2.826.0.1.3680043.8.498.1",
                   sop_instance_uids=("1.2.3.1", "1.2.3.2"), time=T0 + timedelta(minutes=3)),
        AuditEvent(EventType.FHIR_DELIVERY, Outcome.MAJOR_FAILURE, actor="dermgate", action="C", patient_id=ALICE,
                   destination="https://ehr.example.org/fhir", detail={"error": "HTTP 503"},
                   time=T0 + timedelta(minutes=4)),
        AuditEvent(EventType.FHIR_DELIVERY, Outcome.SUCCESS, actor="dermgate", action="C", patient_id=ALICE,
                   destination="https://ehr.example.org/fhir", detail={"resource": "DiagnosticReport/42"},
                   time=T0 + timedelta(minutes=5)),
        AuditEvent(EventType.API_ACCESS, Outcome.SUCCESS, actor="dr.house", actor_role="clinician", action="R",
                   source="127.0.0.1", patient_id=ALICE, purpose="TREAT", time=T0 + timedelta(minutes=6)),
        store_event(2, patient=BOB, actor="DERMCAM2", time=T0 + timedelta(days=1)),
    ]
    for event in events:
        trail.record(event)
    return trail


def _last_event(trail) -> AuditEvent:
    return list(trail.events())[-1].event


def test_search_by_patient_returns_only_that_patients_records(trail):
    hits = search(trail, AuditQuery(patient_id=ALICE), requested_by="officer")
    assert [h.event.patient_id for h in hits] == [ALICE] * 6


def test_search_by_user_ae_title_event_type_and_time_range(trail):
    assert [h.event.actor for h in find(trail, AuditQuery(actor="dr.house"))] == ["dr.house"]
    assert {h.event.actor for h in find(trail, AuditQuery(ae_title="DERMCAM2"))} == {"DERMCAM2"}
    assert len(list(find(trail, AuditQuery(ae_title="PACS")))) == 1          # destination AE@host:port
    assert len(list(find(trail, AuditQuery(ae_title="DERMGATE")))) == 3      # called AE in detail
    types = {h.event.event for h in find(trail, AuditQuery(event_types=(EventType.FHIR_DELIVERY,)))}
    assert types == {EventType.FHIR_DELIVERY}
    window = AuditQuery(since=T0 + timedelta(minutes=2), until=T0 + timedelta(minutes=4))
    assert [h.event.event for h in find(trail, window)] == [EventType.CLASSIFIED, EventType.FORWARDED,
                                                            EventType.FHIR_DELIVERY]


def test_each_search_is_itself_audited_with_who_asked_and_what_matched(trail):
    search(trail, AuditQuery(patient_id=ALICE, event_types=(EventType.FORWARDED,)), requested_by="officer",
           role="compliance", purpose="HOPERAT")
    audit = _last_event(trail)
    assert audit.event is EventType.AUDIT_QUERY and audit.actor == "officer" and audit.actor_role == "compliance"
    assert audit.patient_id == ALICE and audit.detail["matched"] == 1
    assert audit.detail["event_types"] == ["dicom.forward"]


def test_search_results_print_as_a_readable_table(trail):
    text = records_table(find(trail, AuditQuery(patient_id=BOB)))
    header, rule, row = text.splitlines()
    assert header.split()[:4] == ["SEQ", "TIME", "(UTC)", "EVENT"]
    assert set(rule.replace(" ", "")) == {"-"}
    assert "dicom.store" in row and "Success" in row and BOB in row and "DERMCAM2" in row


def test_fhir_export_parses_as_an_r4_bundle_of_audit_events_with_balp_patterns(trail):
    text = export(trail, "fhir", AuditQuery(), requested_by="officer")
    bundle = Bundle.model_validate_json(text)               # the R4B models validate the whole document
    events = [e.resource for e in bundle.entry]
    assert len(events) == 8 and all(e.__resource_type__ == "AuditEvent" for e in events)
    by_type = {(e.type.code, e.action): e for e in events}
    forwarded = next(e for e in events if e.meta and e.meta.profile == [PROFILE_DISCLOSURE]
                     and e.entity[1].what.identifier.value.startswith("urn:oid:"))
    assert forwarded.type.code == "110106" and forwarded.subtype[0].code == "disclose"
    roles = {a.type.coding[0].code: a for a in forwarded.agent}
    assert roles["110153"].who.identifier.value == forwarded.source.observer.identifier.value
    assert roles["110152"].who.identifier.value == "PACS@10.0.0.9:104"
    assert forwarded.entity[0].type.code == "1" and forwarded.entity[0].role.code == "1"
    assert forwarded.entity[0].what.identifier.value == ALICE
    read = next(e for e in events if e.meta and e.meta.profile == [PROFILE_PATIENT_READ])
    assert read.type.code == "rest" and read.subtype[0].code == "read"
    assert read.purposeOfEvent[0].coding[0].code == "TREAT"
    assert {a.type.coding[0].code for a in read.agent} == {"IRCP", "110153", "110152"}   # user, client, server
    assert by_type[("110114", "E")].outcome == "4"               # the rejected association


def test_audit_queries_export_as_balp_patient_query(trail):
    search(trail, AuditQuery(patient_id=BOB), requested_by="officer")
    bundle = Bundle.model_validate_json(export(trail, "fhir", AuditQuery(event_types=(EventType.AUDIT_QUERY,)),
                                               requested_by="officer"))
    (query,) = [e.resource for e in bundle.entry]
    assert query.meta.profile == [PROFILE_PATIENT_QUERY]
    assert [e.role.code for e in query.entity] == ["1", "24"] and query.entity[1].query


def test_dicom_export_is_well_formed_ps3_15_xml_with_the_right_event_ids(trail):
    text = export(trail, "dicom", AuditQuery(), requested_by="officer")
    root = ET.fromstring(text.encode("utf-8"))
    messages = root.findall("AuditMessage")
    assert len(messages) == 8
    ids = [m.find("EventIdentification/EventID").get("csd-code") for m in messages]
    assert ids == ["110114", "110104", "110110", "110104", "110106", "110106", "110110", "110104"]
    for m in messages:                                       # A.5.1 element order
        tags = [c.tag for c in m]
        assert tags[0] == "EventIdentification" and tags[1] == "ActiveParticipant"
        assert tags.index("AuditSourceIdentification") > max(i for i, t in enumerate(tags) if t == "ActiveParticipant")
        assert all(t == "ParticipantObjectIdentification" for t in tags[tags.index("AuditSourceIdentification") + 1:])
    store = messages[1]
    roles = {p.find("RoleIDCode").get("csd-code"): p for p in store.findall("ActiveParticipant")}
    assert roles["110153"].get("UserID") == "DERMCAM1" and roles["110153"].get("UserIsRequestor") == "true"
    assert roles["110152"].get("UserID") == "dermgate"
    patient, study = store.findall("ParticipantObjectIdentification")
    assert patient.get("ParticipantObjectID") == ALICE
    assert patient.find("ParticipantObjectIDTypeCode").get("csd-code") == "2"
    assert study.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"
    assert study.find("ParticipantObjectDescription/SOPClass").get("UID") == "1.2.840.10008.5.1.4.1.1.77.1.7"
    forward = messages[3]
    dest = [p for p in forward.findall("ActiveParticipant") if p.find("RoleIDCode").get("csd-code") == "110152"]
    assert dest[0].get("UserID") == "PACS@10.0.0.9:104" and dest[0].get("NetworkAccessPointID") == "10.0.0.9"


def test_dicom_message_escapes_hostile_values():
    event = AuditEvent(EventType.AUTH_FAILURE, Outcome.MINOR_FAILURE, actor='<x>&"evil"',
                       detail={"reason": "</AuditMessage><injected/>"})
    root = ET.fromstring(to_dicom_xml(event, ExportContext()).encode())
    assert root.find("ActiveParticipant").get("UserID") == '<x>&"evil"'
    assert root.find("EventIdentification/EventOutcomeDescription").text == "</AuditMessage><injected/>"
    assert root.find("EventIdentification/EventTypeCode").get("csd-code") == "110122"


def test_csv_export_has_one_row_per_event_and_defuses_spreadsheet_formulas(make_trail):
    trail = make_trail()
    trail.record(AuditEvent(EventType.AUTH_FAILURE, Outcome.MINOR_FAILURE, actor="=HYPERLINK(\"http://x\")"))
    rows = list(csv.DictReader(io.StringIO(export(trail, "csv", AuditQuery(), requested_by="officer"))))
    assert len(rows) == 1 and rows[0]["event"] == "security.auth" and rows[0]["dcm_event_id"] == "110114"
    assert rows[0]["actor"].startswith("'=")


def test_an_export_is_audited_naming_every_patient_whose_records_left(trail):
    export(trail, "csv", AuditQuery(), requested_by="officer", destination="/tmp/out.csv")
    audit = _last_event(trail)
    assert audit.event is EventType.AUDIT_EXPORT and audit.actor == "officer"
    assert audit.destination == "/tmp/out.csv" and audit.detail["patients"] == [ALICE, BOB]
    assert audit.detail["records"] == 8 and audit.detail["format"] == "csv"


def test_accounting_of_disclosures_lists_each_time_data_left_to_where_and_when(trail):
    items = disclosures(trail, ALICE, requested_by="officer")
    assert [(d.event, d.recipient) for d in items] == [
        (EventType.FORWARDED, "PACS@10.0.0.9:104"),
        (EventType.FHIR_DELIVERY, "https://ehr.example.org/fhir"),
        (EventType.API_ACCESS, "dr.house (clinician)"),
    ]
    assert items[0].time == T0 + timedelta(minutes=3) and "2 instance(s)" in items[0].what
    with_failed = disclosures(trail, ALICE, requested_by="officer", include_failed=True)
    assert len(with_failed) == 4 and with_failed[1].outcome is Outcome.MAJOR_FAILURE
    assert disclosures(trail, BOB, requested_by="officer") == []
    audit = _last_event(trail)
    assert audit.event is EventType.AUDIT_QUERY and audit.patient_id == BOB
    assert audit.detail["report"] == "accounting of disclosures"


def test_an_audit_export_shows_up_in_the_disclosures_of_the_patients_it_contained(trail):
    export(trail, "fhir", AuditQuery(patient_id=BOB), requested_by="officer", destination="regulator@example.org")
    items = disclosures(trail, BOB, requested_by="officer")
    assert [d.event for d in items] == [EventType.AUDIT_EXPORT]
    assert "regulator@example.org" in items[0].recipient
