"""Delivery channels: one table, one entry per kind of channel.

A *planner* turns a result into an outbox payload (stored in the transaction
that records the result); a *channel* delivers a payload. Every kind of channel
is one :class:`ChannelSpec` in :data:`CHANNELS`, which says everything the rest
of the service needs to know about it:

    kind            prefix of its outbox channel names ("dicom:pacs", "fhir", "hl7v2")
    section         the settings section that switches it on
    wire            settings -> (name, channel factory, planner) for each destination
    reviews         whether clinician reviews are sent through it (planner.plan_review)
    audit_event     the audit event its deliveries record, and its DICOM event id
                    (110104 DICOM Instances Transferred or 110106 Export)
    disclosure      whether its deliveries count in the accounting of disclosures

The audit package stands alone (it imports nothing of the service), so its tables
list each delivery event; :func:`check_audit_codes` runs at import and refuses a
channel whose audit event, DICOM event id or disclosure class the audit tables do
not carry, so a new channel cannot be forgotten in the audit codes or the
disclosure accounting. The pipeline knows neither DICOM networking nor HTTP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from audit.api import AuditSink, EventType
from dermgate.records import Channel, ImageRef, Outputs
from dermgate.store import ObjectStore
from inference.result import Prediction

if TYPE_CHECKING:
    from dermgate.settings import Settings


class Runtime(Protocol):
    """What wiring a channel needs of the running service (``dermgate.app.Runtime`` has it)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def audit(self) -> AuditSink: ...

    @property
    def classifier(self) -> Any: ...

    @property
    def store(self) -> ObjectStore: ...

INSTANCES_TRANSFERRED = "110104"     # DCM: DICOM Instances Transferred
EXPORT = "110106"                    # DCM: Export


@dataclass(frozen=True)
class Wired:
    """One configured destination of a channel kind."""
    name: str                                  # the outbox channel name
    make_channel: Callable[[], Channel]        # built only by processes that deliver
    planner: Any                               # Planner; with plan_review when its spec reviews


@dataclass(frozen=True)
class ChannelSpec:
    kind: str
    section: str
    wire: Callable[[Runtime], list[Wired]]
    reviews: bool
    audit_event: EventType
    audit_event_id: str
    disclosure: bool
    description: str


# ---- DICOM forward -------------------------------------------------------------------------------

@dataclass
class DicomForwardPlanner:
    """Forward the SC and the SR to one PACS destination."""
    channel: str

    def plan(self, image: ImageRef, prediction: Prediction, outputs: Outputs,
             store: ObjectStore) -> dict[str, Any] | None:
        return {"files": [outputs.sc_path, outputs.sr_path], "study_instance_uid": image.study_instance_uid}


def _wire_dicom(rt: Runtime) -> list[Wired]:
    s = rt.settings
    out = []
    for d in s.dicom.destinations:
        def make(d: Any = d) -> Channel:
            from integration.dicom_scp.forward import DicomForwardChannel, client_tls_context
            tls = None
            if d.tls:
                t = s.dicom.tls
                if t.ca_file is None:
                    raise ValueError(f"destination {d.name} uses TLS: set dicom.tls.ca_file to verify the PACS")
                tls = client_tls_context(t.ca_file, t.cert_file, t.key_file)
            return DicomForwardChannel(d.name, d.ae_title, d.host, d.port, calling_ae_title=s.dicom.ae_title,
                                       tls=tls, base_dir=s.store_dir, audit=rt.audit, files=rt.store)
        out.append(Wired(f"dicom:{d.name}", make, DicomForwardPlanner(f"dicom:{d.name}")))
    return out


# ---- FHIR ---------------------------------------------------------------------------------------

FHIR_CHANNEL = "fhir"
FHIR_FILE_CHANNEL = "fhir-file"


def _thresholds(rt: Runtime) -> Callable[[], Any]:
    """The model's risk cut-offs, read from the classifier the worker has loaded anyway."""
    def read() -> Any:
        from integration.fhir.resources import Thresholds
        try:
            cal = rt.classifier.calibration
            return Thresholds(referral=float(cal.referral_threshold), high=float(cal.high_risk_threshold))
        except Exception:  # noqa: BLE001 - no model here: the report goes without the thresholds
            return None
    return read


@dataclass
class FhirPlanner:
    """The FHIR report (and later review updates) for one image, prepared in the worker."""
    channel: str
    settings: Any   # FhirSettings
    thresholds: Callable[[], Any] | None = None

    def plan(self, image: ImageRef, prediction: Prediction, outputs: Outputs,
             store: ObjectStore) -> dict[str, Any] | None:
        from dermgate.db import utcnow
        from integration.fhir.channel import prepare_report_payload
        return prepare_report_payload(image, prediction, store.read(outputs.cam_png_path), self.settings,
                                      issued=utcnow(), notes=[outputs.note] if outputs.note else [],
                                      thresholds=self.thresholds() if self.thresholds else None)

    def plan_review(self, image: ImageRef, review: Any) -> dict[str, Any]:
        from integration.fhir.channel import prepare_review_payload
        from integration.fhir.resources import Review, ReviewDecision
        r = Review(review_id=str(review.id), decision=ReviewDecision(review.decision), reviewer=review.reviewer,
                   reviewed_at=review.created_at, diagnosis=review.diagnosis, comment=review.comment,
                   reviewer_reference=getattr(review, "reviewer_reference", None))
        return prepare_review_payload(image, r, self.settings)


class BundleDirectoryChannel:
    """Writes each FHIR payload's bundle as JSON under a folder: the demo's stand-in for an EHR
    when no FHIR server is given. Idempotent: one file per business key, rewritten atomically.
    The folder is an :class:`ObjectStore` of its own, encrypted like the object store when it is."""
    name = FHIR_FILE_CHANNEL

    def __init__(self, folder: Any, cipher: Any = None) -> None:
        self.folder = folder
        self.files = ObjectStore(folder, cipher)

    def deliver(self, payload: dict[str, Any]) -> Any:
        import json

        from dermgate.records import DeliveryOutcome
        key = payload["business_key"].replace(":", "_")
        if self.files.encrypted:                  # the name would show the SOP Instance UID
            import hashlib
            key = hashlib.sha256(key.encode()).hexdigest()[:32]
        doc = payload.get("bundle") or payload
        self.files.put(f"{key}.json", json.dumps(doc, indent=1).encode())
        return DeliveryOutcome(ok=True, remote_ref=f"file:{key}.json")


def _fhir_settings(rt: Runtime) -> Any:
    from integration.fhir.settings import FhirSettings
    return rt.settings.fhir or FhirSettings()


def _wire_fhir(rt: Runtime) -> list[Wired]:
    fhir = rt.settings.fhir
    if fhir is None or not fhir.base_url:
        return []

    def make() -> Channel:
        from integration.fhir.channel import FhirChannel
        return FhirChannel.from_settings(fhir, rt.audit)
    return [Wired(FHIR_CHANNEL, make, FhirPlanner(FHIR_CHANNEL, fhir, _thresholds(rt)))]


def _wire_fhir_file(rt: Runtime) -> list[Wired]:
    folder = rt.settings.fhir_bundle_dir
    if folder is None:
        return []
    return [Wired(FHIR_FILE_CHANNEL, lambda: BundleDirectoryChannel(folder, rt.store.cipher),
                  FhirPlanner(FHIR_FILE_CHANNEL, _fhir_settings(rt), _thresholds(rt)))]


# ---- HL7 v2 -------------------------------------------------------------------------------------

HL7_CHANNEL = "hl7v2"


def _wire_hl7(rt: Runtime) -> list[Wired]:
    hl7 = rt.settings.hl7
    if hl7 is None or not hl7.host:
        return []
    from integration.hl7v2.channel import Hl7Planner

    def make() -> Channel:
        from integration.hl7v2.channel import MllpChannel
        return MllpChannel(hl7, rt.audit)
    return [Wired(HL7_CHANNEL, make, Hl7Planner(HL7_CHANNEL, hl7, rt.settings.fhir, _thresholds(rt)))]


# ---- the table ----------------------------------------------------------------------------------

CHANNELS: tuple[ChannelSpec, ...] = (
    ChannelSpec("dicom", "dicom.destinations", _wire_dicom, reviews=False, audit_event=EventType.FORWARDED,
                audit_event_id=INSTANCES_TRANSFERRED, disclosure=True,
                description="C-STORE of the Grad-CAM SC and the AI-result SR to a PACS"),
    ChannelSpec(FHIR_CHANNEL, "fhir", _wire_fhir, reviews=True, audit_event=EventType.FHIR_DELIVERY,
                audit_event_id=EXPORT, disclosure=True,
                description="FHIR R4 report to the EHR (profile generic-r4, epic or oracle-health)"),
    ChannelSpec(FHIR_FILE_CHANNEL, "fhir_bundle_dir", _wire_fhir_file, reviews=True,
                audit_event=EventType.FHIR_DELIVERY, audit_event_id=EXPORT, disclosure=False,
                description="the FHIR bundles as files in a local folder (demo without an EHR)"),
    ChannelSpec(HL7_CHANNEL, "hl7", _wire_hl7, reviews=False, audit_event=EventType.HL7_DELIVERY,
                audit_event_id=EXPORT, disclosure=True,
                description="HL7 v2.5.1 ORU^R01 over MLLP to the interface engine"),
)


def spec_for(channel_name: str) -> ChannelSpec:
    """The spec of an outbox channel name ("dicom:pacs" -> the dicom spec)."""
    kind = channel_name.split(":", 1)[0]
    for spec in CHANNELS:
        if spec.kind == kind:
            return spec
    raise KeyError(f"no channel kind {kind!r}")


def wiring(rt: Runtime) -> list[tuple[ChannelSpec, Wired]]:
    return [(spec, wired) for spec in CHANNELS for wired in spec.wire(rt)]


def build_channels(rt: Runtime) -> dict[str, Channel]:
    return {wired.name: wired.make_channel() for _, wired in wiring(rt)}


def build_planners(rt: Runtime) -> list[Any]:
    return [wired.planner for _, wired in wiring(rt)]


def review_planners(rt: Any) -> list[Any]:
    """The planners that send clinician reviews (their specs say ``reviews``)."""
    return [p for p in rt.planners if spec_for(p.channel).reviews]


def delivery_audit_codes() -> dict[EventType, str]:
    """Audit event -> DCM event id, for every channel kind (read by audit/codes.py)."""
    return {spec.audit_event: spec.audit_event_id for spec in CHANNELS}


def disclosure_events() -> frozenset[EventType]:
    """The channels' audit events that disclose patient data."""
    return frozenset(spec.audit_event for spec in CHANNELS if spec.disclosure)


def check_audit_codes() -> None:
    """Refuse a channel the audit tables do not know: its event coded with its DICOM event id,
    and in the accounting of disclosures exactly when its spec says it discloses."""
    from audit.codes import DISCLOSURE_EVENTS, EVENT_CODES
    for spec in CHANNELS:
        coding = EVENT_CODES.get(spec.audit_event)
        if coding is None or coding.event_id.code != spec.audit_event_id:
            raise RuntimeError(f"channel {spec.kind!r}: audit/codes.py must code {spec.audit_event.value} "
                               f"as DCM {spec.audit_event_id}")
    # an event discloses when any channel recording it does (the bundle folder shares the FHIR event)
    for event in {spec.audit_event for spec in CHANNELS}:
        if (event in DISCLOSURE_EVENTS) != (event in disclosure_events()):
            raise RuntimeError(f"audit/codes.py DISCLOSURE_EVENTS disagrees with the channel table on {event.value}")


check_audit_codes()


# ---- FHIR helpers for the API ---------------------------------------------------------------------

def public_jwks(s: Settings) -> dict[str, Any] | None:
    """The JWK Set of our SMART client key (public parts only), served for the EHR; None where this
    process has no key (SCP pods do not get the FHIR key: only the dispatcher's pods do)."""
    fhir = s.fhir
    if fhir is None or fhir.private_key_file is None:
        return {"keys": []}
    if not fhir.private_key_file.exists():
        return None
    from integration.fhir.auth import jwks, load_private_key
    return jwks([load_private_key(fhir.private_key_file, fhir.alg)])


def fhir_token_ready(s: Settings, channels: dict[str, Channel]) -> bool:
    """Readiness of a dispatcher: does it hold an access token for the EHR? The cached token
    counts (no request); only when there is none is one fetched, and then cached for deliveries."""
    from integration.fhir.auth import SmartBackendAuth
    ch = channels.get(FHIR_CHANNEL)
    auth = getattr(getattr(getattr(ch, "client", None), "http", None), "auth", None)
    if s.fhir is None or not isinstance(auth, SmartBackendAuth):
        return True
    if auth.has_token():
        return True
    from integration.fhir.client import build_http_client
    with build_http_client(s.fhir) as http:
        auth.fetch_token(http)
    return True
