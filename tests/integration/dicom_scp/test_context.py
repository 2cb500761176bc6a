"""The clinical context a report needs, read from the DICOM header (integration/dicom_scp/context.py)."""

from __future__ import annotations

from pydicom.dataset import Dataset

from dermgate.demo import jpeg_to_dicom
from dermgate.records import ImageRef
from integration.dicom_scp.context import study_context, with_context


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "SCT", meaning
    return item


def test_offset_body_site_laterality_patient_and_orders_are_read() -> None:
    ds = Dataset()
    ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "Doe^Jane", "19800214", "F"
    ds.TimezoneOffsetFromUTC = "+0100"
    region = _code("53120007", "Upper limb")
    region.AnatomicRegionModifierSequence = [_code("24028007", "Right")]
    ds.AnatomicRegionSequence = [region]
    ds.AdmissionID = "V123"
    ds.AccessionNumber = "A1"
    request = Dataset()
    request.AccessionNumber, request.RequestedProcedureID = "A1", "RP9"
    request.PlacerOrderNumberImagingServiceRequest, request.FillerOrderNumberImagingServiceRequest = "P1", "F1"
    ds.ReferencedRequestSequence = [request]
    ctx = study_context(ds)
    assert (ctx.patient_name, ctx.patient_birth_date, ctx.timezone_offset) == ("Doe^Jane", "19800214", "+0100")
    assert (ctx.body_site_code, ctx.body_site_scheme, ctx.laterality) == ("53120007", "SCT", "R")
    assert ctx.admission_id == "V123"
    [order] = ctx.orders
    assert (order.placer_order_number, order.filler_order_number, order.requested_procedure_id) == ("P1", "F1", "RP9")


def test_missing_or_malformed_elements_are_left_out_and_accession_alone_is_an_order() -> None:
    ds = Dataset()
    ds.TimezoneOffsetFromUTC = "+2500"
    ds.ImageLaterality = "L"
    ds.AccessionNumber = "A2"
    ds.RequestedProcedureID = "RP2"
    ctx = study_context(ds)
    assert ctx.timezone_offset is None and ctx.body_site_code is None and ctx.laterality == "L"
    assert [(o.accession_number, o.requested_procedure_id) for o in ctx.orders] == [("A2", "RP2")]


def test_context_travels_in_payload_json_but_never_as_a_database_column() -> None:
    ds = jpeg_to_dicom(b"\xff\xd8\xff\xd9", 8, 8, "DEMO-0001", "1.2.3", 1, "lower extremity", "female", 40.0)
    image = ImageRef(sop_instance_uid="1.2.3.4", sop_class_uid="1.2", study_instance_uid="1.2.3",
                     series_instance_uid="1.2.3.5", patient_id="DEMO-0001", issuer_of_patient_id="DEMO-HOSPITAL",
                     accession_number="DEMO0001", study_date="20260312", study_time="101530", modality="DMS",
                     body_site="Lower limb", calling_ae="SCOPE")
    assert "context" not in image.to_json()
    rich = with_context(image, ds)
    assert rich.context is not None and rich.context.body_site_code == "61685007"
    assert rich.context.orders[0].placer_order_number == "PLC0001"
    assert ImageRef.from_json(rich.to_json()) == rich and ImageRef.from_json(rich.to_json()).context == rich.context
