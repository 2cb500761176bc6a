"""The resources built for one image: R4-valid, stable across retries, saying what they must say."""

from __future__ import annotations

from io import BytesIO

import base64
import copy
import hashlib
from datetime import datetime, timezone
from typing import Any

import pytest

from inference.result import DISCLAIMER
from integration.fhir.channel import prepare_report_payload
from integration.fhir.pdf import render_report_pdf
from integration.fhir.resources import (
    CLASS_SNOMED,
    NOT_A_DIAGNOSIS,
    PATIENT_PLACEHOLDER,
    SNOMED,
    Review,
    ReviewDecision,
    build_review_update,
)
from integration.fhir.settings import FhirSettings, ProfileName
from tests.integration.fhir.data import cam_png, image_ref, synthetic_prediction
from tests.integration.fhir.peer import R4Schema

ISSUED = datetime(2026, 3, 12, 11, 0, tzinfo=timezone.utc)
PDF = b"%PDF-1.4 placeholder for builder tests"


AUTHOR = "Practitioner/dermgate-service"


def payload(profile: ProfileName = ProfileName.GENERIC_R4, **kw: Any) -> dict[str, Any]:
    extra = {"author_reference": AUTHOR} if profile is ProfileName.ORACLE_HEALTH else {}
    settings = FhirSettings(base_url="http://ehr.invalid/fhir/", profile=profile, **extra, **kw.pop("settings", {}))
    return prepare_report_payload(kw.pop("image", image_ref()), kw.pop("prediction", synthetic_prediction(64, 64)),
                                  cam_png(), settings, issued=ISSUED, pdf=kw.pop("pdf", PDF))


def resources(bundle: dict[str, Any], rtype: str) -> list[dict[str, Any]]:
    found = []
    for entry in bundle["entry"]:
        res = entry["resource"]
        found += [r for r in [res, *res.get("contained", [])] if r["resourceType"] == rtype]
    return found


@pytest.mark.parametrize("profile", list(ProfileName))
def test_every_profile_builds_an_r4_valid_bundle(profile: ProfileName, fhir_schema: R4Schema) -> None:
    fhir_schema.assert_valid(payload(profile)["bundle"])


@pytest.mark.parametrize("profile", list(ProfileName))
@pytest.mark.parametrize("kind", ["plain", "not-assessable", "low-confidence"])
def test_bundle_is_what_the_bundle_model_makes_of_it(profile: ProfileName, kind: str) -> None:
    """The builder skips validating the Bundle as a whole (its resources were validated one by one):
    the R4B Bundle model must turn it into exactly the same JSON."""
    import json

    from fhir.resources.R4B.bundle import Bundle
    prediction = synthetic_prediction(64, 64, assessable=kind != "not-assessable",
                                      low_confidence=kind == "low-confidence")
    bundle = payload(profile, prediction=prediction)["bundle"]
    assert json.dumps(Bundle.model_validate(bundle).model_dump(mode="json")) == json.dumps(bundle)


def test_schema_check_catches_a_bad_required_code_that_the_models_accept(fhir_schema: R4Schema) -> None:
    """fhir.resources does not check bindings; the R4 schema must (DiagnosticReport.status is required-bound)."""
    bundle = copy.deepcopy(payload()["bundle"])
    bundle["entry"][-1]["resource"]["status"] = "done"
    assert any("'done' is not one of" in e for e in fhir_schema.errors(bundle))


def test_bundle_is_identical_on_every_prepare_so_retries_are_conditional_creates_of_the_same_things() -> None:
    first, second = payload(), payload()
    assert first == second
    for entry in first["bundle"]["entry"]:
        assert entry["fullUrl"].startswith("urn:uuid:")
        assert entry["request"]["method"] == "POST"
        assert entry["request"]["ifNoneExist"].startswith("identifier=")


def test_generic_bundle_holds_device_observations_and_a_preliminary_report_referencing_them() -> None:
    bundle = payload()["bundle"]
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds == ["Device", "Observation", "Observation", "Observation", "Observation", "Media",
                     "DiagnosticReport"]
    urls = {e["fullUrl"] for e in bundle["entry"]}
    report = bundle["entry"][-1]["resource"]
    assert report["status"] == "preliminary"
    assert {r["reference"] for r in report["result"]} == {e["fullUrl"] for e in bundle["entry"][1:5]}
    for obs in resources(bundle, "Observation"):
        assert obs["device"]["reference"] in urls
        assert obs["method"]["text"]
        assert obs["subject"]["reference"] == PATIENT_PLACEHOLDER
    device = resources(bundle, "Device")[0]
    assert {"value": "ab" * 32} .items() <= device["identifier"][0].items()
    assert device["manufacturer"] and device["version"][0]["value"] == "0.0.1-test"


def test_report_says_it_is_not_a_diagnosis_and_codes_the_top_class_in_snomed() -> None:
    report = resources(payload()["bundle"], "DiagnosticReport")[0]
    assert report["conclusion"].startswith(NOT_A_DIAGNOSIS)
    assert DISCLAIMER in report["conclusion"]
    codes = {(c["system"], c["code"]) for c in report["conclusionCode"][0]["coding"]}
    assert (SNOMED, CLASS_SNOMED["nv"][0]) in codes


def test_report_carries_study_uid_accession_and_business_identifier() -> None:
    report = resources(payload()["bundle"], "DiagnosticReport")[0]
    values = {i["value"] for i in report["identifier"]}
    img = image_ref()
    assert {img.sop_instance_uid, f"urn:oid:{img.study_instance_uid}", img.accession_number} <= values


def test_presented_form_is_the_pdf_and_the_heatmap_png_is_media_with_matching_size_and_sha1() -> None:
    bundle = payload()["bundle"]
    report = resources(bundle, "DiagnosticReport")[0]
    [media] = resources(bundle, "Media")
    forms = {f["contentType"]: f for f in report["presentedForm"]}
    assert set(forms) == {"application/pdf"}
    media_url = next(e["fullUrl"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Media")
    assert report["media"][0]["link"] == {"reference": media_url}
    assert media["content"]["contentType"] == "image/png"
    for form in [*forms.values(), media["content"]]:
        data = base64.b64decode(form["data"])
        assert form["size"] == len(data)
        assert base64.b64decode(form["hash"]) == hashlib.sha1(data).digest()
    assert base64.b64decode(forms["application/pdf"]["data"]) == PDF


def test_class_observation_has_all_seven_probabilities_as_components_summing_to_100() -> None:
    obs = [o for o in resources(payload()["bundle"], "Observation")
           if o["code"]["coding"][0]["code"] == "predicted-class"][0]
    assert len(obs["component"]) == 7
    assert sum(c["valueQuantity"]["value"] for c in obs["component"]) == pytest.approx(100.0, abs=0.05)
    malignancy = [o for o in resources(payload()["bundle"], "Observation")
                  if o["code"]["coding"][0]["code"] == "malignancy-probability"][0]
    assert malignancy["valueQuantity"] == {"value": 28.0, "unit": "%", "system": "http://unitsofmeasure.org",
                                           "code": "%"}


def test_study_time_becomes_a_zoned_effective_datetime() -> None:
    report = resources(payload(settings={"local_timezone": "Europe/Berlin"})["bundle"], "DiagnosticReport")[0]
    assert report["effectiveDateTime"] == "2026-03-12T10:15:30+01:00"


def test_oracle_profile_never_sends_a_bare_date(fhir_schema: R4Schema) -> None:
    bundle = payload(ProfileName.ORACLE_HEALTH, image=image_ref(study_time=None))["bundle"]
    fhir_schema.assert_valid(bundle)
    for res in resources(bundle, "Observation") + resources(bundle, "DocumentReference"):
        for value in (res.get("effectiveDateTime"), res.get("issued"), res.get("date"),
                      res.get("context", {}).get("period", {}).get("start")):
            if value is not None:
                assert "T" in value, value
    generic = resources(payload(image=image_ref(study_time=None))["bundle"], "DiagnosticReport")[0]
    assert generic["effectiveDateTime"] == "2026-03-12"


def test_oracle_profile_sends_a_document_reference_with_one_pdf_clinical_note_category_and_practitioner_author(
        ) -> None:
    bundle = payload(ProfileName.ORACLE_HEALTH)["bundle"]
    assert not resources(bundle, "DiagnosticReport")
    assert not [e for e in bundle["entry"] if e["resource"]["resourceType"] == "Device"]
    doc = resources(bundle, "DocumentReference")[0]
    assert doc["docStatus"] == "preliminary"
    assert [c["attachment"]["contentType"] for c in doc["content"]] == ["application/pdf"]
    assert doc["category"][0]["coding"][0]["code"] == "clinical-note"
    assert doc["author"] == [{"reference": AUTHOR}]
    related = {r["reference"] for r in doc["context"]["related"]}
    assert related == {e["fullUrl"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"}


def test_epic_profile_sends_one_report_with_observations_and_device_contained() -> None:
    bundle = payload(ProfileName.EPIC)["bundle"]
    assert len(bundle["entry"]) == 1
    report = bundle["entry"][0]["resource"]
    contained = {r["id"]: r for r in report["contained"]}
    assert contained["device"]["resourceType"] == "Device"
    assert contained["media"]["resourceType"] == "Media" and report["media"][0]["link"] == {"reference": "#media"}
    assert {r["reference"] for r in report["result"]} == {f"#{k}" for k in contained if k not in ("device", "media")}


def test_not_assessable_image_gets_a_report_without_class_and_with_the_reason(fhir_schema: R4Schema) -> None:
    bundle = payload(prediction=synthetic_prediction(64, 64, assessable=False))["bundle"]
    fhir_schema.assert_valid(bundle)
    report = resources(bundle, "DiagnosticReport")[0]
    assert "conclusionCode" not in report
    assert "could not be assessed" in report["conclusion"]
    assert [o["code"]["coding"][0]["code"] for o in resources(bundle, "Observation")] == ["risk-category"]


def test_site_can_supply_snomed_codes_for_classes_without_a_confirmed_concept() -> None:
    prediction = synthetic_prediction(64, 64)
    prediction.probabilities.update({"nv": 0.05, "bkl": 0.65})
    plain = resources(payload(prediction=prediction)["bundle"], "DiagnosticReport")[0]
    assert SNOMED not in {c["system"] for c in plain["conclusionCode"][0]["coding"]}
    coded = resources(payload(prediction=prediction, settings={"class_snomed_codes": {"bkl": "123456789"}})["bundle"],
                      "DiagnosticReport")[0]
    assert {"system": SNOMED, "code": "123456789"}.items() <= coded["conclusionCode"][0]["coding"][0].items()


@pytest.mark.parametrize(("decision", "diagnosis", "status"), [
    (ReviewDecision.CONFIRM, None, "final"),
    (ReviewDecision.OVERRIDE, "mel", "final"),   # the first sign-off is final, with the clinician's diagnosis
])
def test_review_update_sets_status_interpreter_and_clinicians_diagnosis(
        decision: ReviewDecision, diagnosis: str | None, status: str, fhir_schema: R4Schema) -> None:
    settings = FhirSettings(base_url="http://ehr.invalid/fhir/")
    current = {**resources(payload()["bundle"], "DiagnosticReport")[0], "id": "r1",
               "subject": {"reference": "Patient/p1"}, "result": [{"reference": "Observation/o1"}],
               "meta": {"versionId": "1"}}
    review = Review(review_id="7", decision=decision, reviewer="Dr. Derm", diagnosis=diagnosis,
                    reviewed_at=ISSUED, comment="dermoscopy pattern")
    updated = build_review_update(current, review, settings)
    fhir_schema.assert_valid(updated)
    assert updated["status"] == status
    assert updated["resultsInterpreter"] == [{"display": "Dr. Derm"}]
    assert updated["conclusion"].startswith("Reviewed by Dr. Derm")
    assert NOT_A_DIAGNOSIS in updated["conclusion"]          # the AI's own words are kept after the review
    codes = {c["code"] for c in updated["conclusionCode"][0]["coding"]}
    assert (CLASS_SNOMED["mel"][0] in codes) == (decision is ReviewDecision.OVERRIDE)


def pdf_text(pdf: bytes) -> str:
    """The text on the page(s), as a PDF reader extracts it (pypdf)."""
    from pypdf import PdfReader
    return "\n".join(page.extract_text() for page in PdfReader(BytesIO(pdf)).pages)


def test_pdf_report_shows_findings_and_the_disclaimer_and_is_reproducible() -> None:
    pdf = render_report_pdf(image_ref(), synthetic_prediction(64, 64), cam_png(), issued=ISSUED)
    assert pdf.startswith(b"%PDF-")
    text = pdf_text(pdf)
    assert DISCLAIMER in text.replace("\n", " ")
    assert "Most likely class : Melanocytic nevus (62.0%)" in text
    assert "Risk category     : Medium" in text
    assert pdf == render_report_pdf(image_ref(), synthetic_prediction(64, 64), cam_png(), issued=ISSUED)


def test_pdf_of_a_low_confidence_result_says_so() -> None:
    pdf = render_report_pdf(image_ref(), synthetic_prediction(64, 64, low_confidence=True), cam_png(), issued=ISSUED)
    assert "LOW - interpret with particular care" in pdf_text(pdf)
