"""Model recall end to end: Orthanc gets an IOCM rejection note, the EHR's reports become entered-in-error.

Real peers: dcmtk storescu as the modality, Orthanc as the PACS, the Medplum
FHIR server on loopback as the EHR. Every step goes through the outbox (exactly
once: a second dispatcher pass and a second recall change nothing) and the
audit trail; the worklist (``dermgate jobs list``) shows the recall.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from audit.api import EventType
from dermgate.app import Runtime
from dermgate.cli import main as cli_main
from dermgate.db import Job, OutboxItem, OutboxState
from dermgate.recall import RecallError, recall_model
from dermgate.service import Service
from integration.fhir.settings import FhirSettings
from tests.dermgate.test_service_e2e import MODALITY_AE, PATIENTS, make_settings, make_sources, wait_for
from tests.integration.fhir.data import PATIENT_SYSTEM, patient_resource
from tests.peers.dcmtk import storescu
from tests.peers.orthanc import OrthancPeer

KOS = "1.2.840.10008.5.1.4.1.1.88.59"


def settle(rt: Runtime, kind: str, n: int, timeout: float = 120.0) -> list[OutboxItem]:
    deadline = time.monotonic() + timeout
    items: list[OutboxItem] = []
    while time.monotonic() < deadline:
        with rt.sessions() as s:
            items = list(s.scalars(select(OutboxItem).where(OutboxItem.kind == kind)))
        if len(items) == n and all(i.state is not OutboxState.PENDING for i in items):
            return items
        time.sleep(0.2)
    raise AssertionError(f"{kind} deliveries not settled: {[(i.channel, i.state, i.last_error) for i in items]}")


def test_recall_rejects_outputs_in_the_pacs_and_withdraws_reports_in_the_ehr(
        tmp_path: Path, orthanc: OrthancPeer, fhir: Any, fhir_schema: Any, capsys: pytest.CaptureFixture[str]) -> None:
    for pid in PATIENTS:
        fhir.create(patient_resource(pid))
    settings = make_settings(tmp_path / "work", orthanc)
    settings.fhir = FhirSettings.model_validate({"base_url": fhir.base_url,
                                                 "default_patient_identifier_system": PATIENT_SYSTEM})
    rt = Runtime(settings)
    service = Service(rt, roles={"scp", "worker", "dispatcher"})
    service.start()
    try:
        files = make_sources(tmp_path / "src")[:2]
        assert storescu("127.0.0.1", settings.dicom.port, files, calling=MODALITY_AE, called="DERMGATE",
                        options=["-xy", "-R"]).returncode == 0
        jobs = wait_for(rt, len(files), timeout=180)
        version = jobs[0].result["model"]["version"]
        out = recall_model(rt, version=version, reason="sensitivity under the floor at site A", actor="safety.officer")
        assert out["results"] == 2 and out["deliveries_queued"] == {"dicom:orthanc": 2, "fhir": 2}
        items = settle(rt, "recall", 4)
    finally:
        service.stop()
    assert all(i.state is OutboxState.SENT for i in items), [(i.channel, i.last_error) for i in items]

    for src, _job in zip(files, sorted(jobs, key=lambda j: j.id)):
        ds = pydicom.dcmread(src, stop_before_pixels=True)
        arrived = orthanc.study_instances(ds.StudyInstanceUID)
        notes = [i for i in arrived if i["SOPClassUID"] == KOS]
        assert len(notes) == 1, [i["SOPClassUID"] for i in arrived]
        note = notes[0]
        assert note["ConceptNameCodeSequence"][0]["CodeValue"] == "113037"
        assert note["ConceptNameCodeSequence"][0]["CodingSchemeDesignator"] == "DCM"
        assert note["PatientID"] == ds.PatientID and note["StudyInstanceUID"] == ds.StudyInstanceUID
        referenced = {inst["ReferencedSOPInstanceUID"]
                      for study in note["CurrentRequestedProcedureEvidenceSequence"]
                      for series in study["ReferencedSeriesSequence"] for inst in series["ReferencedSOPSequence"]}
        outputs = [i["SOPInstanceUID"] for i in arrived if i["SOPClassUID"] != KOS]
        assert referenced == set(outputs) and len(outputs) == 2       # the SC and the SR

        (pat,) = fhir.search("Patient", identifier=f"{PATIENT_SYSTEM}|{ds.PatientID}")
        (report,) = fhir.search("DiagnosticReport", subject=f"Patient/{pat['id']}")
        assert report["status"] == "entered-in-error" and "RECALLED" in report["conclusion"]
        assert fhir_schema.errors(report) == []
        for ref in report["result"]:
            assert fhir.read(ref["reference"])["status"] == "entered-in-error"

    # Exactly once: nothing left to do, and the same version cannot be recalled twice.
    with pytest.raises(RecallError):
        recall_model(rt, version=version, reason="again", actor="safety.officer")
    with rt.sessions() as s:
        assert all(j.recall_id == out["recall_id"] for j in s.scalars(select(Job)))
    recalls = [r.event for r in rt.audit.events() if r.event.event is EventType.MODEL_RECALL]
    assert len(recalls) == 1 + 2 and {e.patient_id for e in recalls} >= set(PATIENTS[:2])
    assert rt.audit.verify().ok
    rt.close()
    # The worklist shows the recall.
    assert cli_main(["jobs", "list", "--workdir", str(settings.workdir)]) == 0
    assert capsys.readouterr().out.count(f"RECALLED #{out['recall_id']}") == 2
