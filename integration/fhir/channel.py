"""The FHIR delivery channel: outbox payloads in, EHR reports out, every attempt audited.

``prepare`` runs in the pipeline, inside the transaction that records the
result: it builds the whole transaction Bundle (PDF included) with a
placeholder subject, so the stored payload is exactly what will be sent.
``deliver`` runs in the outbox dispatcher, as often as it takes: it finds the
patient (at delivery time: the EHR may learn of the patient later), links the
EHR's ImagingStudy, Encounter and ServiceRequest when it has them, and sends.
Conditional creates (generic-r4) or searches by patient before each create (the
vendor profiles, as Epic and Millennium document their searches) on
SOP-Instance-derived identifiers make repeated deliveries harmless.

Outcome mapping (the dispatcher computes back-off from it):
    2xx                                   ok, remote_ref = the report
    429 / 503 + Retry-After               retryable, retry_after_s honoured
    5xx, timeouts, connection errors      retryable
    token endpoint down / token refused   retryable (site-wide, not this message's fault)
    409 / 412 (version conflict)          retryable (re-read next time)
    4xx with OperationOutcome             dead letter (retryable=False) with the issues as reason
    patient not found / ambiguous         per policy: dead letter, or retry
    review of a withdrawn report          dead letter (ReportWithdrawn: entered-in-error / cancelled)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import httpx
import structlog

from audit.api import AuditEvent, AuditSink, EventType, Outcome
from dermgate.records import DeliveryOutcome, ImageRef
from inference.result import Prediction
from integration.fhir.auth import SmartBackendAuth
from integration.fhir.client import FhirClient, build_http_client, reference_from_location
from integration.fhir.errors import (
    FhirConfigError,
    FhirError,
    FhirRejected,
    PatientMatchError,
    PatientNotYetKnown,
    ReportNotYetDelivered,
)
from integration.fhir.pdf import render_report_pdf
from integration.fhir.profiles import Profile, ResultsMode, SearchStyle, Transport, get_profile
from integration.fhir.resources import (
    DICOM_UID,
    OBSERVATION_CATEGORY,
    PATIENT_PLACEHOLDER,
    WITHDRAWN,
    Review,
    Thresholds,
    add_placeholder_patient,
    build_observation_review_update,
    build_provenance,
    build_report_bundle,
    build_recall_update,
    build_review_update,
    check_not_withdrawn,
    link_encounter,
    link_imaging_study,
    link_orders,
    order_identifiers,
    replace_reference,
    recall_applied,
    review_applied,
    review_status,
)
from integration.fhir.settings import FhirSettings, MultipleMatchPolicy, NoMatchPolicy

log = structlog.get_logger(__name__)

CHANNEL_NAME = "fhir"
PAYLOAD_VERSION = 1
KIND_REPORT = "report"
KIND_REVIEW = "review"
KIND_RECALL = "recall"
ACTOR = "dermgate"
# Requests one delivery may make: token (and its renewal after a 401), Patient search, ImagingStudy
# search, then the transaction; sequential profiles create the Device and Observations one by one.
MAX_REQUESTS_PER_DELIVERY = 10


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def report_business_key(image: ImageRef) -> str:
    return f"{image.sop_instance_uid}:report"


def review_business_key(image: ImageRef, review: Review) -> str:
    return f"{image.sop_instance_uid}:review:{review.review_id}"


def effective_profile(settings: FhirSettings) -> Profile:
    profile = get_profile(settings.profile)
    return profile if settings.send_observations else replace(profile, results=ResultsMode.OMITTED)


def prepare_report_payload(image: ImageRef, prediction: Prediction, cam_png: bytes, settings: FhirSettings, *,
                           issued: datetime, pdf: bytes | None = None, notes: Sequence[str] = (),
                           thresholds: Thresholds | None = None) -> dict[str, Any]:
    """The outbox payload for one image's report (JSON-serialisable; holds PHI: the patient id).
    ``notes`` go into the conclusion and the PDF (e.g. only frame 1 of a multi-frame image classified)."""
    profile = effective_profile(settings)
    pdf = pdf if pdf is not None else render_report_pdf(image, prediction, cam_png, issued=issued, notes=notes,
                                                        thresholds=thresholds)
    bundle = build_report_bundle(image, prediction, cam_png, pdf, PATIENT_PLACEHOLDER, profile, settings,
                                 issued=issued, notes=notes, thresholds=thresholds)
    return {"kind": KIND_REPORT, "version": PAYLOAD_VERSION, "business_key": report_business_key(image),
            "profile": profile.name.value, "results": profile.results.value,
            "image": image.to_json(), "bundle": bundle}


def prepare_recall_payload(image: ImageRef, recall: dict[str, Any], settings: FhirSettings) -> dict[str, Any]:
    """The outbox payload that withdraws a recalled model's report (recall: id, version, reason, action)."""
    report = effective_profile(settings).report.value
    return {"kind": KIND_RECALL, "version": PAYLOAD_VERSION,
            "business_key": f"{image.sop_instance_uid}:recall:{recall['id']}", "profile": settings.profile.value,
            "report_type": report, "image": image.to_json(), "recall": recall}


def prepare_review_payload(image: ImageRef, review: Review, settings: FhirSettings) -> dict[str, Any]:
    """The outbox payload for a clinician's review (first sign-off -> final; later -> amended/corrected).
    The reviewer becomes a Practitioner reference when the site maps the user to one."""
    if review.reviewer_reference is None and review.reviewer in settings.practitioner_references:
        review = replace(review, reviewer_reference=settings.practitioner_references[review.reviewer])
    report = effective_profile(settings).report.value
    return {"kind": KIND_REVIEW, "version": PAYLOAD_VERSION, "business_key": review_business_key(image, review),
            "profile": settings.profile.value, "report_type": report,
            "image": image.to_json(), "review": review.to_json()}


class FhirChannel:
    """Channel protocol implementation (name ``fhir``); ``deliver`` is idempotent."""

    name = CHANNEL_NAME

    def __init__(self, settings: FhirSettings, client: FhirClient, audit: AuditSink, *,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.settings = settings
        self.client = client
        self.audit = audit
        self.clock = clock

    @classmethod
    def from_settings(cls, settings: FhirSettings, audit: AuditSink, *, transport: httpx.BaseTransport | None = None,
                      clock: Callable[[], datetime] = utcnow) -> FhirChannel:
        """Wires the httpx.Client (timeouts, TLS, SMART auth when configured) for ``settings``."""
        if settings.base_url is None:
            raise FhirConfigError("fhir.base_url is not set")
        auth = SmartBackendAuth.from_settings(settings) if settings.auth_enabled else None
        http = build_http_client(settings, auth=auth, transport=transport)
        client = FhirClient(http, token_url=str(settings.token_url) if settings.token_url else None)
        return cls(settings, client, audit, clock=clock)

    def close(self) -> None:
        self.client.close()

    @property
    def max_delivery_s(self) -> float:
        """The longest one ``deliver`` can take by the configured timeouts (each phase of each
        request at most once); the outbox derives its lease from this."""
        t = self.settings.timeouts
        return MAX_REQUESTS_PER_DELIVERY * (t.connect_s + t.write_s + t.read_s + t.pool_s)

    # ---- prepare (pipeline side) ---------------------------------------------------------------

    def prepare(self, image: ImageRef, prediction: Prediction, cam_png: bytes, *,
                pdf: bytes | None = None) -> dict[str, Any]:
        return prepare_report_payload(image, prediction, cam_png, self.settings, issued=self.clock(), pdf=pdf)

    def prepare_review(self, image: ImageRef, review: Review) -> dict[str, Any]:
        return prepare_review_payload(image, review, self.settings)

    # ---- deliver (outbox side) -----------------------------------------------------------------

    def deliver(self, payload: dict[str, Any]) -> DeliveryOutcome:
        started = time.monotonic()
        detail: dict[str, Any] = {"kind": payload.get("kind"), "profile": payload.get("profile")}
        try:
            if payload.get("kind") == KIND_REVIEW:
                ref = self._deliver_review(payload, detail)
            elif payload.get("kind") == KIND_REPORT:
                ref = self._deliver_report(payload, detail)
            elif payload.get("kind") == KIND_RECALL:
                ref = self._deliver_recall(payload, detail)
            else:
                raise FhirRejected(f"unknown payload kind {payload.get('kind')!r}")
            outcome = DeliveryOutcome(ok=True, remote_ref=ref)
        except FhirError as exc:
            # the EHR's OperationOutcome diagnostics may quote patient data: database and audit only
            outcome = DeliveryOutcome(ok=False, retryable=exc.retryable, retry_after_s=exc.retry_after_s,
                                      reason=f"{type(exc).__name__}: {exc.reason}",
                                      log_reason=type(exc).__name__ + (f" (HTTP {exc.status})" if exc.status else ""))
            detail["status"] = exc.status
        except Exception as exc:
            # A bug, not an EHR answer: audit the attempt, then let the dispatcher see it.
            self._audit(payload, DeliveryOutcome(ok=False, reason=f"internal error: {type(exc).__name__}"),
                        detail, started)
            raise
        self._audit(payload, outcome, detail, started)
        log.info("fhir_delivery", kind=detail["kind"], ok=outcome.ok, retryable=outcome.retryable,
                 status=detail.get("status"), remote_ref=outcome.remote_ref,
                 ms=round(1000 * (time.monotonic() - started), 1))
        return outcome

    def _deliver_report(self, payload: dict[str, Any], detail: dict[str, Any]) -> str:
        image = ImageRef.from_json(payload["image"])
        profile = get_profile(payload["profile"])
        bundle = payload["bundle"]
        bundle = self._with_subject(bundle, image, detail)
        patient_ref = _subject(bundle)
        study_ref = self._imaging_study(image, profile, patient_ref)
        detail["imaging_study_linked"] = study_ref is not None
        if study_ref:
            bundle = link_imaging_study(bundle, study_ref)
        encounter_ref = self._encounter(image, profile, patient_ref)
        detail["encounter_linked"] = encounter_ref is not None
        if encounter_ref:
            bundle = link_encounter(bundle, encounter_ref)
        order_refs = self._orders(image, profile, patient_ref)
        detail["orders_linked"] = len(order_refs)
        if order_refs:
            bundle = link_orders(bundle, order_refs)
        report_url = bundle["entry"][-1]["fullUrl"]
        if profile.transport is Transport.TRANSACTION:
            response = self.client.transaction(bundle)
            resolved = _resolved_refs(bundle, response)
            ref = _report_ref(response, len(bundle["entry"]) - 1)
        else:
            find = None if profile.search is SearchStyle.IDENTIFIER else self._find_by_patient
            resolved = self.client.create_sequentially(bundle, find=find,
                                                       conditional=profile.search is SearchStyle.IDENTIFIER)
            ref = resolved[report_url]
        detail["remote_ref"] = ref
        if self.settings.send_provenance if self.settings.send_provenance is not None else profile.provenance:
            detail["provenance"] = self._provenance(bundle, resolved, ref)
        return ref

    # ---- vendor searches: by patient (plus category), matched on the business identifier here

    def _find_by_patient(self, resource: dict[str, Any], criteria: str) -> list[dict[str, Any]]:
        """Epic and Millennium search these resources by patient, not by identifier alone."""
        from urllib.parse import parse_qsl
        rtype = resource["resourceType"]
        wanted = dict(parse_qsl(criteria)).get("identifier", "")
        system, _, value = wanted.partition("|")
        if rtype == "Patient":        # both vendors document Patient search by identifier
            return self.client.search_identifier("Patient", system, value)
        subject = (resource.get("subject") or {}).get("reference")
        if not subject or not subject.startswith("Patient/"):
            return self.client.search_identifier(rtype, system, value)
        return self._patient_search(rtype, subject, system, value)

    def _patient_search(self, rtype: str, patient_ref: str, system: str | None, value: str) -> list[dict[str, Any]]:
        params = {"patient": patient_ref}
        if rtype == "Observation":    # Epic/Millennium: patient plus category (or code)
            params["category"] = f"{OBSERVATION_CATEGORY}|imaging"
        matches = self.client.search_all(rtype, params)
        return [m for m in matches if any(i.get("value") == value and (not system or i.get("system") == system)
                                          for i in m.get("identifier", []))]

    def _lookup(self, rtype: str, profile: Profile, patient_ref: str | None, system: str | None,
                value: str) -> list[dict[str, Any]]:
        """Context look-ups (ImagingStudy, Encounter, ServiceRequest): an EHR that refuses the search
        simply gets no link."""
        try:
            if profile.search is SearchStyle.PATIENT and patient_ref:
                return self._patient_search(rtype, patient_ref, system, value)
            if system:
                return self.client.search_identifier(rtype, system, value)
            params = {"identifier": value}
            if patient_ref:
                params["patient"] = patient_ref
            return self.client.search(rtype, params)
        except FhirRejected:
            return []

    def _encounter(self, image: ImageRef, profile: Profile, patient_ref: str | None) -> str | None:
        ctx = image.context
        if not self.settings.link_encounter or ctx is None or not ctx.admission_id:
            return None
        matches = self._lookup("Encounter", profile, patient_ref, None, ctx.admission_id)
        return f"Encounter/{matches[0]['id']}" if len(matches) == 1 else None

    def _orders(self, image: ImageRef, profile: Profile, patient_ref: str | None) -> list[str]:
        ctx = image.context
        if not self.settings.link_service_request or ctx is None:
            return []
        refs: list[str] = []
        for order in ctx.orders:
            for ident in order_identifiers(order, self.settings):
                matches = self._lookup("ServiceRequest", profile, patient_ref, ident.get("system"), ident["value"])
                if len(matches) == 1:
                    refs.append(f"ServiceRequest/{matches[0]['id']}")
                    break
        return list(dict.fromkeys(refs))

    def _provenance(self, bundle: dict[str, Any], resolved: dict[str, str], report_ref: str) -> str | None:
        """One Provenance per report (agent: the model Device), found by target before it is created."""
        device = next((resolved.get(e["fullUrl"]) for e in bundle["entry"]
                       if e["resource"]["resourceType"] == "Device"), None)
        if device is None:
            return None            # Device contained: nothing outside the report can point at it
        if self.client.search("Provenance", {"target": report_ref}):
            return "exists"
        targets = [resolved[e["fullUrl"]] for e in bundle["entry"]
                   if e["resource"]["resourceType"] in ("Observation", "Media", "DiagnosticReport",
                                                        "DocumentReference") and e["fullUrl"] in resolved]
        device_resource = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Device")
        issued = bundle["entry"][-1]["resource"].get("issued") or bundle["entry"][-1]["resource"].get("date")
        created = self.client.create(build_provenance(targets, device_resource, device, issued))
        return created.reference

    def _deliver_review(self, payload: dict[str, Any], detail: dict[str, Any]) -> str:
        image = ImageRef.from_json(payload["image"])
        review = Review.from_json(payload["review"])
        rtype = payload["report_type"]
        profile = get_profile(payload.get("profile") or self.settings.profile)
        detail.update(decision=review.decision.value, review_id=review.review_id)
        report_system = self.settings.system("report")
        if profile.search is SearchStyle.PATIENT:
            patients = self.client.search_identifier("Patient", self.patient_system(image), image.patient_id)
            if len(patients) != 1:
                raise ReportNotYetDelivered(f"{len(patients)} Patients carry this image's identifier on the EHR")
            matches = self._patient_search(rtype, f"Patient/{patients[0]['id']}", report_system,
                                           image.sop_instance_uid)
        else:
            matches = self.client.search_identifier(rtype, report_system, image.sop_instance_uid)
        if not matches:
            raise ReportNotYetDelivered(f"no {rtype} for this image on the EHR yet")
        if len(matches) > 1:
            raise FhirRejected(f"{len(matches)} {rtype} resources carry this image's identifier")
        current = matches[0]
        ref = f"{rtype}/{current['id']}"
        detail["remote_ref"] = ref
        check_not_withdrawn(current)
        review = self._with_reviewer_reference(review, detail)
        applied = review_applied(current, review.review_id, self.settings)
        status = str(current.get("docStatus" if rtype == "DocumentReference" else "status") or "") if applied \
            else review_status(current, review)
        detail["status"] = status
        # Observations follow their report (R4); each is skipped once it carries this review's tag.
        detail["observations_updated"] = self._review_observations(current, review, status)
        if applied:
            detail["already_applied"] = True
            return ref
        version = current.get("meta", {}).get("versionId")
        if version is None:
            current, version = self.client.read(rtype, current["id"])
        if version is None:
            raise FhirRejected(f"the EHR gives no version for {rtype}; a versioned update is impossible")
        self.client.update(build_review_update(current, review, self.settings, status), version)
        return ref

    def _deliver_recall(self, payload: dict[str, Any], detail: dict[str, Any]) -> str:
        """A recalled model's report: ``entered-in-error`` (its Observations too) or ``amended`` with the
        reason, by a versioned update; a recall tag makes a repeated delivery a no-op."""
        image = ImageRef.from_json(payload["image"])
        recall = payload["recall"]
        rtype = payload["report_type"]
        detail.update(recall_id=recall["id"], action=recall["action"])
        matches = self.client.search_identifier(rtype, self.settings.system("report"), image.sop_instance_uid)
        if not matches:
            raise ReportNotYetDelivered(f"no {rtype} for this image on the EHR yet")
        if len(matches) > 1:
            raise FhirRejected(f"{len(matches)} {rtype} resources carry this image's identifier")
        current = matches[0]
        ref = f"{rtype}/{current['id']}"
        detail["remote_ref"] = ref
        if recall_applied(current, str(recall["id"]), self.settings):
            detail["already_applied"] = True
            return ref
        if recall["action"] == "entered-in-error":
            for res_ref in current.get("result", []):       # the report's Observations, when not contained
                target = (res_ref.get("reference") or "").split("/")
                if len(target) == 2 and target[0] == "Observation":
                    obs, version = self.client.read(*target)
                    if obs.get("status") != "entered-in-error" and version is not None:
                        self.client.update({**obs, "status": "entered-in-error"}, version)
        version = current.get("meta", {}).get("versionId")
        if version is None:
            current, version = self.client.read(rtype, current["id"])
        if version is None:
            raise FhirRejected(f"the EHR gives no version for {rtype}; a versioned update is impossible")
        self.client.update(build_recall_update(current, recall, self.settings), version)
        return ref
    def _with_reviewer_reference(self, review: Review, detail: dict[str, Any]) -> Review:
        """The reviewer as a Practitioner: mapped per user at planning, else looked up by identifier."""
        system = self.settings.practitioner_identifier_system
        if review.reviewer_reference is None and system:
            matches = self.client.search_identifier("Practitioner", system, review.reviewer)
            if len(matches) == 1:
                review = replace(review, reviewer_reference=f"Practitioner/{matches[0]['id']}")
        detail["reviewer_reference"] = review.reviewer_reference or "unmapped (display only)"
        return review

    def _review_observations(self, report: dict[str, Any], review: Review, status: str) -> int:
        if report.get("resourceType") == "DocumentReference":
            refs = [r.get("reference", "") for r in report.get("context", {}).get("related", [])]
        else:
            refs = [r.get("reference", "") for r in report.get("result", [])]
        done = 0
        for ref in refs:
            if not ref.startswith("Observation/"):
                continue          # contained ones follow inside the report's own update
            obs, version = self.client.read("Observation", ref.split("/", 1)[1])
            if obs.get("status") in WITHDRAWN or review_applied(obs, review.review_id, self.settings):
                continue
            if version is None:
                raise FhirRejected("the EHR gives no version for Observation; a versioned update is impossible")
            self.client.update(build_observation_review_update(obs, review, status, self.settings), version)
            done += 1
        return done

    # ---- patient and study lookup ---------------------------------------------------------------

    def patient_system(self, image: ImageRef) -> str:
        """Identifier system for the image's Patient ID, from its Issuer of Patient ID."""
        issuer = image.issuer_of_patient_id
        system = self.settings.patient_identifier_systems.get(issuer) if issuer else None
        system = system or self.settings.default_patient_identifier_system
        if not system:
            raise PatientMatchError(f"no identifier system configured for issuer {issuer!r}")
        return system

    def _with_subject(self, bundle: dict[str, Any], image: ImageRef, detail: dict[str, Any]) -> dict[str, Any]:
        system = self.patient_system(image)
        matches = self.client.search_identifier("Patient", system, image.patient_id)
        detail["patient_matches"] = len(matches)
        if len(matches) == 1:
            detail["patient_match"] = "one"
            return replace_reference(bundle, PATIENT_PLACEHOLDER, f"Patient/{matches[0]['id']}")
        if not matches:
            detail["patient_match"] = "none"
            policy = self.settings.on_no_patient
            if policy is NoMatchPolicy.CREATE_PLACEHOLDER:
                detail["patient_match"] = "placeholder"
                return add_placeholder_patient(bundle, system, image.patient_id, self.settings)
            if policy is NoMatchPolicy.RETRY:
                raise PatientNotYetKnown("no Patient with this identifier on the EHR (yet)")
            raise PatientMatchError("no Patient with this identifier on the EHR")
        detail["patient_match"] = "multiple"
        reason = f"{len(matches)} Patients carry this identifier; refusing to guess"
        if self.settings.on_multiple_patients is MultipleMatchPolicy.RETRY:
            raise PatientNotYetKnown(reason)
        raise PatientMatchError(reason)

    def _imaging_study(self, image: ImageRef, profile: Profile, patient_ref: str | None) -> str | None:
        """The EHR's ImagingStudy for the study, when it has exactly one and supports the search."""
        if not self.settings.link_imaging_study:
            return None
        matches = self._lookup("ImagingStudy", profile, patient_ref, DICOM_UID, f"urn:oid:{image.study_instance_uid}")
        return f"ImagingStudy/{matches[0]['id']}" if len(matches) == 1 else None

    # ---- audit ---------------------------------------------------------------------------------

    def _audit(self, payload: dict[str, Any], outcome: DeliveryOutcome, detail: dict[str, Any],
               started: float) -> None:
        image = payload.get("image") or {}
        if outcome.ok:
            result = Outcome.SUCCESS
        elif outcome.retryable:
            result = Outcome.MINOR_FAILURE
        else:
            result = Outcome.SERIOUS_FAILURE
        event_detail = {**detail, "ok": outcome.ok, "retryable": outcome.retryable, "reason": outcome.reason,
                        "retry_after_s": outcome.retry_after_s, "remote_ref": outcome.remote_ref,
                        "business_key": payload.get("business_key"),
                        "ms": round(1000 * (time.monotonic() - started), 1)}
        self.audit.record(AuditEvent(
            event=EventType.FHIR_DELIVERY, outcome=result, actor=ACTOR,
            action="U" if payload.get("kind") == KIND_REVIEW else "C",
            destination=self.client.base_url, patient_id=image.get("patient_id"),
            study_uid=image.get("study_instance_uid"),
            sop_instance_uids=(image["sop_instance_uid"],) if image.get("sop_instance_uid") else (),
            detail={k: v for k, v in event_detail.items() if v is not None}))


def _subject(bundle: dict[str, Any]) -> str | None:
    ref = (bundle["entry"][-1]["resource"].get("subject") or {}).get("reference")
    return ref if ref and ref.startswith("Patient/") else None


def _resolved_refs(bundle: dict[str, Any], response: dict[str, Any]) -> dict[str, str]:
    """fullUrl -> "Type/id" from a transaction-response (entries answer in request order)."""
    out: dict[str, str] = {}
    for entry, answer in zip(bundle.get("entry", []), response.get("entry", [])):
        ref = reference_from_location(answer.get("response", {}).get("location"))
        if ref is None and answer.get("resource", {}).get("id"):
            ref = f"{answer['resource']['resourceType']}/{answer['resource']['id']}"
        if ref:
            out[entry["fullUrl"]] = ref
    return out


def _report_ref(response: dict[str, Any], index: int) -> str:
    """The report's "Type/id" from a transaction-response (entries answer in request order)."""
    entries = response.get("entry", [])
    if index >= len(entries):
        raise FhirRejected("transaction-response is missing the report entry")
    entry = entries[index]
    ref = reference_from_location(entry.get("response", {}).get("location"))
    if ref is None and entry.get("resource", {}).get("id"):
        ref = f"{entry['resource']['resourceType']}/{entry['resource']['id']}"
    if ref is None:
        raise FhirRejected("transaction-response gives no location for the report")
    return ref
