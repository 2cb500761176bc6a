"""End to end: images in by dcmtk storescu, outcomes in (CSV and the EHR), live performance out.

1. 29 committed HAM10000 samples go in over DICOM from two "devices"; the model
   classifies them; their histopathology truth is imported with
   ``dermgate outcomes import``; ``dermgate monitor report --json`` must give the
   figures that scikit-learn computes independently from the probabilities
   stored in the database.
2. Pathology DiagnosticReports on the loopback FHIR server (Medplum) are pulled
   for the patients with AI results and linked by accession number and by
   patient + body site; reports of other categories, preliminary ones and
   unreadable ones are not; a second pull changes nothing.
"""

from __future__ import annotations

import csv
from datetime import date
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from sklearn.metrics import roc_auc_score
from sqlalchemy import select

from audit.api import EventType
from dermgate.app import Runtime
from dermgate.db import Instance, Job, JobState, OutcomeLink
from dermgate.outcomes_fhir import pull_fhir
from dermgate.service import Service
from integration.fhir.settings import FhirSettings
from tests.dermgate.test_service_e2e import MODALITY_AE, make_settings, wait_for
from tests.integration.fhir.data import PATIENT_SYSTEM, patient_resource
from tests.peers.dcmtk import img2dcm, sample_jpeg, storescu

REPO = Path(__file__).resolve().parents[2]
MALIGNANT = {"mel", "bcc", "akiec"}
DEVICES = (("FotoFinder", "medicam 1000", "DERM-OPD-1"), ("Heine", "Delta 30", "DERM-WARD-2"))


def samples() -> list[tuple[str, str]]:
    """(jpeg name, dx) of every committed HAM10000 sample."""
    out = []
    with (REPO / "tests" / "data" / "samples" / "samples.csv").open() as fh:
        out += [(r["path"], r["dx"]) for r in csv.DictReader(fh)]
    with (REPO / "dermgate" / "samples" / "samples.csv").open() as fh:
        out += [(r["file"], r["dx"]) for r in csv.DictReader(fh)]
    return out


def make_source(folder: Path, i: int, jpeg: str, *, patient: str, accession: str, body_site: str = "",
                device: tuple[str, str, str] = DEVICES[0], sex: str = "F") -> Path:
    path = img2dcm(sample_jpeg(jpeg), folder / f"{i}.dcm", dermoscopic=True, patient_id=patient,
                   patient_name=f"Outcome^{i}", accession=accession)
    ds = pydicom.dcmread(path)
    ds.Manufacturer, ds.ManufacturerModelName, ds.StationName = device
    ds.PatientSex, ds.PatientAge = sex, f"{40 + i:03d}Y"
    if body_site:
        ds.BodyPartExamined = body_site
    ds.save_as(path)
    return path


def dermgate_cli(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DERMGATE_WORKDIR": str(workdir)}
    return subprocess.run([sys.executable, "-m", "dermgate.cli", *args, "--workdir", str(workdir)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


def run_images(rt: Runtime, files: list[Path]) -> list[Job]:
    service = Service(rt, roles={"scp", "worker", "dispatcher"})
    service.start()
    try:
        sent = storescu("127.0.0.1", rt.settings.dicom.port, files, calling=MODALITY_AE, called="DERMGATE",
                        options=["-xy", "-R"])
        assert sent.returncode == 0, sent.stderr
        jobs = wait_for(rt, len(files), timeout=300)
    finally:
        service.stop()
    assert all(j.state is JobState.DELIVERED for j in jobs), [j.last_error for j in jobs]
    return jobs


def test_monitor_report_figures_equal_an_independent_computation(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "work", None)
    rt = Runtime(settings)
    src = tmp_path / "src"
    src.mkdir()
    cases = samples()
    files = [make_source(src, i, jpeg, patient=f"MON-{i:03d}", accession=f"MACC{i:03d}", device=DEVICES[i % 2],
                         sex="MF"[i % 2]) for i, (jpeg, _) in enumerate(cases)]
    run_images(rt, files)
    truth = tmp_path / "outcomes.csv"
    with truth.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["accession_number", "diagnosis", "date", "source", "fitzpatrick"])
        for i, (_, dx) in enumerate(cases):
            w.writerow([f"MACC{i:03d}", dx, "2025-02-01", "histopathology", ["II", "III"][i % 2]])
        w.writerow(["NO-SUCH-ACC", "mel", "2025-02-01", "histopathology", ""])      # kept, unlinked
    rt.close()

    imported = dermgate_cli(settings.workdir, "outcomes", "import", str(truth), "--user", "pathology-import")
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout)["linked"] == len(cases)
    listed = dermgate_cli(settings.workdir, "outcomes", "list", "--unlinked", "--json")
    assert [o["accession_number"] for o in json.loads(listed.stdout)] == ["NO-SUCH-ACC"]
    out_dir = tmp_path / "report"
    reported = dermgate_cli(settings.workdir, "monitor", "report", "--json", "--out", str(out_dir))
    assert reported.returncode == 0, reported.stderr
    got: dict[str, Any] = json.loads(reported.stdout)

    # Independently: the probabilities the database holds, the truth from the CSV, scikit-learn.
    rt = Runtime(settings)
    with rt.sessions() as s:
        rows = {i.accession_number: j.result for j, i in s.execute(
            select(Job, Instance).join(Instance, Instance.id == Job.instance_id))}
    manifest = json.loads((REPO / "models" / "manifest.json").read_text())
    threshold = manifest["calibration"]["tta" if manifest["tta"]["enabled"] else "plain"]["referral_threshold"]
    y = np.array([dx in MALIGNANT for _, dx in cases], int)
    p = np.array([rows[f"MACC{i:03d}"]["malignancy_probability"] for i in range(len(cases))])
    referred = p >= threshold
    assert got["n_outcomes_linked"] == len(cases)
    assert got["auc_malignant"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert got["sensitivity"] == pytest.approx(referred[y == 1].mean(), abs=1e-12)
    assert got["specificity"] == pytest.approx((~referred[y == 0]).mean(), abs=1e-12)
    assert got["referral_confusion"] == {"tp": int((referred & (y == 1)).sum()), "fn": int((~referred & (y == 1)).sum()),
                                         "fp": int((referred & (y == 0)).sum()), "tn": int((~referred & (y == 0)).sum())}
    assert isinstance(got["alarms"], list)
    by_device = got["report"]["by"]["device"]
    assert sorted(by_device) == sorted(" / ".join(d) for d in DEVICES)
    assert sum(v["n"] for v in by_device.values()) == len(cases)
    assert set(got["report"]["by"]["fitzpatrick"]) == {"II", "III"}
    assert set(got["report"]["by"]["sex"]) == {"M", "F"}
    assert {f.name for f in out_dir.iterdir()} >= {"report.html", "roc.png", "reliability.png", "trend.png"}
    assert "Alarms" in (out_dir / "report.html").read_text()
    # Every link is in the audit trail, with the patient.
    links = [e for r in rt.audit.events() if (e := r.event).event is EventType.OUTCOME and e.detail.get("link")]
    assert len(links) == len(cases) and all(e.patient_id and e.patient_id.startswith("MON-") for e in links)
    rt.close()


def pathology_report(pid: str, *, category: str = "SP", status: str = "final", snomed: str | None = None,
                     conclusion: str = "", accession: str | None = None, specimen: str | None = None,
                     effective: str = "2025-01-20") -> dict[str, Any]:
    r: dict[str, Any] = {
        "resourceType": "DiagnosticReport", "status": status,
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": category}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "22637-3"}], "text": "Pathology report final diagnosis"},
        "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": effective,
        "identifier": [{"system": "urn:oid:1.2.3.4.5.lab", "value": f"H25-{abs(hash((pid, conclusion, snomed))) % 10**6}"}],
    }
    if accession:
        r["identifier"].append({"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                                     "code": "ACSN"}]}, "value": accession})
    if snomed:
        r["conclusionCode"] = [{"coding": [{"system": "http://snomed.info/sct", "code": snomed}]}]
    if conclusion:
        r["conclusion"] = conclusion
    if specimen:
        r["specimen"] = [{"reference": f"Specimen/{specimen}"}]
    return r


def test_fhir_pull_links_pathology_reports_from_the_ehr(tmp_path: Path, fhir: Any) -> None:
    patients = ("PULL-0001", "PULL-0002", "PULL-0003")
    pat_ids = {pid: fhir.create(patient_resource(pid))["id"] for pid in patients}
    settings = make_settings(tmp_path / "work", None)
    settings.fhir = FhirSettings.model_validate({"base_url": fhir.base_url,
                                                 "default_patient_identifier_system": PATIENT_SYSTEM})
    rt = Runtime(settings)
    src = tmp_path / "src"
    src.mkdir()
    files = [make_source(src, 0, "ISIC_0024309.jpg", patient=patients[0], accession="PACC0"),
             make_source(src, 1, "ISIC_0024333.jpg", patient=patients[1], accession="PACC1", body_site="BACK"),
             make_source(src, 2, "ISIC_0024452.jpg", patient=patients[2], accession="PACC2")]
    run_images(rt, files)     # our own AI reports are now in the EHR too: they must not become outcomes
    assert len(fhir.search("DiagnosticReport")) == 3

    spec = fhir.create({"resourceType": "Specimen", "subject": {"reference": f"Patient/{pat_ids[patients[1]]}"},
                        "collection": {"bodySite": {"text": "Back"}}})
    fhir.create(pathology_report(pat_ids[patients[0]], snomed="93655004", accession="PACC0",
                                 conclusion="Malignant melanoma, superficial spreading, Breslow 0.5 mm"))
    fhir.create(pathology_report(pat_ids[patients[1]], category="PAT", conclusion="Compound melanocytic naevus.",
                                 specimen=spec["id"]))
    fhir.create(pathology_report(pat_ids[patients[2]], category="LAB", conclusion="Melanoma"))        # not pathology
    fhir.create(pathology_report(pat_ids[patients[2]], status="preliminary", conclusion="Basal cell carcinoma"))
    fhir.create(pathology_report(pat_ids[patients[2]], conclusion="Chronic dermatitis, no atypia"))  # unmapped

    counts = pull_fhir(rt, actor="ehr-pull", today=date(2025, 6, 1))
    assert counts["patients"] == 3 and counts["created"] == 2 and counts["linked"] == 2, counts
    assert counts["unmapped"] == 1 and counts["skipped_status"] == 1
    with rt.sessions() as s:
        got = {(i.patient_id, lk.method) for lk, i in s.execute(
            select(OutcomeLink, Instance).join(Job, Job.id == OutcomeLink.job_id)
            .join(Instance, Instance.id == Job.instance_id))}
    assert got == {(patients[0], "accession"), (patients[1], "patient_body_site")}
    again = pull_fhir(rt, actor="ehr-pull", today=date(2025, 6, 1))
    assert again["created"] == 0 and again["duplicates"] == 2
    from dermgate.outcomes import list_outcomes
    dx = {o["patient_id"]: (o["diagnosis"], o["source"], o["date"]) for o in list_outcomes(rt.sessions)}
    assert dx == {patients[0]: ("mel", "histopathology", "2025-01-20"),
                  patients[1]: ("nv", "histopathology", "2025-01-20")}
    rt.close()
