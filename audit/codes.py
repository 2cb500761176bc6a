"""DICOM PS3.15 A.5 / PS3.16 DCM codes for each application event type.

EventID from CID 400 (Audit Event ID), EventTypeCode from CID 401/402, roles
from CID 402 (Audit Active Participant Role ID), object id types from CID 404
and RFC 3881. The same codes feed the DICOM XML and the FHIR AuditEvent export
(FHIR uses the DCM codes for ``type``/``subtype``).
"""

from __future__ import annotations

from dataclasses import dataclass

from audit.api import EventType, Outcome

DCM = "DCM"                                            # coding scheme designator in DICOM XML
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
RFC3881 = "RFC-3881"


@dataclass(frozen=True)
class Code:
    code: str
    scheme: str
    meaning: str


# CID 400 Audit Event ID
APPLICATION_ACTIVITY = Code("110100", DCM, "Application Activity")
INSTANCES_TRANSFERRED = Code("110104", DCM, "DICOM Instances Transferred")
EXPORT = Code("110106", DCM, "Export")
PATIENT_RECORD = Code("110110", DCM, "Patient Record")
QUERY = Code("110112", DCM, "Query")
SECURITY_ALERT = Code("110113", DCM, "Security Alert")
USER_AUTHENTICATION = Code("110114", DCM, "User Authentication")

# CID 401 Audit Event Type Code / CID 402 Security Alert type codes
APPLICATION_START = Code("110120", DCM, "Application Start")
APPLICATION_STOP = Code("110121", DCM, "Application Stop")
LOGIN = Code("110122", DCM, "Login")
LOGOUT = Code("110123", DCM, "Logout")
NETWORK_CONFIGURATION = Code("110128", DCM, "Network Configuration")
SECURITY_CONFIGURATION = Code("110129", DCM, "Security Configuration")
SOFTWARE_CONFIGURATION = Code("110131", DCM, "Software Configuration")
USE_OF_RESTRICTED_FUNCTION = Code("110132", DCM, "Use of Restricted Function")
USER_SECURITY_ATTRIBUTES_CHANGED = Code("110137", DCM, "User Security Attributes Changed")

# CID 402 Audit Active Participant Role ID
ROLE_APPLICATION = Code("110150", DCM, "Application")
ROLE_DESTINATION = Code("110152", DCM, "Destination Role ID")
ROLE_SOURCE = Code("110153", DCM, "Source Role ID")

# Participant object id types (CID 404 / RFC 3881)
PATIENT_NUMBER = Code("2", RFC3881, "Patient Number")
STUDY_INSTANCE_UID = Code("110180", DCM, "Study Instance UID")
SOP_CLASS_UID = Code("110181", DCM, "SOP Class UID")

# AuditSourceTypeCode (RFC 3881 5.4): 4 = application server process tier
AUDIT_SOURCE_APPLICATION_SERVER = Code("4", DCM, "Application Server Process")

OUTCOME_TEXT = {
    Outcome.SUCCESS: "Success",
    Outcome.MINOR_FAILURE: "Minor failure",
    Outcome.SERIOUS_FAILURE: "Serious failure",
    Outcome.MAJOR_FAILURE: "Major failure",
}


@dataclass(frozen=True)
class EventCoding:
    event_id: Code
    event_type: Code | None
    # which active participant is the data source / destination, for transfers
    service_role: Code | None = None          # role of dermgate itself
    peer_role: Code | None = None             # role of the actor or destination
    peer_is_destination: bool = False         # the peer is ``destination`` rather than ``actor``
    client_from_source: bool = False          # requests: ``source`` is the client process (Source Role ID)


EVENT_CODES: dict[EventType, EventCoding] = {
    EventType.APP_START: EventCoding(APPLICATION_ACTIVITY, APPLICATION_START),
    EventType.APP_STOP: EventCoding(APPLICATION_ACTIVITY, APPLICATION_STOP),
    EventType.ASSOCIATION: EventCoding(USER_AUTHENTICATION, LOGIN),
    EventType.ECHO: EventCoding(APPLICATION_ACTIVITY, None),
    EventType.STORE_RECEIVED: EventCoding(INSTANCES_TRANSFERRED, None, ROLE_DESTINATION, ROLE_SOURCE),
    EventType.CLASSIFIED: EventCoding(PATIENT_RECORD, None),
    EventType.REVIEW: EventCoding(PATIENT_RECORD, None),
    EventType.API_ACCESS: EventCoding(PATIENT_RECORD, None, ROLE_DESTINATION, client_from_source=True),
    EventType.AUDIT_QUERY: EventCoding(QUERY, None, ROLE_DESTINATION, client_from_source=True),
    EventType.AUDIT_EXPORT: EventCoding(EXPORT, None, ROLE_SOURCE, ROLE_DESTINATION, True),
    EventType.CONFIG_CHANGE: EventCoding(SECURITY_ALERT, SOFTWARE_CONFIGURATION),
    EventType.KEY_CHANGE: EventCoding(SECURITY_ALERT, SECURITY_CONFIGURATION),
    EventType.AUTH_FAILURE: EventCoding(USER_AUTHENTICATION, LOGIN),
    EventType.JOB_ADMIN: EventCoding(SECURITY_ALERT, USE_OF_RESTRICTED_FUNCTION),
    EventType.OUTCOME: EventCoding(PATIENT_RECORD, None),
    EventType.MODEL_RECALL: EventCoding(SECURITY_ALERT, USE_OF_RESTRICTED_FUNCTION),
    EventType.LOGIN: EventCoding(USER_AUTHENTICATION, LOGIN),
    EventType.LOGOUT: EventCoding(USER_AUTHENTICATION, LOGOUT),
    EventType.USER_ADMIN: EventCoding(SECURITY_ALERT, USER_SECURITY_ATTRIBUTES_CHANGED),
}


# The delivery channels' events (dermgate/channels.py's table refuses to start with a channel
# these do not cover): dermgate is the source, the channel's peer the destination.
EVENT_CODES.update({
    EventType.FORWARDED: EventCoding(INSTANCES_TRANSFERRED, None, ROLE_SOURCE, ROLE_DESTINATION, True),
    EventType.FHIR_DELIVERY: EventCoding(EXPORT, None, ROLE_SOURCE, ROLE_DESTINATION, True),
    EventType.HL7_DELIVERY: EventCoding(EXPORT, None, ROLE_SOURCE, ROLE_DESTINATION, True),
})

# Events that send a patient's data out of the service (accounting of disclosures): the
# delivery channels that disclose, the audit export and API reads.
DISCLOSURE_EVENTS = frozenset({EventType.AUDIT_EXPORT, EventType.API_ACCESS, EventType.FORWARDED,
                               EventType.FHIR_DELIVERY, EventType.HL7_DELIVERY})


def coding_for(event: EventType) -> EventCoding:
    return EVENT_CODES.get(event, EventCoding(APPLICATION_ACTIVITY, None))
