"""Export audit records: FHIR R4 AuditEvent (after IHE BALP), DICOM PS3.15 A.5 XML, CSV;
and the accounting-of-disclosures report for one patient.

FHIR: events that fit an IHE Basic Audit Log Pattern carry its profile
(``PatientRead``/``Read`` for API reads, ``PatientQuery``/``Query`` for
searches, ``PrivacyDisclosure.Source`` for data sent out of the service); the
rest use the DICOM EventID as ``type`` with the same agent/entity patterns
(client/Source Role ID, server/Destination Role ID, patient entity type 1 role
1, study entity identified by its Study Instance UID).

DICOM: one ``AuditMessage`` per event, built with ElementTree so escaping is
never hand-made: EventIdentification (EventID, EventTypeCode, outcome),
ActiveParticipant(s) with RoleIDCode 110153 Source / 110152 Destination,
AuditSourceIdentification, ParticipantObjectIdentification for the patient
(RFC-3881 "Patient Number") and the study (110180, with SOPClass/Instance).

Exports and disclosure reports are audited (``AUDIT_EXPORT`` naming every
patient whose records left, ``AUDIT_QUERY`` for a disclosure report) before
any output is returned.
"""

from __future__ import annotations

import base64
import csv
import io
import ipaddress
import json
import socket
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any, Iterable, Sequence, TextIO
from urllib.parse import urlsplit

from fhir.resources.R4B.auditevent import (AuditEvent as FhirAuditEvent, AuditEventAgent, AuditEventAgentNetwork,
                                           AuditEventEntity, AuditEventEntityDetail, AuditEventSource)
from fhir.resources.R4B.bundle import Bundle, BundleEntry
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.meta import Meta
from fhir.resources.R4B.reference import Reference

from audit.api import AuditEvent, EventType, Outcome
from audit.codes import (AUDIT_SOURCE_APPLICATION_SERVER, DCM_SYSTEM, DISCLOSURE_EVENTS, OUTCOME_TEXT,
                         PATIENT_NUMBER, ROLE_APPLICATION, ROLE_DESTINATION, ROLE_SOURCE, STUDY_INSTANCE_UID, Code,
                         coding_for)
from audit.codes import EXPORT as DCM_EXPORT
from audit.errors import AuditConfigError
from audit.format import AuditRecord, format_time
from audit.search import AuditQuery, find, format_table, patients_of
from audit.trail import AuditTrail

# Code systems (FHIR R4 terminology)
AUDIT_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL_INTERACTION = "http://hl7.org/fhir/restful-interaction"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
LIFECYCLE = "http://terminology.hl7.org/CodeSystem/iso-21089-lifecycle"
PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
ACT_REASON_OID = "2.16.840.1.113883.5.8"
DICOM_UID_SYSTEM = "urn:dicom:uid"

BALP = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/"
PROFILE_READ, PROFILE_PATIENT_READ = BALP + "IHE.BasicAudit.Read", BALP + "IHE.BasicAudit.PatientRead"
PROFILE_QUERY, PROFILE_PATIENT_QUERY = BALP + "IHE.BasicAudit.Query", BALP + "IHE.BasicAudit.PatientQuery"
PROFILE_DISCLOSURE = BALP + "IHE.BasicAudit.PrivacyDisclosure.Source"

NETWORK_MACHINE_NAME, NETWORK_IP, NETWORK_URI = "1", "2", "5"
ENTITY_PERSON, ENTITY_SYSTEM_OBJECT = "1", "2"
ROLE_PATIENT, ROLE_REPORT, ROLE_QUERY = "1", "3", "24"


class ExportFormat(str, Enum):
    FHIR = "fhir"
    DICOM = "dicom"
    CSV = "csv"


@dataclass(frozen=True)
class ExportContext:
    """Who is reporting: the audit source (this service) as exports name it."""
    source_id: str = "dermgate"
    site: str | None = None
    hostname: str = field(default_factory=socket.gethostname)
    log_id: str = ""


# --- peers -------------------------------------------------------------------------------------

def _network(address: str | None) -> tuple[str, str] | None:
    """(address, FHIR/DICOM network type) for ``host``, ``host:port``, ``AE@host:port`` or a URL."""
    if not address or address == "stdout":
        return None
    if "://" in address:
        return address, NETWORK_URI
    if address.startswith(("/", ".")):          # a file path (export destination), not a network peer
        return None
    host = address.split("@", 1)[-1]
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    try:
        ipaddress.ip_address(host)
        return host, NETWORK_IP
    except ValueError:
        return host, NETWORK_MACHINE_NAME


def _dicom_network(address: str | None) -> tuple[str, str] | None:
    net = _network(address)
    if net is None:
        return None
    value, kind = net
    if kind == NETWORK_URI:                     # DICOM has no URI type: use the host name
        return urlsplit(value).hostname or value, NETWORK_MACHINE_NAME
    return net


@dataclass(frozen=True)
class _Participant:
    user_id: str
    requestor: bool
    role: Code | None
    network: tuple[str, str] | None
    role_text: str | None = None


def participants(event: AuditEvent, ctx: ExportContext) -> list[_Participant]:
    """Active participants: the actor, this service, and the destination when data went out."""
    coding = coding_for(event.event)
    service_is_actor = event.actor == ctx.source_id
    out: list[_Participant] = []
    if not service_is_actor:
        role = coding.peer_role if (coding.peer_role and not coding.peer_is_destination) else None
        network = None if coding.client_from_source else _dicom_network(event.source)
        out.append(_Participant(event.actor, True, role, network, event.actor_role))
    if coding.client_from_source and event.source:
        # DICOM Query / BALP: the requesting process is the Source, the responder the Destination
        out.append(_Participant(event.source, service_is_actor, ROLE_SOURCE, _dicom_network(event.source)))
    service_role = coding.service_role or ROLE_APPLICATION
    out.append(_Participant(ctx.source_id, service_is_actor, service_role, (ctx.hostname, NETWORK_MACHINE_NAME)))
    if event.destination and coding.peer_is_destination:
        out.append(_Participant(event.destination, False, ROLE_DESTINATION, _dicom_network(event.destination)))
    return out


# --- FHIR --------------------------------------------------------------------------------------

def _coding(code: Code) -> Coding:
    return Coding(system=DCM_SYSTEM if code.scheme == "DCM" else None, code=code.code, display=code.meaning)


def _profile(event: AuditEvent) -> tuple[str | None, Coding, list[Coding]]:
    """(BALP profile, type, subtypes) for an event."""
    coding = coding_for(event.event)
    dcm_type = _coding(coding.event_id)
    dcm_sub = [_coding(coding.event_type)] if coding.event_type else []
    with_patient = bool(event.patient_id)
    if event.event is EventType.API_ACCESS and event.action == "R":
        return ((PROFILE_PATIENT_READ if with_patient else PROFILE_READ),
                Coding(system=AUDIT_EVENT_TYPE, code="rest", display="Restful Operation"),
                [Coding(system=RESTFUL_INTERACTION, code="read", display="read"), dcm_type])
    if event.event is EventType.AUDIT_QUERY or (event.event is EventType.API_ACCESS and event.action == "E"):
        return ((PROFILE_PATIENT_QUERY if with_patient else PROFILE_QUERY),
                Coding(system=AUDIT_EVENT_TYPE, code="rest", display="Restful Operation"),
                [Coding(system=RESTFUL_INTERACTION, code="search-type", display="search type"), dcm_type])
    if event.event in (EventType.FORWARDED, EventType.FHIR_DELIVERY, EventType.AUDIT_EXPORT) and with_patient:
        return (PROFILE_DISCLOSURE, _coding(DCM_EXPORT),
                [Coding(system=LIFECYCLE, code="disclose", display="Disclose Record Lifecycle Event"), dcm_type])
    return None, dcm_type, dcm_sub


def _purpose(purpose: str | None) -> list[CodeableConcept] | None:
    if not purpose:
        return None
    if purpose.isalpha() and purpose.isupper():   # looks like a v3 ActReason code (TREAT, HOPERAT ...)
        return [CodeableConcept(coding=[Coding(system=ACT_REASON, code=purpose)], text=purpose)]
    return [CodeableConcept(text=purpose)]


def _outcome_desc(event: AuditEvent) -> str | None:
    for key in ("reason", "error", "status"):
        if event.detail.get(key) is not None:
            return str(event.detail[key])
    return None


def to_fhir(record: AuditRecord, ctx: ExportContext) -> FhirAuditEvent:
    """One event record as an R4 AuditEvent resource."""
    event = record.event
    if event is None:
        raise AuditConfigError(f"record {record.seq} is not a decrypted event")
    profile, type_, subtypes = _profile(event)
    observer = Reference(identifier=Identifier(value=ctx.source_id), display=ctx.source_id)
    agents = []
    for p in participants(event, ctx):
        who = observer if p.user_id == ctx.source_id else Reference(identifier=Identifier(value=p.user_id),
                                                                    display=p.user_id)
        types = [CodeableConcept(coding=[_coding(p.role)])] if p.role else None
        if p.requestor and p.user_id != ctx.source_id and profile in (PROFILE_READ, PROFILE_PATIENT_READ,
                                                                      PROFILE_QUERY, PROFILE_PATIENT_QUERY):
            types = [CodeableConcept(coding=[Coding(system=PARTICIPATION_TYPE, code="IRCP",
                                                    display="information recipient")])]
        agents.append(AuditEventAgent(
            type=types[0] if types else None,
            role=[CodeableConcept(text=p.role_text)] if p.role_text else None,
            who=who, requestor=p.requestor,
            network=AuditEventAgentNetwork(address=p.network[0], type=p.network[1]) if p.network else None,
            purposeOfUse=_purpose(event.purpose) if p.requestor else None))
    entities = []
    if event.patient_id:
        entities.append(AuditEventEntity(
            what=Reference(identifier=Identifier(value=event.patient_id), type="Patient"),
            type=Coding(system=ENTITY_TYPE, code=ENTITY_PERSON, display="Person"),
            role=Coding(system=OBJECT_ROLE, code=ROLE_PATIENT, display="Patient")))
    if event.study_uid:
        details = [AuditEventEntityDetail(type="SOPInstanceUID", valueString=uid) for uid in event.sop_instance_uids]
        entities.append(AuditEventEntity(
            what=Reference(identifier=Identifier(
                system=DICOM_UID_SYSTEM, value=f"urn:oid:{event.study_uid}",
                type=CodeableConcept(coding=[_coding(STUDY_INSTANCE_UID)]))),
            type=Coding(system=ENTITY_TYPE, code=ENTITY_SYSTEM_OBJECT, display="System Object"),
            role=Coding(system=OBJECT_ROLE, code=ROLE_REPORT, display="Report"),
            detail=details or None))
    if profile in (PROFILE_QUERY, PROFILE_PATIENT_QUERY):
        query = {k: v for k, v in event.detail.items() if k not in ("matched", "error")}
        entities.append(AuditEventEntity(
            type=Coding(system=ENTITY_TYPE, code=ENTITY_SYSTEM_OBJECT, display="System Object"),
            role=Coding(system=OBJECT_ROLE, code=ROLE_QUERY, display="Query"),
            query=base64.b64encode(json.dumps(query, sort_keys=True, default=str).encode())))
    resource_id = f"{ctx.log_id}-{record.seq}" if ctx.log_id else f"dermgate-audit-{record.seq}"
    return FhirAuditEvent(
        id=resource_id[:64],
        meta=Meta(profile=[profile]) if profile else None,
        type=type_, subtype=subtypes or None,
        action="R" if profile == PROFILE_DISCLOSURE else event.action,   # BALP: a disclosure is a read
        recorded=record.event_time, outcome=event.outcome.value, outcomeDesc=_outcome_desc(event),
        purposeOfEvent=_purpose(event.purpose),
        agent=agents,
        source=AuditEventSource(observer=observer, site=ctx.site,
                                type=[Coding(system=SOURCE_TYPE, code=AUDIT_SOURCE_APPLICATION_SERVER.code,
                                             display="Application Server")]),
        entity=entities or None)


def fhir_bundle(records: Iterable[AuditRecord], ctx: ExportContext) -> Bundle:
    """A ``collection`` Bundle of AuditEvents (what an Audit Record Repository can ingest)."""
    resources = [to_fhir(r, ctx) for r in records]
    return Bundle(type="collection", entry=[BundleEntry(fullUrl=f"urn:uuid:audit-{r.id}", resource=r)
                                            for r in resources] or None)


# --- DICOM PS3.15 A.5 ------------------------------------------------------------------------------

def _coded(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": code.code, "codeSystemName": code.scheme,
                                       "originalText": code.meaning})


def to_dicom_element(event: AuditEvent, ctx: ExportContext) -> ET.Element:
    coding = coding_for(event.event)
    when = event.time or datetime.now().astimezone()
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": event.action, "EventDateTime": format_time(when),
        "EventOutcomeIndicator": event.outcome.value})
    _coded(ident, "EventID", coding.event_id)
    if coding.event_type:
        _coded(ident, "EventTypeCode", coding.event_type)
    desc = _outcome_desc(event)
    if desc:
        ET.SubElement(ident, "EventOutcomeDescription").text = desc
    if event.purpose:
        ET.SubElement(ident, "PurposeOfUse", {"csd-code": event.purpose, "codeSystemName": ACT_REASON_OID,
                                              "originalText": event.purpose})
    for p in participants(event, ctx):
        attrs = {"UserID": p.user_id, "UserIsRequestor": "true" if p.requestor else "false"}
        if p.network:
            attrs["NetworkAccessPointID"], attrs["NetworkAccessPointTypeCode"] = p.network
        participant = ET.SubElement(root, "ActiveParticipant", attrs)
        if p.role:
            _coded(participant, "RoleIDCode", p.role)
    source_attrs = {"AuditSourceID": ctx.source_id}
    if ctx.site:
        source_attrs["AuditEnterpriseSiteID"] = ctx.site
    source = ET.SubElement(root, "AuditSourceIdentification", source_attrs)
    _coded(source, "AuditSourceTypeCode", AUDIT_SOURCE_APPLICATION_SERVER)
    if event.patient_id:
        patient = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": event.patient_id, "ParticipantObjectTypeCode": ENTITY_PERSON,
            "ParticipantObjectTypeCodeRole": ROLE_PATIENT})
        _coded(patient, "ParticipantObjectIDTypeCode", PATIENT_NUMBER)
    if event.study_uid:
        study = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": event.study_uid, "ParticipantObjectTypeCode": ENTITY_SYSTEM_OBJECT,
            "ParticipantObjectTypeCodeRole": ROLE_REPORT})
        _coded(study, "ParticipantObjectIDTypeCode", STUDY_INSTANCE_UID)
        sop_class = event.detail.get("sop_class_uid")
        if sop_class and event.sop_instance_uids:
            description = ET.SubElement(study, "ParticipantObjectDescription")   # DICOMObjectDescriptionContents
            sop = ET.SubElement(description, "SOPClass", {"UID": str(sop_class),
                                                   "NumberOfInstances": str(len(event.sop_instance_uids))})
            for uid in event.sop_instance_uids:
                ET.SubElement(sop, "Instance", {"UID": uid})
    return root


def to_dicom_xml(event: AuditEvent, ctx: ExportContext) -> str:
    """One DICOM audit message as an XML document (UTF-8 declared)."""
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(to_dicom_element(event, ctx), encoding="unicode")


def dicom_messages_document(records: Iterable[AuditRecord], ctx: ExportContext) -> str:
    """Several messages in one well-formed file: ``<AuditMessages>`` around the ``AuditMessage`` elements."""
    root = ET.Element("AuditMessages", {"source": ctx.source_id})
    for record in records:
        assert record.event is not None
        root.append(ET.Comment(f" audit record {record.seq} "))   # keeps each message schema-clean
        root.append(to_dicom_element(record.event, ctx))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


# --- CSV ---------------------------------------------------------------------------------------------

CSV_COLUMNS = ("seq", "recorded", "event_time", "event", "dcm_event_id", "action", "outcome", "actor", "actor_role",
               "source", "destination", "patient_id", "study_uid", "sop_instance_count", "purpose", "key_id", "detail")
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    # spreadsheet formula injection: a value from a peer must never run as a formula when opened
    return "'" + text if text.startswith(_FORMULA_PREFIXES) else text


def csv_row(record: AuditRecord) -> list[str]:
    event = record.event
    assert event is not None
    values = (record.seq, format_time(record.time), format_time(record.event_time), event.event.value,
              coding_for(event.event).event_id.code, event.action, OUTCOME_TEXT[event.outcome], event.actor,
              event.actor_role, event.source, event.destination, event.patient_id, event.study_uid,
              len(event.sop_instance_uids), event.purpose, record.key_id,
              json.dumps(event.detail, sort_keys=True, default=str) if event.detail else "")
    return [_cell(v) for v in values]


def write_csv(records: Iterable[AuditRecord], out: TextIO) -> int:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    count = 0
    for record in records:
        writer.writerow(csv_row(record))
        count += 1
    return count


# --- audited export ------------------------------------------------------------------------------------

def render(records: Sequence[AuditRecord], fmt: ExportFormat, ctx: ExportContext) -> str:
    if fmt is ExportFormat.FHIR:
        return fhir_bundle(records, ctx).model_dump_json(indent=2, exclude_none=True) + "\n"
    if fmt is ExportFormat.DICOM:
        return dicom_messages_document(records, ctx)
    buf = io.StringIO()
    write_csv(records, buf)
    return buf.getvalue()


def export(trail: AuditTrail, fmt: ExportFormat | str, query: AuditQuery, *, requested_by: str,
           destination: str | None = None, role: str | None = None, purpose: str | None = None,
           ctx: ExportContext | None = None) -> str:
    """Render matching records; the export is audited (naming every patient in it) before it is returned."""
    fmt = ExportFormat(fmt)
    ctx = ctx or ExportContext(log_id=trail.log_id)
    records = list(find(trail, query))
    text = render(records, fmt, ctx)
    patients = sorted({p for r in records if r.event for p in patients_of(r.event)})
    trail.record(AuditEvent(
        event=EventType.AUDIT_EXPORT, outcome=Outcome.SUCCESS, actor=requested_by, action="R", actor_role=role,
        destination=destination, purpose=purpose,
        patient_id=patients[0] if len(patients) == 1 else None,
        detail={**query.describe(), "format": fmt.value, "records": len(records), "patients": patients,
                **({"patient_filter": query.patient_id} if query.patient_id else {})}))
    return text


# --- accounting of disclosures -------------------------------------------------------------------------

@dataclass(frozen=True)
class Disclosure:
    """One time a patient's data left the service."""
    seq: int
    time: datetime
    event: EventType
    recipient: str          # where it went: AE@host:port, URL, user, export destination
    by: str                 # who or what sent it
    purpose: str | None
    what: str               # study / instance count / record count
    outcome: Outcome


def _disclosure(record: AuditRecord) -> Disclosure:
    event = record.event
    assert event is not None
    if event.event is EventType.API_ACCESS:
        recipient = event.actor + (f" ({event.actor_role})" if event.actor_role else "")
    elif event.event is EventType.AUDIT_EXPORT:
        recipient = f"{event.destination or 'export'} (for {event.actor})"
    else:
        recipient = event.destination or "unknown"
    parts = []
    if event.study_uid:
        parts.append(f"study {event.study_uid}")
    if event.sop_instance_uids:
        parts.append(f"{len(event.sop_instance_uids)} instance(s)")
    if event.event is EventType.AUDIT_EXPORT:
        parts.append(f"audit records ({event.detail.get('format', '?')})")
    if event.detail.get("resource"):
        parts.append(str(event.detail["resource"]))
    return Disclosure(seq=record.seq, time=record.event_time, event=event.event, recipient=recipient,
                      by=event.actor, purpose=event.purpose, what=", ".join(parts) or event.event.value,
                      outcome=event.outcome)


def disclosures(trail: AuditTrail, patient_id: str, *, requested_by: str, include_failed: bool = False,
                since: datetime | None = None, until: datetime | None = None,
                role: str | None = None, purpose: str | None = None) -> list[Disclosure]:
    """Every time ``patient_id``'s data left the service (success only unless ``include_failed``); audited."""
    query = AuditQuery(patient_id=patient_id, event_types=tuple(sorted(DISCLOSURE_EVENTS, key=lambda e: e.value)),
                       since=since, until=until)
    found = []
    for record in find(trail, query):
        assert record.event is not None
        if record.event.event is EventType.API_ACCESS and record.event.action not in ("R", "E"):
            continue
        if include_failed or record.event.outcome is Outcome.SUCCESS:
            found.append(_disclosure(record))
    trail.record(AuditEvent(event=EventType.AUDIT_QUERY, outcome=Outcome.SUCCESS, actor=requested_by,
                            actor_role=role, purpose=purpose, patient_id=patient_id,
                            detail={"report": "accounting of disclosures", "matched": len(found),
                                    "include_failed": include_failed}))
    return found


DISCLOSURE_HEADERS = ("SEQ", "TIME (UTC)", "EVENT", "RECIPIENT", "BY", "PURPOSE", "WHAT", "OUTCOME")


def disclosures_table(items: Iterable[Disclosure]) -> str:
    rows = [(str(d.seq), d.time.strftime("%Y-%m-%d %H:%M:%S"), d.event.value, d.recipient, d.by, d.purpose or "",
             d.what, OUTCOME_TEXT[d.outcome]) for d in items]
    return format_table(rows, DISCLOSURE_HEADERS)


def disclosures_csv(items: Iterable[Disclosure], out: TextIO) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([h.lower().replace(" (utc)", "") for h in DISCLOSURE_HEADERS])
    for d in items:
        writer.writerow([_cell(v) for v in (d.seq, format_time(d.time), d.event.value, d.recipient, d.by,
                                            d.purpose or "", d.what, OUTCOME_TEXT[d.outcome])])
