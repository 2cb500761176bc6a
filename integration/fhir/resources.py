"""FHIR R4 resources for one AI result, built with ``fhir.resources.R4B`` models.

One image -> one transaction Bundle: a Device for the model, Observations for
the findings and a DiagnosticReport (or, for EHRs that refuse such reports, a
DocumentReference) that points at them. Every entry is a conditional create on
a business identifier derived from the SOP Instance UID, so the Bundle can be
sent any number of times and the EHR still holds one report per image.

R4B is used because ``fhir.resources`` ships no R4 4.0.1 models; the resources
used here (Device, Observation, DiagnosticReport, DocumentReference, Patient,
Bundle) are identical in R4 and R4B, and the tests check every resource
against the official R4 JSON schema. The models do not check code bindings.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import uuid
from dataclasses import dataclass
from datetime import date, datetime, time, timezone
from enum import Enum
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.fhirresourcemodel import FHIRResourceModel
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.documentreference import DocumentReference
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient

from dermgate.records import ImageRef
from inference.result import CLASS_NAMES, CLASSES, DISCLAIMER, Prediction, Risk
from integration.fhir.profiles import DeviceMode, Profile, ReportResource, ResultsMode
from integration.fhir.settings import FhirSettings

# ---- code systems -------------------------------------------------------------------------------
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
DICOM_UID = "urn:dicom:uid"                       # FHIR convention for DICOM UIDs (value urn:oid:...)
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
IDENTIFIER_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203"
DERMGATE_CODES = "urn:dermgate:codes"             # local codes where no standard code fits

# ---- codes --------------------------------------------------------------------------------------
LOINC_IMAGING_STUDY = ("18748-4", "Diagnostic imaging study")   # report/document type
LOINC_RADIOLOGY_CATEGORY = ("LP29684-5", "Radiology")           # US Core imaging report category
CATEGORY_IMAGING = ("imaging", "Imaging")
ACCESSION_TYPE = ("ACSN", "Accession ID")
UCUM_PERCENT = "%"

# SNOMED CT clinical findings for the HAM10000 classes, checked against DICOM CID 4405 and
# terminology-server expansions. bkl, df and vasc have no concept that we could confirm from a
# reliable source: they carry the local code only unless the site sets
# ``fhir.class_snomed_codes`` (its terminology team's choice), rather than a guessed SNOMED id.
CLASS_SNOMED: dict[str, tuple[str, str]] = {
    "akiec": ("201101007", "Actinic keratosis"),
    "bcc": ("254701007", "Basal cell carcinoma of skin"),
    "mel": ("93655004", "Malignant melanoma of skin"),
    "nv": ("400096001", "Melanocytic nevus"),
}


class LocalCode(str, Enum):
    """Codes in DERMGATE_CODES (no LOINC/SNOMED concept exists for AI outputs of this kind)."""
    REPORT = "dermoscopy-ai-report"
    MALIGNANCY_PROBABILITY = "malignancy-probability"
    PREDICTED_CLASS = "predicted-class"
    RISK_CATEGORY = "risk-category"
    LOW_CONFIDENCE = "low-confidence"
    UNCERTAINTY = "uncertainty"
    METHOD = "ai-dermoscopy-classification"


LOCAL_DISPLAY = {
    LocalCode.REPORT: "Dermoscopy AI decision-support report",
    LocalCode.MALIGNANCY_PROBABILITY: "AI probability of a malignant lesion (melanoma, BCC, AKIEC)",
    LocalCode.PREDICTED_CLASS: "AI predicted lesion class",
    LocalCode.RISK_CATEGORY: "AI risk category",
    LocalCode.LOW_CONFIDENCE: "AI result has low confidence",
    LocalCode.UNCERTAINTY: "AI uncertainty (normalised entropy)",
    LocalCode.METHOD: "AI classification of a dermoscopic image",
}
RISK_CODES = {Risk.LOW: "low", Risk.MEDIUM: "medium", Risk.HIGH: "high", Risk.NOT_ASSESSABLE: "not-assessable"}

PATIENT_PLACEHOLDER = "urn:dermgate:patient"      # replaced by the real subject at delivery time
NOT_A_DIAGNOSIS = "AI result, not a diagnosis."
CAM_TITLE = "Grad-CAM heatmap (regions that drove the AI result)"
PDF_TITLE = "Dermoscopy AI report"


class ReviewDecision(str, Enum):
    CONFIRM = "confirm"      # report becomes final
    OVERRIDE = "override"    # report becomes amended, with the clinician's diagnosis


@dataclass(frozen=True)
class Review:
    """A clinician's review of one AI result, as the report update needs it."""
    review_id: str
    decision: ReviewDecision
    reviewer: str                        # clinician's display name (not patient data)
    reviewed_at: datetime
    diagnosis: str | None = None         # one of CLASSES, for an override
    comment: str | None = None
    reviewer_reference: str | None = None  # e.g. "Practitioner/123" when the EHR id is known

    def to_json(self) -> dict[str, Any]:
        return {"review_id": self.review_id, "decision": self.decision.value, "reviewer": self.reviewer,
                "reviewed_at": self.reviewed_at.isoformat(), "diagnosis": self.diagnosis,
                "comment": self.comment, "reviewer_reference": self.reviewer_reference}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Review:
        return cls(review_id=data["review_id"], decision=ReviewDecision(data["decision"]),
                   reviewer=data["reviewer"], reviewed_at=datetime.fromisoformat(data["reviewed_at"]),
                   diagnosis=data.get("diagnosis"), comment=data.get("comment"),
                   reviewer_reference=data.get("reviewer_reference"))


# ---- small helpers ------------------------------------------------------------------------------

def coding(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"system": system, "code": code}
    if display:
        out["display"] = display
    return out


def local_concept(code: LocalCode, text: str | None = None) -> dict[str, Any]:
    return {"coding": [coding(DERMGATE_CODES, code.value, LOCAL_DISPLAY[code])], "text": text or LOCAL_DISPLAY[code]}


def class_concept(cls: str, settings: FhirSettings) -> dict[str, Any]:
    """The lesion class as a CodeableConcept: SNOMED CT where known, always the local code."""
    codings = []
    snomed = settings.class_snomed_codes.get(cls)
    if snomed:
        codings.append(coding(SNOMED, snomed, CLASS_NAMES[cls]))
    elif cls in CLASS_SNOMED:
        codings.append(coding(SNOMED, *CLASS_SNOMED[cls]))
    codings.append(coding(DERMGATE_CODES, f"ham10000-{cls}", CLASS_NAMES[cls]))
    return {"coding": codings, "text": CLASS_NAMES[cls]}


def percent(p: float) -> dict[str, Any]:
    return {"value": round(100.0 * p, 2), "unit": UCUM_PERCENT, "system": UCUM, "code": UCUM_PERCENT}


def identifier_query(system: str, value: str) -> str:
    """The ``If-None-Exist`` / search string for one identifier (token search ``system|value``)."""
    return urlencode({"identifier": f"{system}|{value}"}, safe=":|/")


def stable_urn(settings: FhirSettings, key: str) -> str:
    """A urn:uuid fullUrl that is the same on every retry of the same image (uuid5)."""
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'{settings.identifier_namespace}:{key}')}"


def attachment(content_type: str, data: bytes, title: str, created: datetime) -> dict[str, Any]:
    """An inline attachment with size and SHA-1 hash (R4 Attachment.hash is base64 SHA-1)."""
    return {"contentType": content_type, "data": base64.b64encode(data).decode("ascii"), "title": title,
            "size": len(data), "hash": base64.b64encode(hashlib.sha1(data).digest()).decode("ascii"),
            "creation": fhir_instant(created)}


def fhir_instant(moment: datetime) -> str:
    """FHIR instant: seconds and a zone are mandatory."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.isoformat(timespec="seconds")


def study_datetime(image: ImageRef, zone: str) -> datetime | date | None:
    """Study date/time from DICOM DA/TM, in the site's zone (FHIR needs a zone once there is a time)."""
    if not image.study_date:
        return None
    digits = image.study_date.replace("-", "").replace(".", "")
    try:
        day = date(int(digits[0:4]), int(digits[4:6]), int(digits[6:8]))
    except (ValueError, IndexError):
        return None
    if not image.study_time:
        return day
    tm = image.study_time.replace(":", "").split(".")[0]
    try:
        hh, mm, ss = int(tm[0:2]), int(tm[2:4] or 0), int(tm[4:6] or 0)
        return datetime.combine(day, time(hh, mm, min(ss, 59)), tzinfo=ZoneInfo(zone))
    except (ValueError, IndexError):
        return day


def effective_value(image: ImageRef, settings: FhirSettings, profile: Profile, issued: datetime) -> str:
    """effective[x] as a FHIR dateTime; profiles that need a time part never get a bare date."""
    when = study_datetime(image, settings.local_timezone)
    if when is None:
        return fhir_instant(issued)
    if isinstance(when, datetime):
        return when.isoformat(timespec="seconds")
    if profile.dates_need_time:
        return datetime.combine(when, time(0, 0), tzinfo=ZoneInfo(settings.local_timezone)).isoformat(
            timespec="seconds")
    return when.isoformat()


def reference(ref: str, display: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"reference": ref}
    if display:
        out["display"] = display
    return out


def performer(settings: FhirSettings) -> dict[str, Any]:
    if settings.performer_reference:
        return reference(settings.performer_reference, settings.performer_display)
    return {"display": settings.performer_display}


def validated(model: type[FHIRResourceModel], fields: dict[str, Any]) -> dict[str, Any]:
    """Runs the fields through the R4B model (structure, types, primitives' formats) and returns JSON.
    The models do not check code bindings: the tests do that against the R4 JSON schema."""
    return model.model_validate(fields).model_dump(mode="json")


# ---- resources ----------------------------------------------------------------------------------

def build_device(prediction: Prediction, settings: FhirSettings, resource_id: str | None = None) -> dict[str, Any]:
    """The model as a Device: name, version, sha256 and device UID identifiers, manufacturer (IHE AIR)."""
    model = prediction.model
    return validated(Device, {
        "id": resource_id,
        "identifier": [{"system": settings.system("model-sha256"), "value": model.sha256},
                       {"system": DICOM_UID, "value": f"urn:oid:{model.device_uid}"}],
        "status": "active",
        "manufacturer": model.manufacturer,
        "deviceName": [{"name": model.name, "type": "model-name"}],
        "modelNumber": model.name,
        "version": [{"value": model.version}],
        "type": {"text": "AI software for dermoscopy image classification (decision support)"},
    })


@dataclass(frozen=True)
class _Context:
    """What every Observation of one image shares."""
    image: ImageRef
    prediction: Prediction
    settings: FhirSettings
    profile: Profile
    patient_ref: str
    device_ref: str
    effective: str
    issued: str
    imaging_study_ref: str | None


def _observation(ctx: _Context, kind: str, code: LocalCode, value: dict[str, Any],
                 resource_id: str | None = None, **extra: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "id": resource_id,
        "identifier": [{"system": ctx.settings.system("observation"),
                        "value": f"{ctx.image.sop_instance_uid}:{kind}"}],
        "status": "preliminary",   # machine output: preliminary until a clinician has looked
        "category": [{"coding": [coding(OBSERVATION_CATEGORY, *CATEGORY_IMAGING)]}],
        "code": local_concept(code),
        "subject": reference(ctx.patient_ref),
        "effectiveDateTime": ctx.effective,
        "issued": ctx.issued,
        "device": reference(ctx.device_ref, f"{ctx.prediction.model.name} {ctx.prediction.model.version}"),
        "method": local_concept(LocalCode.METHOD, f"{LOCAL_DISPLAY[LocalCode.METHOD]} "
                                f"({ctx.prediction.model.name} {ctx.prediction.model.version})"),
        **value, **extra,
    }
    if ctx.image.body_site:
        fields["bodySite"] = {"text": ctx.image.body_site}
    if ctx.imaging_study_ref:
        fields["derivedFrom"] = [reference(ctx.imaging_study_ref)]
    return validated(Observation, fields)


def build_observations(ctx: _Context, ids: dict[str, str | None] | None = None) -> dict[str, dict[str, Any]]:
    """Findings as Observations keyed by kind; a not-assessable image gets only its risk category."""
    ids = ids or {}
    p = ctx.prediction
    out: dict[str, dict[str, Any]] = {}
    risk_text = f"{p.risk.value}" + (f": {p.reason}" if p.reason else "")
    out["risk"] = _observation(
        ctx, "risk", LocalCode.RISK_CATEGORY,
        {"valueCodeableConcept": {"coding": [coding(DERMGATE_CODES, f"risk-{RISK_CODES[p.risk]}", p.risk.value)],
                                  "text": risk_text}}, ids.get("risk"))
    if not p.assessable:
        return out
    out["malignancy"] = _observation(ctx, "malignancy", LocalCode.MALIGNANCY_PROBABILITY,
                                     {"valueQuantity": percent(p.malignancy_probability)}, ids.get("malignancy"))
    components = [{"code": {"coding": [coding(DERMGATE_CODES, f"probability-{cls}",
                                              f"AI probability: {CLASS_NAMES[cls]}")],
                            "text": f"Probability: {CLASS_NAMES[cls]}"},
                   "valueQuantity": percent(p.probabilities.get(cls, 0.0))} for cls in CLASSES]
    out["class"] = _observation(ctx, "class", LocalCode.PREDICTED_CLASS,
                                {"valueCodeableConcept": class_concept(p.top_class, ctx.settings)},
                                ids.get("class"), component=components)
    out["low-confidence"] = _observation(
        ctx, "low-confidence", LocalCode.LOW_CONFIDENCE, {"valueBoolean": p.low_confidence},
        ids.get("low-confidence"),
        component=[{"code": local_concept(LocalCode.UNCERTAINTY),
                    "valueQuantity": {"value": round(p.uncertainty, 4), "unit": "1", "system": UCUM, "code": "1"}}])
    return out


def conclusion_text(prediction: Prediction) -> str:
    """The human-readable conclusion; it always says that this is not a diagnosis."""
    p = prediction
    if not p.assessable:
        return f"{NOT_A_DIAGNOSIS} The image could not be assessed: {p.reason or 'unknown reason'}. {DISCLAIMER}"
    top = p.top_class
    parts = [NOT_A_DIAGNOSIS,
             f"Most likely class: {CLASS_NAMES[top]} ({100 * p.probabilities[top]:.1f}%).",
             f"Probability of a malignant lesion: {100 * p.malignancy_probability:.1f}% (risk {p.risk.value}).",
             ]
    if p.low_confidence:
        parts.append("Low confidence: interpret with particular care.")
    parts.append(DISCLAIMER)
    return " ".join(parts)


def _report_identifiers(image: ImageRef, settings: FhirSettings) -> list[dict[str, Any]]:
    ids: list[dict[str, Any]] = [
        {"use": "official", "system": settings.system("report"), "value": image.sop_instance_uid},
        {"system": DICOM_UID, "value": f"urn:oid:{image.study_instance_uid}"},
    ]
    if image.accession_number:
        ids.append({"type": {"coding": [coding(IDENTIFIER_TYPE, *ACCESSION_TYPE)]}, "value": image.accession_number})
    return ids


def _narrative(text: str) -> dict[str, Any]:
    from html import escape
    return {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><p>{escape(text)}</p></div>'}


def build_diagnostic_report(ctx: _Context, result_refs: list[str], cam_png: bytes, pdf: bytes,
                            contained: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    p = ctx.prediction
    text = conclusion_text(p)
    fields: dict[str, Any] = {
        "identifier": _report_identifiers(ctx.image, ctx.settings),
        "status": "preliminary",
        "category": [{"coding": [coding(LOINC, *LOINC_RADIOLOGY_CATEGORY)], "text": "Imaging (dermoscopy)"}],
        "code": {"coding": [coding(LOINC, *LOINC_IMAGING_STUDY),
                            coding(DERMGATE_CODES, LocalCode.REPORT.value, LOCAL_DISPLAY[LocalCode.REPORT])],
                 "text": LOCAL_DISPLAY[LocalCode.REPORT]},
        "subject": reference(ctx.patient_ref),
        "effectiveDateTime": ctx.effective,
        "issued": ctx.issued,
        "performer": [performer(ctx.settings)],
        "result": [reference(r) for r in result_refs],
        "conclusion": text,
        "presentedForm": [attachment("image/png", cam_png, CAM_TITLE, datetime.fromisoformat(ctx.issued)),
                          attachment("application/pdf", pdf, PDF_TITLE, datetime.fromisoformat(ctx.issued))],
        "text": _narrative(text),
    }
    if p.assessable:
        fields["conclusionCode"] = [class_concept(p.top_class, ctx.settings)]
    if ctx.imaging_study_ref:
        fields["imagingStudy"] = [reference(ctx.imaging_study_ref)]
    if contained:
        fields["contained"] = contained
    return validated(DiagnosticReport, fields)


def build_document_reference(ctx: _Context, related_refs: list[str], cam_png: bytes, pdf: bytes) -> dict[str, Any]:
    """The report as a document, for EHRs whose DiagnosticReport create takes no such report."""
    issued = datetime.fromisoformat(ctx.issued)
    content = [{"attachment": attachment("application/pdf", pdf, PDF_TITLE, issued)}]
    if ctx.profile.document_includes_png:
        content.append({"attachment": attachment("image/png", cam_png, CAM_TITLE, issued)})
    related = [reference(r) for r in related_refs]
    if ctx.imaging_study_ref:
        related.append(reference(ctx.imaging_study_ref))
    context: dict[str, Any] = {"period": {"start": ctx.effective}}
    if related:
        context["related"] = related
    return validated(DocumentReference, {
        "identifier": _report_identifiers(ctx.image, ctx.settings),
        "status": "current",
        "docStatus": "preliminary",
        "type": {"coding": [coding(LOINC, *LOINC_IMAGING_STUDY)], "text": LOCAL_DISPLAY[LocalCode.REPORT]},
        "subject": reference(ctx.patient_ref),
        "date": ctx.issued,
        "author": [performer(ctx.settings)],
        "description": conclusion_text(ctx.prediction)[:1000],
        "content": content,
        "context": context,
    })


def build_placeholder_patient(system: str, value: str) -> dict[str, Any]:
    """A Patient holding only the identifier (policy ``create-placeholder``); the EHR merges it later."""
    return validated(Patient, {"identifier": [{"system": system, "value": value}], "active": True})


# ---- the bundle ---------------------------------------------------------------------------------

def _entry(full_url: str, resource: dict[str, Any], if_none_exist: str) -> dict[str, Any]:
    return {"fullUrl": full_url, "resource": resource,
            "request": {"method": "POST", "url": resource["resourceType"], "ifNoneExist": if_none_exist}}


def build_report_bundle(image: ImageRef, prediction: Prediction, cam_png: bytes, pdf: bytes, patient_ref: str,
                        profile: Profile, settings: FhirSettings, *, issued: datetime,
                        imaging_study_ref: str | None = None) -> dict[str, Any]:
    """A transaction Bundle that creates, at most once each, the Device, the Observations and the
    report for one image. References inside the Bundle are urn:uuid fullUrls (stable across retries)."""
    sop = image.sop_instance_uid
    device_sys = settings.system("model-sha256")
    entries: list[dict[str, Any]] = []
    contained: list[dict[str, Any]] = []

    if profile.device is DeviceMode.RESOURCE:
        device_url = stable_urn(settings, f"device:{prediction.model.sha256}")
        entries.append(_entry(device_url, build_device(prediction, settings),
                              identifier_query(device_sys, prediction.model.sha256)))
        device_ref = device_url
    else:
        device_ref = "#device"

    ctx = _Context(image=image, prediction=prediction, settings=settings, profile=profile, patient_ref=patient_ref,
                   device_ref=device_ref, effective=effective_value(image, settings, profile, issued),
                   issued=fhir_instant(issued), imaging_study_ref=imaging_study_ref)

    result_refs: list[str] = []
    if profile.results is ResultsMode.CONTAINED:
        kinds = build_observations(ctx, ids={k: f"obs-{k}" for k in ("risk", "malignancy", "class", "low-confidence")})
        for kind, obs in kinds.items():
            contained.append(obs)
            result_refs.append(f"#{obs['id']}")
        if profile.device is DeviceMode.CONTAINED:
            contained.insert(0, build_device(prediction, settings, resource_id="device"))
    elif profile.results is ResultsMode.RESOURCES:
        for kind, obs in build_observations(ctx).items():
            if profile.device is DeviceMode.CONTAINED:
                obs = validated(Observation, {**obs, "contained": [build_device(prediction, settings,
                                                                                   resource_id="device")]})
            url = stable_urn(settings, f"observation:{sop}:{kind}")
            entries.append(_entry(url, obs, identifier_query(settings.system("observation"), f"{sop}:{kind}")))
            result_refs.append(url)

    report_url = stable_urn(settings, f"report:{sop}")
    report_query = identifier_query(settings.system("report"), sop)
    if profile.report is ReportResource.DIAGNOSTIC_REPORT:
        report = build_diagnostic_report(ctx, result_refs, cam_png, pdf, contained or None)
    else:
        report = build_document_reference(ctx, result_refs, cam_png, pdf)
    entries.append(_entry(report_url, report, report_query))
    # Every resource above went through its own model; validating the Bundle too would run them all
    # again (with the PNG and PDF attachments: 70% of the bundle's cost) and give the same JSON
    # (tests/integration/fhir/test_fhir_resources.py checks that it does).
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


# ---- delivery-time edits of a prepared bundle --------------------------------------------------

def replace_reference(bundle: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """A copy of the bundle with every ``{"reference": old}`` pointing at ``new``."""
    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: (new if k == "reference" and v == old else walk(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node
    return walk(bundle)


def add_placeholder_patient(bundle: dict[str, Any], system: str, value: str, settings: FhirSettings) -> dict[str, Any]:
    """Prepends a conditional create of a placeholder Patient and points the subject at it."""
    url = stable_urn(settings, f"patient:{system}|{value}")
    out = replace_reference(bundle, PATIENT_PLACEHOLDER, url)
    out["entry"] = [_entry(url, build_placeholder_patient(system, value), identifier_query(system, value))] + out["entry"]
    return out


def link_imaging_study(bundle: dict[str, Any], study_ref: str) -> dict[str, Any]:
    """Adds the EHR's ImagingStudy to the report and as ``derivedFrom`` of each Observation."""
    out = copy.deepcopy(bundle)
    for entry in out.get("entry", []):
        res = entry["resource"]
        _link_one(res, study_ref)
        for inner in res.get("contained", []):
            _link_one(inner, study_ref)
    return out


def _link_one(res: dict[str, Any], study_ref: str) -> None:
    rtype = res.get("resourceType")
    if rtype == "DiagnosticReport":
        res["imagingStudy"] = [reference(study_ref)]
    elif rtype == "Observation":
        res["derivedFrom"] = [reference(study_ref)]
    elif rtype == "DocumentReference":
        related = res.setdefault("context", {}).setdefault("related", [])
        if reference(study_ref) not in related:
            related.append(reference(study_ref))


# ---- clinician review ---------------------------------------------------------------------------

def build_review_update(current: dict[str, Any], review: Review, settings: FhirSettings) -> dict[str, Any]:
    """The report after a clinician's review, for a versioned update (PUT with If-Match).

    DiagnosticReport: ``final`` on confirm, ``amended`` with the clinician's diagnosis as
    conclusionCode on override. DocumentReference: the same through ``docStatus``.
    A tag with the review id makes a repeated delivery recognisable (idempotent).
    """
    updated = copy.deepcopy(current)
    confirm = review.decision is ReviewDecision.CONFIRM
    status = "final" if confirm else "amended"
    clinician = reference(review.reviewer_reference, review.reviewer) if review.reviewer_reference else {
        "display": review.reviewer}
    if confirm:
        summary = f"Reviewed by {review.reviewer} on {fhir_instant(review.reviewed_at)}: AI result confirmed."
    else:
        diagnosis = CLASS_NAMES.get(review.diagnosis or "", review.diagnosis or "unspecified")
        summary = (f"Reviewed by {review.reviewer} on {fhir_instant(review.reviewed_at)}: AI result overridden; "
                   f"clinician's diagnosis: {diagnosis}.")
    if review.comment:
        summary += f" Comment: {review.comment}"
    original = _original_conclusion(current)
    meta = updated.setdefault("meta", {})
    tags = [t for t in meta.get("tag", []) if t.get("system") != settings.system("review")]
    tags.append(coding(settings.system("review"), review.review_id, f"clinician review ({review.decision.value})"))
    meta["tag"] = tags
    if updated.get("resourceType") == "DocumentReference":
        updated["docStatus"] = status
        updated["description"] = f"{summary} AI: {original}"[:1000]
        return validated(DocumentReference, updated)
    updated["status"] = status
    updated["resultsInterpreter"] = [clinician]
    updated["conclusion"] = f"{summary} AI: {original}"
    updated["text"] = _narrative(updated["conclusion"])
    if not confirm and review.diagnosis in CLASSES:
        updated["conclusionCode"] = [class_concept(review.diagnosis, settings)]
    return validated(DiagnosticReport, updated)


def _original_conclusion(current: dict[str, Any]) -> str:
    """The AI's own conclusion, without an earlier review's prefix (reviews can follow reviews)."""
    text = current.get("conclusion") or current.get("description") or ""
    marker = " AI: "
    return text.split(marker, 1)[1] if text.startswith("Reviewed by ") and marker in text else text


def review_applied(current: dict[str, Any], review_id: str, settings: FhirSettings) -> bool:
    return any(t.get("system") == settings.system("review") and t.get("code") == review_id
               for t in current.get("meta", {}).get("tag", []))
