"""The clinical context of one image, read from its DICOM header for the reports.

What the identifiers in :class:`~dermgate.records.ImageRef` do not say and a
report needs: the patient's name and birth date (two identifiers on the
printout), the Timezone Offset From UTC (0008,0201) of the study's local
date/time, the body site as a code with its laterality (Anatomic Region
Sequence, PS3.3 C.8.30 / C.7.6.16), the encounter (Admission ID) and the
orders the image answers (Accession Number, Requested Procedure ID, the
Referenced Request Sequence (0040,A370) with placer/filler order numbers).

Never raises: an unreadable element is left out, the report goes without it.
"""

from __future__ import annotations

from dataclasses import replace
from pydicom.dataset import Dataset

from dermgate.records import ImageRef, OrderRef, StudyContext

# SNOMED CT laterality qualifiers (DICOM CID 244 Laterality) and DICOM's letters for them.
LATERALITY_SNOMED = {"7771000": "L", "24028007": "R", "51440002": "B"}
LATERALITY_CODES = {"L": ("7771000", "Left"), "R": ("24028007", "Right"), "B": ("51440002", "Bilateral")}


def _text(ds: Dataset, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - a malformed element is left out
        return None
    if value is None or value == "":
        return None
    text = str(value).strip()
    return text or None


def _first(ds: Dataset, keyword: str) -> Dataset | None:
    try:
        seq = ds.get(keyword)
        return seq[0] if seq else None
    except Exception:  # noqa: BLE001
        return None


def _laterality(ds: Dataset, region: Dataset | None) -> str | None:
    modifier = _first(region, "AnatomicRegionModifierSequence") if region is not None else None
    if modifier is not None:
        side = LATERALITY_SNOMED.get(_text(modifier, "CodeValue") or "")
        if side:
            return side
    for keyword in ("ImageLaterality", "Laterality"):
        side = (_text(ds, keyword) or "").upper()
        if side in ("L", "R", "B"):
            return side
    return None


def _orders(ds: Dataset, accession: str | None, requested_procedure_id: str | None) -> tuple[OrderRef, ...]:
    out: list[OrderRef] = []
    try:
        items = list(ds.get("ReferencedRequestSequence") or [])
    except Exception:  # noqa: BLE001
        items = []
    for item in items:
        order = OrderRef(accession_number=_text(item, "AccessionNumber"),
                         requested_procedure_id=_text(item, "RequestedProcedureID"),
                         placer_order_number=_text(item, "PlacerOrderNumberImagingServiceRequest"),
                         filler_order_number=_text(item, "FillerOrderNumberImagingServiceRequest"),
                         study_instance_uid=_text(item, "StudyInstanceUID"))
        if any((order.accession_number, order.requested_procedure_id, order.placer_order_number,
                order.filler_order_number)):
            out.append(order)
    if not out and (accession or requested_procedure_id):
        out.append(OrderRef(accession_number=accession, requested_procedure_id=requested_procedure_id))
    return tuple(out)


def study_context(ds: Dataset) -> StudyContext:
    region = _first(ds, "AnatomicRegionSequence")
    request = _first(ds, "RequestAttributesSequence")
    requested_procedure_id = _text(ds, "RequestedProcedureID") or (
        _text(request, "RequestedProcedureID") if request is not None else None)
    birth = _text(ds, "PatientBirthDate")
    return StudyContext(
        patient_name=_text(ds, "PatientName"),
        patient_birth_date=birth if birth and len(birth) == 8 and birth.isdigit() else None,
        patient_sex=_text(ds, "PatientSex"),
        timezone_offset=_offset(_text(ds, "TimezoneOffsetFromUTC")),
        body_site_code=_text(region, "CodeValue") if region is not None else None,
        body_site_scheme=_text(region, "CodingSchemeDesignator") if region is not None else None,
        body_site_meaning=_text(region, "CodeMeaning") if region is not None else None,
        laterality=_laterality(ds, region),
        admission_id=_text(ds, "AdmissionID"),
        requested_procedure_id=requested_procedure_id,
        orders=_orders(ds, _text(ds, "AccessionNumber"), requested_procedure_id),
    )


def _offset(value: str | None) -> str | None:
    """A valid "+HHMM"/"-HHMM" offset (PS3.3 C.12.1.1.8), or None."""
    if not value or len(value) != 5 or value[0] not in "+-" or not value[1:].isdigit():
        return None
    hours, minutes = int(value[1:3]), int(value[3:5])
    return value if hours <= 14 and minutes < 60 else None


def with_context(image: ImageRef, ds: Dataset) -> ImageRef:
    """The image reference with its clinical context (the worker calls this after reading the object)."""
    try:
        return replace(image, context=study_context(ds))
    except Exception:  # noqa: BLE001 - context is best effort, never a reason to fail a job
        return image
