"""Outcomes from the EHR: pathology DiagnosticReports of the patients who have AI results.

    dermgate outcomes pull-fhir

For each patient with an AI result (DICOM Patient ID + issuer, mapped to a FHIR
identifier system as for delivery), the Patient is found by identifier, then

    GET DiagnosticReport?subject=Patient/{id}&category={any of outcomes.fhir_pull.categories}
                         [&code={any of outcomes.fhir_pull.codes}]&date=ge{today - lookback_days}

Reports that are final, amended or corrected become outcomes (source
``outcomes.fhir_pull.source``, histopathology by default):

- diagnosis: the first ``conclusionCode`` SNOMED CT code in the mapping table
  (``outcomes.fhir_pull.snomed_map``, then ``fhir.class_snomed_codes`` and the
  built-in codes of integration/fhir/resources.py, read backwards), else the
  ``conclusion`` text or the code's text by the patterns of dermgate/outcomes.py
  (site patterns first: ``outcomes.fhir_pull.text_map``); a report naming none
  of the 7 classes, benign or malignant is counted as unmapped and skipped;
- date: effectiveDateTime (or effectivePeriod.start, else issued);
- accession number: the identifier typed ACSN (HL7 v2 0203), for linking;
- body site: the first specimen's collection.bodySite, for patient + body site linking;
- laboratory reference: the report's first other identifier, else its id.

Each becomes an outcome through :func:`dermgate.outcomes.record_outcome`, keyed
by the report's id, so pulling again changes nothing; links are audited there.
dermgate's own AI reports are never taken for outcomes.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlparse

from sqlalchemy import select

from audit.api import AuditEvent, EventType, Outcome as AuditOutcome
from dermgate.outcomes import DIAGNOSES, OutcomeError, OutcomeIn, diagnosis_from_text, record_outcome

SNOMED = "http://snomed.info/sct"
ACSN = "ACSN"
FINAL_STATUSES = ("final", "amended", "corrected", "appended")


def snomed_table(settings: Any) -> dict[str, str]:
    """SNOMED CT code -> class / benign / malignant: the built-in codes, the site's class codes, the pull map."""
    from integration.fhir.resources import CLASS_SNOMED
    table = {code: cls for cls, (code, _) in CLASS_SNOMED.items()}
    if settings.fhir is not None:
        table.update({code: cls for cls, code in settings.fhir.class_snomed_codes.items()})
    table.update(settings.outcomes.fhir_pull.snomed_map)
    bad = {k: v for k, v in table.items() if v not in DIAGNOSES}
    if bad:
        raise OutcomeError(f"outcomes.fhir_pull.snomed_map maps to unknown diagnoses: {bad}")
    return table


def report_diagnosis(report: dict[str, Any], snomed: dict[str, str], text_map: dict[str, str]) -> str | None:
    for concept in report.get("conclusionCode", []):
        for c in concept.get("coding", []):
            if c.get("system") == SNOMED and c.get("code") in snomed:
                return snomed[c["code"]]
    texts = [report.get("conclusion") or "", *[cc.get("text") or "" for cc in report.get("conclusionCode", [])],
             *[c.get("display") or "" for cc in report.get("conclusionCode", []) for c in cc.get("coding", [])]]
    for t in texts:
        dx = diagnosis_from_text(t, text_map) if t else None
        if dx:
            return dx
    return None


def report_date(report: dict[str, Any]) -> date | None:
    raw = report.get("effectiveDateTime") or (report.get("effectivePeriod") or {}).get("start") or report.get("issued")
    if not raw:
        return None
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00")).date() if "T" in raw else date.fromisoformat(raw[:10])
    except ValueError:
        return None


def _is_accession(identifier: dict[str, Any]) -> bool:
    return any(c.get("code") == ACSN for c in (identifier.get("type") or {}).get("coding", []))


def _body_site(client: Any, report: dict[str, Any]) -> str | None:
    for ref in report.get("specimen", []):
        r = (ref.get("reference") or "")
        if r.startswith("Specimen/"):
            try:
                specimen, _ = client.read("Specimen", r.split("/", 1)[1])
            except Exception:  # noqa: BLE001 - the body site is optional; the accession may still link
                continue
            site = (specimen.get("collection") or {}).get("bodySite") or {}
            text = site.get("text") or next((c.get("display") for c in site.get("coding", []) if c.get("display")), None)
            if text:
                return str(text)[:64]
    return None


def pull_fhir(rt: Any, *, actor: str, client: Any = None, today: date | None = None) -> dict[str, Any]:
    """Search the EHR for pathology reports of every patient with an AI result; record them as outcomes."""
    from dermgate.db import Instance, Job
    from dermgate.records import ImageRef
    from integration.fhir.channel import FhirChannel
    settings = rt.settings
    if settings.fhir is None or settings.fhir.base_url is None:
        raise OutcomeError("fhir.base_url is not set: nothing to pull from")
    pull = settings.outcomes.fhir_pull
    channel = FhirChannel.from_settings(settings.fhir, rt.audit)
    client = client or channel.client
    snomed = snomed_table(settings)
    since = (today or datetime.now(timezone.utc).date()) - timedelta(days=pull.lookback_days)
    host = urlparse(settings.fhir.fhir_base).netloc
    with rt.sessions() as s:
        insts = list(s.scalars(select(Instance).join(Job, Job.instance_id == Instance.id)
                               .where(Job.result.is_not(None))))
    patients: dict[tuple[str, str | None], ImageRef] = {}
    for inst in insts:
        patients.setdefault((inst.patient_id, inst.issuer_of_patient_id), ImageRef.from_object(inst))
    counts = {"patients": len(patients), "patients_not_in_ehr": 0, "reports": 0, "created": 0, "duplicates": 0,
              "linked": 0, "unlinked": 0, "unmapped": 0, "skipped_status": 0}
    ours = settings.fhir.system("report")
    try:
        for (patient_id, _), image in patients.items():
            try:
                matches = client.search_identifier("Patient", channel.patient_system(image), patient_id)
            except Exception:  # noqa: BLE001 - one patient's lookup failing must not stop the pull
                matches = []
            if len(matches) != 1:
                counts["patients_not_in_ehr"] += 1
                continue
            params = {"subject": f"Patient/{matches[0]['id']}", "date": f"ge{since.isoformat()}", "_count": "100"}
            if pull.categories:
                params["category"] = ",".join(pull.categories)
            if pull.codes:
                params["code"] = ",".join(pull.codes)
            for report in client.search_all("DiagnosticReport", params):
                counts["reports"] += 1
                if any(i.get("system") == ours for i in report.get("identifier", [])):
                    continue                                    # our own AI report
                if report.get("status") not in FINAL_STATUSES:
                    counts["skipped_status"] += 1
                    continue
                dx, when = report_diagnosis(report, snomed, pull.text_map), report_date(report)
                if dx is None or when is None:
                    counts["unmapped"] += 1
                    continue
                ids = report.get("identifier", [])
                accession = next((i.get("value") for i in ids if _is_accession(i)), None)
                lab = next((i.get("value") for i in ids if not _is_accession(i) and i.get("value")), None)
                item = OutcomeIn(diagnosis=dx, outcome_date=when, source=pull.source, accession_number=accession,
                                 patient_id=patient_id, body_site=_body_site(client, report),
                                 lab_reference=lab or f"DiagnosticReport/{report['id']}",
                                 note=(report.get("conclusion") or "")[:2000] or None,
                                 external_ref=f"fhir:{host}/DiagnosticReport/{report['id']}")
                rec = record_outcome(rt.sessions, rt.audit, item, actor=actor,
                                     window_days=settings.outcomes.link_window_days, text_map=pull.text_map)
                if not rec.created:
                    counts["duplicates"] += 1
                    continue
                counts["created"] += 1
                counts["linked" if rec.links else "unlinked"] += 1
    finally:
        channel.close()
    rt.audit.record(AuditEvent(event=EventType.OUTCOME, outcome=AuditOutcome.SUCCESS, actor=actor, action="R",
                               destination=settings.fhir.fhir_base, detail={"pull_fhir": counts}))
    return counts
