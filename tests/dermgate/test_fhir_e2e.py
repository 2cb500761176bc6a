"""End to end into the EHR: dcmtk storescu -> SCP -> model -> FHIR server on loopback.

Real peers: dcmtk as the modality, the Medplum FHIR R4 server (validating on
create) with a SMART token endpoint that checks our signed client assertion.
Faults on the way: 500s and a connection cut after the server committed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import select

from audit.api import EventType
from dermgate.app import Runtime
from dermgate.db import JobState, OutboxItem, OutboxState
from dermgate.review import submit_review
from dermgate.service import Service
from integration.fhir.settings import FhirSettings
from tests.dermgate.test_service_e2e import MODALITY_AE, PATIENTS, make_settings, make_sources, wait_for
from tests.integration.fhir.data import PATIENT_SYSTEM, patient_resource
from tests.integration.fhir.peer import TEST_CLIENT_ID
from tests.peers.dcmtk import storescu


def wait_outbox_settled(rt: Runtime, timeout: float = 90.0) -> list[OutboxItem]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with rt.sessions() as s:
            items = list(s.scalars(select(OutboxItem)))
        if items and all(i.state is not OutboxState.PENDING for i in items):
            return items
        time.sleep(0.2)
    raise AssertionError(f"outbox not settled: {[(i.id, i.state, i.attempts, i.last_error) for i in items]}")


def test_each_image_becomes_exactly_one_valid_report_despite_faults_and_review_finalises_it(
        tmp_path: Path, fhir: Any, smart_key: Any, fhir_schema: Any) -> None:
    for pid in PATIENTS:
        fhir.create(patient_resource(pid))
    fhir.configure(require_auth=True)
    key = smart_key()
    # The EHR fails twice, then commits a transaction but the connection drops before we hear back.
    fhir.fault("status", status=500, times=2, method="POST")
    fhir.fault("cut-after-commit", times=1, method="POST")
    settings = make_settings(tmp_path / "work", None, backoff_base_s=0.05, backoff_max_s=0.3)
    settings.fhir = FhirSettings.model_validate({
        "base_url": fhir.base_url, "token_url": fhir.token_url, "client_id": TEST_CLIENT_ID,
        "private_key_file": str(key), "default_patient_identifier_system": PATIENT_SYSTEM,
        "timeouts": {"connect_s": 2.0, "read_s": 10.0, "write_s": 10.0, "pool_s": 2.0}})
    rt = Runtime(settings)
    service = Service(rt, roles={"scp", "worker", "dispatcher"})
    service.start()
    try:
        files = make_sources(tmp_path / "src")
        assert storescu("127.0.0.1", settings.dicom.port, files, calling=MODALITY_AE, called="DERMGATE",
                        options=["-xy", "-R"]).returncode == 0
        jobs = wait_for(rt, len(files), timeout=180)
        assert all(j.state is JobState.DELIVERED for j in jobs), [j.last_error for j in jobs]

        for src in files:
            ds = pydicom.dcmread(src, stop_before_pixels=True)
            (pat,) = fhir.search("Patient", identifier=f"{PATIENT_SYSTEM}|{ds.PatientID}")
            reports = fhir.search("DiagnosticReport", subject=f"Patient/{pat['id']}")
            assert len(reports) == 1, f"{len(reports)} reports for one image"
            report = reports[0]
            assert report["status"] == "preliminary"
            assert fhir_schema.errors(report) == []
            assert [a["contentType"] for a in report["presentedForm"]] == ["application/pdf"]
            assert fhir.read(report["media"][0]["link"]["reference"])["content"]["contentType"] == "image/png"
            assert "not a diagnosis" in report["conclusion"].lower()
            assert any(i["value"] == f"urn:oid:{ds.StudyInstanceUID}" for i in report.get("identifier", []))
            for ref in report["result"]:
                obs = fhir.read(ref["reference"])
                assert fhir_schema.errors(obs) == [] and obs["subject"]["reference"] == f"Patient/{pat['id']}"

        # A clinician confirms one result: the report becomes final through the same outbox.
        sop = str(pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID)
        submit_review(rt, sop, reviewer="Dr. Derm", decision="confirm", diagnosis=None, comment="agree")
        items = wait_outbox_settled(rt)
    finally:
        service.stop()
    assert all(i.state is OutboxState.SENT for i in items), [(i.kind, i.last_error) for i in items]
    ds0 = pydicom.dcmread(files[0], stop_before_pixels=True)
    (pat,) = fhir.search("Patient", identifier=f"{PATIENT_SYSTEM}|{ds0.PatientID}")
    (report,) = fhir.search("DiagnosticReport", subject=f"Patient/{pat['id']}")
    assert report["status"] == "final"
    assert {fhir.read(r["reference"])["status"] for r in report["result"]} == {"final"}   # Observations follow
    # Every attempt (failed ones included) is in the audit trail.
    attempts = [r.event for r in rt.audit.events() if r.event.event is EventType.FHIR_DELIVERY]
    assert len(attempts) >= len(files) + 1 + 3
    assert any(e.outcome.value != "0" for e in attempts)
    rt.close()
