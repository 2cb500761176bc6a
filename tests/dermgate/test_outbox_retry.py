"""``dermgate outbox retry``: once the retried deliveries succeed, the job reads ``delivered``."""

from __future__ import annotations

from pathlib import Path

import pytest

from dermgate.app import Runtime
from dermgate.cli import main
from dermgate.db import Instance, Job, JobState, OutboxItem, OutboxState
from dermgate.settings import Settings


def test_job_dead_lettered_in_delivery_reads_delivered_after_a_successful_outbox_retry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "dermgate.toml").write_text(f'fhir_bundle_dir = "{tmp_path / "bundles"}"\n')
    monkeypatch.setenv("DERMGATE_WORKDIR", str(work))
    rt = Runtime(Settings(workdir=work))
    with rt.sessions.begin() as s:
        inst = Instance(sop_instance_uid="1.2.3.4", sop_class_uid="1.2", study_instance_uid="1.2.3",
                        series_instance_uid="1.2.3.5", patient_id="P1", issuer_of_patient_id=None,
                        accession_number=None, study_date=None, study_time=None, modality="DMS", body_site=None,
                        calling_ae="SCOPE", transfer_syntax_uid="1.2.840.10008.1.2.4.50", sha256="0" * 64,
                        size=1, path="objects/x.dcm")
        s.add(inst)
        s.flush()
        job = Job(instance_id=inst.id, state=JobState.FAILED, correlation_id="c1", result={"top_class": "nv"},
                  outputs={"sc_path": "a"}, last_error="fhir-file: HTTP 503")
        s.add(job)
        s.flush()
        s.add(OutboxItem(job_id=job.id, channel="fhir-file", kind="report", business_key="1.2.3.4:report",
                         state=OutboxState.DEAD, payload={"business_key": "1.2.3.4:report", "bundle": {}}))
    assert main(["outbox", "retry", "--workdir", str(work)]) == 0
    assert rt.dispatcher().run_once() == 1
    with rt.sessions() as s:
        assert s.get(Job, job.id).state is JobState.DELIVERED
    capsys.readouterr()
    assert main(["jobs", "list", "--workdir", str(work)]) == 0
    assert "delivered" in capsys.readouterr().out
    rt.close()
