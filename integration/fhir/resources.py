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
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from enum import Enum
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from fhir.resources.R4B.fhirresourcemodel import FHIRResourceModel
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.documentreference import DocumentReference
from fhir.resources.R4B.media import Media
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.provenance import Provenance

from dermgate.records import ImageRef, OrderRef
from inference.result import CLASS_NAMES, CLASSES, DISCLAIMER, Prediction, Risk
from integration.fhir.errors import ReportWithdrawn
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
SECURITY_OBSERVATION_VALUE = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
US_CORE_DOC_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category"
MEDIA_TYPE = "http://terminology.hl7.org/CodeSystem/media-type"
PROVENANCE_PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"

# ---- codes --------------------------------------------------------------------------------------
LOINC_IMAGING_STUDY = ("18748-4", "Diagnostic imaging study")   # report/document type
LOINC_RADIOLOGY_CATEGORY = ("LP29684-5", "Radiology")           # US Core imaging report category
CATEGORY_IMAGING = ("imaging", "Imaging")
ACCESSION_TYPE = ("ACSN", "Accession ID")
PLACER_TYPE = ("PLAC", "Placer Identifier")
FILLER_TYPE = ("FILL", "Filler Identifier")
UCUM_PERCENT = "%"
# HL7 AI Transparency on FHIR: resources asserted by AI carry this security label (meta.security).
AIAST = ("AIAST", "Artificial Intelligence asserted")
CLINICAL_NOTE = ("clinical-note", "Clinical Note")            # US Core DocumentReference category
SNOMED_LATERALITY_ATTRIBUTE = "272741003"                     # |Laterality (attribute)|
LATERALITY_CODES = {"L": ("7771000", "Left"), "R": ("24028007", "Right"), "B": ("51440002", "Bilateral")}

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
    OUT_OF_DISTRIBUTION = "out-of-distribution"
    OOD_SCORE = "ood-score"
    UNCERTAINTY = "uncertainty"
    METHOD = "ai-dermoscopy-classification"


LOCAL_DISPLAY = {
    LocalCode.REPORT: "Dermoscopy AI decision-support report",
    LocalCode.MALIGNANCY_PROBABILITY: "AI probability of a malignant lesion (melanoma, BCC, AKIEC)",
    LocalCode.PREDICTED_CLASS: "AI predicted lesion class",
    LocalCode.RISK_CATEGORY: "AI risk category",
    LocalCode.LOW_CONFIDENCE: "AI result has low confidence",
    LocalCode.OUT_OF_DISTRIBUTION: "Image outside the AI's training distribution",
    LocalCode.OOD_SCORE: "AI out-of-distribution score (distance to the training features)",
    LocalCode.UNCERTAINTY: "AI uncertainty (normalised entropy)",
    LocalCode.METHOD: "AI classification of a dermoscopic image",
}
RISK_CODES = {Risk.LOW: "low", Risk.MEDIUM: "medium", Risk.HIGH: "high", Risk.NOT_ASSESSABLE: "not-assessable"}

PATIENT_PLACEHOLDER = "urn:dermgate:patient"      # replaced by the real subject at delivery time
NOT_A_DIAGNOSIS = "AI result, not a diagnosis."
OBSERVATION_NOTE = "Decision support, not a diagnosis: " + DISCLAIMER
CAM_TITLE = "Grad-CAM heatmap (regions that drove the AI result)"
PDF_TITLE = "Dermoscopy AI report"


class ReviewDecision(str, Enum):
    CONFIRM = "confirm"      # first sign-off: final; later: amended
    OVERRIDE = "override"    # first sign-off: final with the clinician's diagnosis; later: corrected


@dataclass(frozen=True)
class Thresholds:
    """The model's risk cut-offs on p(malignant), as the EHR is told them (referenceRange, note)."""
    referral: float          # Medium from here: refer
    high: float              # High from here

    def to_json(self) -> dict[str, float]:
        return {"referral": self.referral, "high": self.high}


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


def _tzinfo(image: ImageRef, zone: str) -> Any:
    """The image's Timezone Offset From UTC (0008,0201) when it has one, else the site's zone."""
    offset = image.context.timezone_offset if image.context else None
    if offset:
        sign = -1 if offset[0] == "-" else 1
        return timezone(sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[3:5])))
    return ZoneInfo(zone)


def study_datetime(image: ImageRef, zone: str) -> datetime | date | None:
    """Study date/time from DICOM DA/TM, in the image's offset or else the site's zone (FHIR needs
    a zone once there is a time)."""
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
        return datetime.combine(day, time(hh, mm, min(ss, 59)), tzinfo=_tzinfo(image, zone))
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
        return datetime.combine(when, time(0, 0), tzinfo=_tzinfo(image, settings.local_timezone)).isoformat(
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


def author(settings: FhirSettings, profile: Profile) -> dict[str, Any]:
    """The document's author: the configured Practitioner; Oracle Health takes nothing else."""
    if settings.author_reference:
        return reference(settings.author_reference)
    if profile.author_must_be_practitioner:
        from integration.fhir.errors import FhirConfigError
        raise FhirConfigError(f"profile {profile.name.value} needs fhir.author_reference (a Practitioner)")
    return performer(settings)


def ai_meta() -> dict[str, Any]:
    """meta.security: the resource was asserted by AI (HL7 AI Transparency on FHIR)."""
    return {"security": [coding(SECURITY_OBSERVATION_VALUE, *AIAST)]}


def body_site_concept(image: ImageRef) -> dict[str, Any] | None:
    """The body site: SNOMED CT code of the Anatomic Region Sequence, with its laterality as a
    post-coordinated SNOMED CT expression (R4 has no laterality element), and the text."""
    ctx = image.context
    text = image.body_site
    if ctx is None or not ctx.body_site_code or (ctx.body_site_scheme or "").upper() not in ("SCT", "SRT"):
        return {"text": text} if text else None
    meaning = ctx.body_site_meaning or text or ""
    codings = [coding(SNOMED, ctx.body_site_code, meaning or None)]
    side = LATERALITY_CODES.get(ctx.laterality or "")
    if side:
        codings.append(coding(SNOMED, f"{ctx.body_site_code}:{SNOMED_LATERALITY_ATTRIBUTE}={side[0]}",
                              f"{meaning} ({side[1].lower()})"))
        text = f"{side[1]} {meaning[:1].lower()}{meaning[1:]}" if meaning else side[1]
    return {"coding": codings, "text": text or meaning}


def order_identifiers(order: OrderRef, settings: FhirSettings) -> list[dict[str, Any]]:
    """An order's business identifiers: placer and filler order numbers, else the accession number."""
    out: list[dict[str, Any]] = []
    system = {"system": settings.order_identifier_system} if settings.order_identifier_system else {}
    if order.placer_order_number:
        out.append({"type": {"coding": [coding(IDENTIFIER_TYPE, *PLACER_TYPE)]}, **system,
                    "value": order.placer_order_number})
    if order.filler_order_number:
        out.append({"type": {"coding": [coding(IDENTIFIER_TYPE, *FILLER_TYPE)]}, **system,
                    "value": order.filler_order_number})
    if order.accession_number:
        out.append({"type": {"coding": [coding(IDENTIFIER_TYPE, *ACCESSION_TYPE)]}, "value": order.accession_number})
    return out


def based_on(image: ImageRef, settings: FhirSettings) -> list[dict[str, Any]]:
    """basedOn: each order as a logical reference (ServiceRequest by identifier); delivery
    replaces it with the EHR's ServiceRequest when it finds exactly one."""
    orders = image.context.orders if image.context else ()
    out = []
    for order in orders:
        ids = order_identifiers(order, settings)
        if ids:
            out.append({"type": "ServiceRequest", "identifier": ids[0]})
    return out


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
        "note": [{"text": model_card_note(prediction, settings)}],
    })


def model_card_note(prediction: Prediction, settings: FhirSettings) -> str:
    """The model card, linked from the Device (AI Transparency on FHIR: Model-Card in Device.note)."""
    where = settings.model_card_url or "models/MODEL_CARD.md in the dermgate distribution"
    return (f"Model card: {where}. {prediction.model.name} {prediction.model.version}, sha256 "
            f"{prediction.model.sha256}. Decision support, not a diagnosis.")


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
    notes: tuple[str, ...] = ()
    thresholds: Thresholds | None = None


def _observation(ctx: _Context, kind: str, code: LocalCode, value: dict[str, Any],
                 resource_id: str | None = None, **extra: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "id": resource_id,
        "identifier": [{"system": ctx.settings.system("observation"),
                        "value": f"{ctx.image.sop_instance_uid}:{kind}"}],
        "meta": ai_meta(),
        "status": "preliminary",   # machine output: preliminary until a clinician has looked
        "category": [{"coding": [coding(OBSERVATION_CATEGORY, *CATEGORY_IMAGING)]}],
        "code": local_concept(code),
        "note": [{"text": OBSERVATION_NOTE}],
        "subject": reference(ctx.patient_ref),
        "effectiveDateTime": ctx.effective,
        "issued": ctx.issued,
        "device": reference(ctx.device_ref, f"{ctx.prediction.model.name} {ctx.prediction.model.version}"),
        "method": local_concept(LocalCode.METHOD, f"{LOCAL_DISPLAY[LocalCode.METHOD]} "
                                f"({ctx.prediction.model.name} {ctx.prediction.model.version})"),
        **value, **extra,
    }
    site = body_site_concept(ctx.image)
    if site:
        fields["bodySite"] = site
    orders = based_on(ctx.image, ctx.settings)
    if orders:
        fields["basedOn"] = orders
    if ctx.imaging_study_ref:
        fields["derivedFrom"] = [reference(ctx.imaging_study_ref)]
    return validated(Observation, fields)


def interpretation(risk: Risk) -> list[dict[str, Any]] | None:
    """Flags the EHR can act on: High risk is abnormal/high, Low is normal; Medium (refer, not
    urgent) is abnormal; not assessable gets none."""
    if risk is Risk.HIGH:
        codes = [("H", "High"), ("A", "Abnormal")]
    elif risk is Risk.MEDIUM:
        codes = [("A", "Abnormal")]
    elif risk is Risk.LOW:
        codes = [("N", "Normal")]
    else:
        return None
    return [{"coding": [coding(INTERPRETATION, c, d)], "text": d} for c, d in codes]


def threshold_text(t: Thresholds | None) -> str | None:
    if t is None:
        return None
    return (f"Referral threshold: p(malignant) >= {100 * t.referral:.1f}% is Medium risk (refer); "
            f">= {100 * t.high:.1f}% is High risk. Below {100 * t.referral:.1f}%: Low risk.")


def build_observations(ctx: _Context, ids: dict[str, str | None] | None = None) -> dict[str, dict[str, Any]]:
    """Findings as Observations keyed by kind; a not-assessable image gets only its risk category."""
    ids = ids or {}
    p = ctx.prediction
    out: dict[str, dict[str, Any]] = {}
    risk_text = f"{p.risk.value}" + (f": {p.reason}" if p.reason else "")
    flags = interpretation(p.risk)
    flag = {"interpretation": flags} if flags else {}
    thresholds = threshold_text(ctx.thresholds)
    risk_notes = {"note": [{"text": OBSERVATION_NOTE}] + ([{"text": thresholds}] if thresholds else [])}
    out["risk"] = _observation(
        ctx, "risk", LocalCode.RISK_CATEGORY,
        {"valueCodeableConcept": {"coding": [coding(DERMGATE_CODES, f"risk-{RISK_CODES[p.risk]}", p.risk.value)],
                                  "text": risk_text}, **flag, **risk_notes}, ids.get("risk"))
    if not p.assessable:
        return out
    reference_range: dict[str, Any] = {}
    if ctx.thresholds is not None:
        reference_range = {"referenceRange": [{
            "low": percent(0.0), "high": percent(ctx.thresholds.referral),
            "text": thresholds}]}
    out["malignancy"] = _observation(ctx, "malignancy", LocalCode.MALIGNANCY_PROBABILITY,
                                     {"valueQuantity": percent(p.malignancy_probability), **flag,
                                      **reference_range}, ids.get("malignancy"))
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
                    "valueQuantity": {"value": round(p.uncertainty, 4), "unit": "1", "system": UCUM, "code": "1"}},
                   *ood_components(p)])
    return out


def ood_components(p: Prediction) -> list[dict[str, Any]]:
    """The out-of-distribution flag and score, beside the low-confidence flag (none without OOD statistics)."""
    if p.ood_score is None:
        return []
    return [{"code": local_concept(LocalCode.OUT_OF_DISTRIBUTION), "valueBoolean": p.out_of_distribution},
            {"code": local_concept(LocalCode.OOD_SCORE),
             "valueQuantity": {"value": round(p.ood_score, 4), "unit": "1", "system": UCUM, "code": "1"}}]


def conclusion_text(prediction: Prediction, notes: Sequence[str] = ()) -> str:
    """The human-readable conclusion; it always says that this is not a diagnosis. ``notes``
    (e.g. that only the first frame of a multi-frame source was classified) come before the
    disclaimer."""
    p = prediction
    extra = "".join(f" {note}" for note in notes)
    if not p.assessable:
        return (f"{NOT_A_DIAGNOSIS} The image could not be assessed: {p.reason or 'unknown reason'}.{extra} "
                f"{DISCLAIMER}")
    top = p.top_class
    parts = [NOT_A_DIAGNOSIS,
             f"Most likely class: {CLASS_NAMES[top]} ({100 * p.probabilities[top]:.1f}%).",
             f"Probability of a malignant lesion: {100 * p.malignancy_probability:.1f}% (risk {p.risk.value}).",
             ]
    if p.low_confidence:
        parts.append("Low confidence: interpret with particular care.")
    if p.out_of_distribution:
        parts.append("Image outside the training distribution: interpret with particular care.")
    parts.extend(notes)
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


def build_media(ctx: _Context, cam_png: bytes, resource_id: str | None = None) -> dict[str, Any]:
    """The Grad-CAM heatmap as a Media (DiagnosticReport.media.link, US Core Report and Note)."""
    fields: dict[str, Any] = {
        "id": resource_id,
        "meta": ai_meta(),
        "identifier": [{"system": ctx.settings.system("media"), "value": f"{ctx.image.sop_instance_uid}:heatmap"}],
        "status": "completed",
        "type": {"coding": [coding(MEDIA_TYPE, "image", "Image")]},
        "subject": reference(ctx.patient_ref),
        "createdDateTime": ctx.effective,
        "issued": ctx.issued,
        "device": reference(ctx.device_ref),
        "content": attachment("image/png", cam_png, CAM_TITLE, datetime.fromisoformat(ctx.issued)),
        "note": [{"text": OBSERVATION_NOTE}],
    }
    site = body_site_concept(ctx.image)
    if site:
        fields["bodySite"] = site
    orders = based_on(ctx.image, ctx.settings)
    if orders:
        fields["basedOn"] = orders
    return validated(Media, fields)


def build_diagnostic_report(ctx: _Context, result_refs: list[str], cam_png: bytes, pdf: bytes,
                            contained: list[dict[str, Any]] | None = None,
                            media_ref: str | None = None) -> dict[str, Any]:
    p = ctx.prediction
    text = conclusion_text(p, ctx.notes)
    fields: dict[str, Any] = {
        "meta": ai_meta(),
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
        "presentedForm": [attachment("application/pdf", pdf, PDF_TITLE, datetime.fromisoformat(ctx.issued))],
        "text": _narrative(text),
    }
    if media_ref:
        fields["media"] = [{"comment": CAM_TITLE, "link": reference(media_ref)}]
    else:   # no Media resource in this profile: the heatmap goes with the report itself
        fields["presentedForm"].insert(0, attachment("image/png", cam_png, CAM_TITLE,
                                                     datetime.fromisoformat(ctx.issued)))
    orders = based_on(ctx.image, ctx.settings)
    if orders:
        fields["basedOn"] = orders
    if p.assessable:
        fields["conclusionCode"] = [class_concept(p.top_class, ctx.settings)]
    if ctx.imaging_study_ref:
        fields["imagingStudy"] = [reference(ctx.imaging_study_ref)]
    if contained:
        fields["contained"] = [_as_contained(c) for c in contained]
    return validated(DiagnosticReport, fields)


def _as_contained(resource: dict[str, Any]) -> dict[str, Any]:
    """R4 dom-5: a contained resource carries no security label (the container's covers it)."""
    meta = {k: v for k, v in resource.get("meta", {}).items() if k != "security"}
    out = {k: v for k, v in resource.items() if k != "meta"}
    return {**out, "meta": meta} if meta else out


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
        "meta": ai_meta(),
        "identifier": _report_identifiers(ctx.image, ctx.settings),
        "status": "current",
        "docStatus": "preliminary",
        "type": {"coding": [coding(LOINC, *LOINC_IMAGING_STUDY)], "text": LOCAL_DISPLAY[LocalCode.REPORT]},
        "category": [{"coding": [coding(US_CORE_DOC_CATEGORY, *CLINICAL_NOTE)]}],
        "subject": reference(ctx.patient_ref),
        "date": ctx.issued,
        "author": [author(ctx.settings, ctx.profile)],
        "description": conclusion_text(ctx.prediction, ctx.notes)[:1000],
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
                        imaging_study_ref: str | None = None, thresholds: Thresholds | None = None,
                        notes: Sequence[str] = ()) -> dict[str, Any]:
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
                   issued=fhir_instant(issued), imaging_study_ref=imaging_study_ref, thresholds=thresholds,
                   notes=tuple(notes))

    result_refs: list[str] = []
    if profile.results is ResultsMode.CONTAINED:
        kinds = build_observations(ctx, ids={k: f"obs-{k}" for k in ("risk", "malignancy", "class", "low-confidence")})
        for obs in kinds.values():
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

    media_ref: str | None = None
    if profile.report is ReportResource.DIAGNOSTIC_REPORT and profile.media:
        if profile.device is DeviceMode.CONTAINED:
            if not any(c.get("id") == "device" for c in contained):
                contained.insert(0, build_device(prediction, settings, resource_id="device"))
            contained.append(build_media(ctx, cam_png, resource_id="media"))
            media_ref = "#media"
        else:
            media_ref = stable_urn(settings, f"media:{sop}")
            entries.append(_entry(media_ref, build_media(ctx, cam_png),
                                  identifier_query(settings.system("media"), f"{sop}:heatmap")))

    report_url = stable_urn(settings, f"report:{sop}")
    report_query = identifier_query(settings.system("report"), sop)
    if profile.report is ReportResource.DIAGNOSTIC_REPORT:
        report = build_diagnostic_report(ctx, result_refs, cam_png, pdf, contained or None, media_ref)
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


def link_encounter(bundle: dict[str, Any], encounter_ref: str) -> dict[str, Any]:
    """Sets ``encounter`` (Observation, DiagnosticReport) / ``context.encounter`` (DocumentReference)."""
    out = copy.deepcopy(bundle)
    for entry in out.get("entry", []):
        for res in [entry["resource"], *entry["resource"].get("contained", [])]:
            rtype = res.get("resourceType")
            if rtype in ("Observation", "DiagnosticReport", "Media"):
                res["encounter"] = reference(encounter_ref)
            elif rtype == "DocumentReference":
                res.setdefault("context", {})["encounter"] = [reference(encounter_ref)]
    return out


def link_orders(bundle: dict[str, Any], order_refs: list[str]) -> dict[str, Any]:
    """Replaces the logical ``basedOn`` (order identifiers) with the EHR's ServiceRequests
    (DocumentReference: ``context.related``, as R4 has no basedOn there)."""
    out = copy.deepcopy(bundle)
    refs = [reference(r) for r in order_refs]
    for entry in out.get("entry", []):
        for res in [entry["resource"], *entry["resource"].get("contained", [])]:
            if res.get("resourceType") in ("Observation", "DiagnosticReport", "Media"):
                res["basedOn"] = refs
            elif res.get("resourceType") == "DocumentReference":
                related = res.setdefault("context", {}).setdefault("related", [])
                related.extend(r for r in refs if r not in related)
    return out


def build_provenance(target_refs: list[str], device: dict[str, Any], device_ref: str, recorded: str) -> dict[str, Any]:
    """Who made the AI-asserted resources: the model Device as author (AI Transparency on FHIR);
    the reason names the model card (the Device's note)."""
    name = f"{device.get('modelNumber', '')} {(device.get('version') or [{}])[0].get('value', '')}".strip()
    notes = [n.get("text", "") for n in device.get("note", [])]
    return validated(Provenance, {
        "meta": ai_meta(),
        "target": [reference(r) for r in target_refs],
        "recorded": recorded,
        "agent": [{"type": {"coding": [coding(PROVENANCE_PARTICIPANT, "author", "Author")]},
                   "who": reference(device_ref, name or None)}],
        "reason": [{"text": notes[0] if notes else "AI decision support"}],
    })


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

WITHDRAWN = ("entered-in-error", "cancelled")
FIRST_SIGN_OFF = ("registered", "partial", "preliminary", "unknown", None)


def check_not_withdrawn(resource: dict[str, Any]) -> None:
    """A report (or document) the EHR withdrew is never overwritten by a review."""
    rtype = resource.get("resourceType")
    status = resource.get("status")
    doc_status = resource.get("docStatus") if rtype == "DocumentReference" else None
    for value in (status, doc_status):
        if value in WITHDRAWN:
            raise ReportWithdrawn(f"the EHR marked {rtype}/{resource.get('id')} {value}: "
                                  f"the review is not applied (a withdrawn report is never overwritten)")


def _current_diagnosis(current: dict[str, Any]) -> str | None:
    for concept in current.get("conclusionCode", []):
        for c in concept.get("coding", []):
            if c.get("system") == DERMGATE_CODES and str(c.get("code", "")).startswith("ham10000-"):
                return str(c["code"]).removeprefix("ham10000-")
    return None


def review_status(current: dict[str, Any], review: Review) -> str:
    """R4 status after a review: the first sign-off makes the report ``final`` (with the clinician's
    diagnosis when they overrode); a later review is a change after final: ``corrected`` when it
    changes the diagnosis in force, else ``amended``. (DocumentReference.docStatus knows no
    ``corrected``: ``amended``.)"""
    is_doc = current.get("resourceType") == "DocumentReference"
    status = current.get("docStatus") if is_doc else current.get("status")
    if status in FIRST_SIGN_OFF:
        return "final"
    if is_doc:
        return "amended"
    changes = (review.decision is ReviewDecision.OVERRIDE and review.diagnosis is not None
               and review.diagnosis != _current_diagnosis(current))
    return "corrected" if changes else "amended"


def _review_tag(meta: dict[str, Any], review: Review, settings: FhirSettings) -> None:
    tags = [t for t in meta.get("tag", []) if t.get("system") != settings.system("review")]
    tags.append(coding(settings.system("review"), review.review_id, f"clinician review ({review.decision.value})"))
    meta["tag"] = tags


def clinician_reference(review: Review) -> dict[str, Any]:
    return reference(review.reviewer_reference, review.reviewer) if review.reviewer_reference else {
        "display": review.reviewer}


def build_review_update(current: dict[str, Any], review: Review, settings: FhirSettings,
                        status: str | None = None) -> dict[str, Any]:
    """The report after a clinician's review, for a versioned update (PUT with If-Match).

    Status per :func:`review_status`; an override puts the clinician's diagnosis in
    conclusionCode. The reviewer goes as ``resultsInterpreter`` (DiagnosticReport) or
    ``authenticator`` (DocumentReference), a Practitioner reference when known; the document's
    ``author`` (a Practitioner for Oracle Health) is kept as it is. Contained Observations
    follow the report's status. A tag with the review id makes a repeated delivery recognisable.
    """
    check_not_withdrawn(current)
    updated = copy.deepcopy(current)
    confirm = review.decision is ReviewDecision.CONFIRM
    status = status or review_status(current, review)
    clinician = clinician_reference(review)
    if confirm:
        summary = f"Reviewed by {review.reviewer} on {fhir_instant(review.reviewed_at)}: AI result confirmed."
    else:
        diagnosis = CLASS_NAMES.get(review.diagnosis or "", review.diagnosis or "unspecified")
        summary = (f"Reviewed by {review.reviewer} on {fhir_instant(review.reviewed_at)}: AI result overridden; "
                   f"clinician's diagnosis: {diagnosis}.")
    if review.comment:
        summary += f" Comment: {review.comment}"
    original = _original_conclusion(current)
    _review_tag(updated.setdefault("meta", {}), review, settings)
    if updated.get("resourceType") == "DocumentReference":
        updated["docStatus"] = status
        updated["description"] = f"{summary} AI: {original}"[:1000]
        if review.reviewer_reference:
            updated["authenticator"] = reference(review.reviewer_reference)
        return validated(DocumentReference, updated)
    updated["status"] = status
    updated["resultsInterpreter"] = [clinician]
    updated["conclusion"] = f"{summary} AI: {original}"
    updated["text"] = _narrative(updated["conclusion"])
    if not confirm and review.diagnosis in CLASSES:
        updated["conclusionCode"] = [class_concept(review.diagnosis, settings)]
    for inner in updated.get("contained", []):
        if inner.get("resourceType") == "Observation" and inner.get("status") not in WITHDRAWN:
            inner["status"] = status
    return validated(DiagnosticReport, updated)


def recall_applied(current: dict[str, Any], recall_id: str, settings: FhirSettings) -> bool:
    return any(t.get("system") == settings.system("recall") and t.get("code") == recall_id
               for t in current.get("meta", {}).get("tag", []))


def build_recall_update(current: dict[str, Any], recall: dict[str, Any], settings: FhirSettings) -> dict[str, Any]:
    """The report of a recalled model version, for a versioned update: ``entered-in-error`` (the EHR
    hides or flags it as never valid), or ``amended`` with the recall notice before the AI's conclusion."""
    updated = copy.deepcopy(current)
    action = recall["action"]
    notice = (f"RECALLED: the AI model version {recall['model_version']} that produced this result was recalled "
              f"on {recall['recalled_at']}. Reason: {recall['reason']}. Do not use this result.")
    meta = updated.setdefault("meta", {})
    tags = [t for t in meta.get("tag", []) if t.get("system") != settings.system("recall")]
    tags.append(coding(settings.system("recall"), str(recall["id"]), f"model recall ({action})"))
    meta["tag"] = tags
    original = _original_conclusion(current)
    if updated.get("resourceType") == "DocumentReference":
        if action == "entered-in-error":
            updated["status"] = "entered-in-error"
            updated["docStatus"] = "entered-in-error"
        else:
            updated["docStatus"] = "amended"
        updated["description"] = f"{notice} AI: {original}"[:1000]
        return validated(DocumentReference, updated)
    updated["status"] = "entered-in-error" if action == "entered-in-error" else "amended"
    updated["conclusion"] = f"{notice} AI: {original}"
    updated["text"] = _narrative(updated["conclusion"])
    return validated(DiagnosticReport, updated)
def build_observation_review_update(current: dict[str, Any], review: Review, status: str,
                                    settings: FhirSettings) -> dict[str, Any]:
    """An Observation of a reviewed report: it follows the report's status (R4), with the
    clinician as performer and the same review tag."""
    updated = copy.deepcopy(current)
    updated["status"] = status
    _review_tag(updated.setdefault("meta", {}), review, settings)
    if review.reviewer_reference:
        performers = [p for p in updated.get("performer", []) if p.get("reference") != review.reviewer_reference]
        updated["performer"] = performers + [reference(review.reviewer_reference, review.reviewer)]
    return validated(Observation, updated)


def _original_conclusion(current: dict[str, Any]) -> str:
    """The AI's own conclusion, without an earlier review's prefix (reviews can follow reviews)."""
    text = current.get("conclusion") or current.get("description") or ""
    marker = " AI: "
    return text.split(marker, 1)[1] if text.startswith("Reviewed by ") and marker in text else text


def review_applied(current: dict[str, Any], review_id: str, settings: FhirSettings) -> bool:
    return any(t.get("system") == settings.system("review") and t.get("code") == review_id
               for t in current.get("meta", {}).get("tag", []))
