"""End to end: dcmtk storescu -> SCP -> worker (real model) -> SC + SR in Orthanc, audited, no PHI in logs.

Real peers throughout: dcmtk as the modality, Orthanc as the PACS, the
committed ONNX model, the real encrypted audit trail, SQLite on disk.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import func, select

from dermgate.app import Runtime
from dermgate.db import Job, JobState, OutboxItem, OutboxState
from dermgate.service import Service
from dermgate.settings import AllowedCaller, Destination, DicomSettings, ModelSettings, Settings, WorkerSettings
from tests.peers.dcmtk import img2dcm, sample_jpeg, storescu
from tests.peers.orthanc import OrthancPeer, free_port

MODALITY_AE = "SCOPE-E2E"
# Test patients: their identifiers must never reach an application log line.
PATIENTS = ("E2E-PAT-7781", "E2E-PAT-7782", "E2E-PAT-7783")
SAMPLES = ("ISIC_0024309.jpg", "ISIC_0024333.jpg", "ISIC_0024452.jpg")


def model_dir() -> Path | None:
    override = os.environ.get("DERMGATE_TEST_MODEL_DIR")
    return Path(override) if override else None


def make_settings(workdir: Path, orthanc: OrthancPeer | None, **worker: float) -> Settings:
    dests = [Destination(name="orthanc", ae_title=orthanc.aet, host=orthanc.host, port=orthanc.dicom_port)] \
        if orthanc else []
    return Settings(workdir=workdir,
                    dicom=DicomSettings(port=free_port(), ae_title="DERMGATE",
                                        allowed_callers=[AllowedCaller(ae_title=MODALITY_AE, hosts=["127.0.0.1"])],
                                        destinations=dests, min_free_bytes=16 * 1024 * 1024),
                    model=ModelSettings(path=model_dir(), threads=2),
                    worker=WorkerSettings(poll_interval_s=0.05, **worker))


def make_sources(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [img2dcm(sample_jpeg(name), folder / f"{i}.dcm", dermoscopic=True, patient_id=pid,
                    patient_name=f"Testperson^{pid[-4:]}", accession=f"ACC{i}")
            for i, (name, pid) in enumerate(zip(SAMPLES, PATIENTS))]


def wait_for(rt: Runtime, n: int, timeout: float = 120.0) -> list[Job]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with rt.sessions() as s:
            jobs = list(s.scalars(select(Job)))
        if len(jobs) == n and all(j.state in (JobState.DELIVERED, JobState.FAILED) for j in jobs):
            return jobs
        time.sleep(0.2)
    raise AssertionError(f"jobs not finished: {[(j.id, j.state, j.last_error) for j in jobs]}")


def test_images_from_a_modality_arrive_in_the_pacs_as_sc_and_sr_audited_without_phi_in_logs(
        tmp_path: Path, orthanc: OrthancPeer) -> None:
    from dermgate import logs
    settings = make_settings(tmp_path / "work", orthanc)
    logs.configure("DEBUG", settings.log_dir / "dermgate.log")
    rt = Runtime(settings)
    service = Service(rt, roles={"scp", "worker", "dispatcher"})
    service.start()
    try:
        files = make_sources(tmp_path / "src")
        sent = storescu("127.0.0.1", settings.dicom.port, files, calling=MODALITY_AE, called="DERMGATE",
                        options=["-xy", "-R"])
        assert sent.returncode == 0, sent.stderr
        jobs = wait_for(rt, len(files))
    finally:
        service.stop()
    assert all(j.state is JobState.DELIVERED for j in jobs), [j.last_error for j in jobs]
    import pydicom
    for src in files:
        ds = pydicom.dcmread(src, stop_before_pixels=True)
        arrived = orthanc.study_instances(ds.StudyInstanceUID)
        classes = sorted(i["SOPClassUID"] for i in arrived)
        assert classes == ["1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88.34"], classes
        assert all(i["PatientID"] == ds.PatientID for i in arrived)
    with rt.sessions() as s:
        assert s.scalar(select(func.count()).select_from(OutboxItem).where(
            OutboxItem.state == OutboxState.SENT)) == len(files)
    # The audit trail holds who/what/patient for every step and verifies intact.
    events = [r.event for r in rt.audit.events()]
    kinds = {e.event.value for e in events}
    assert {"dicom.association", "dicom.store", "inference.classified", "dicom.forward"} <= kinds
    assert {e.patient_id for e in events if e.event.value == "dicom.store"} == set(PATIENTS)
    assert rt.audit.verify().ok
    rt.close()
    # No PHI in application logs: not the ids, not the names.
    log_text = (settings.log_dir / "dermgate.log").read_text()
    assert log_text.count("\n") > 5
    for pid in PATIENTS:
        assert pid not in log_text and f"Testperson^{pid[-4:]}" not in log_text
    audit_bytes = b"".join(p.read_bytes() for p in settings.audit_dir.rglob("*") if p.is_file())
    assert PATIENTS[0].encode() not in audit_bytes   # encrypted at rest


def test_a_worker_killed_mid_batch_resumes_and_no_job_completes_twice(tmp_path: Path) -> None:
    """kill -9 a worker process while it holds leases; a new worker finishes every job exactly once."""
    settings = make_settings(tmp_path / "work", None, lease_seconds=2.0, batch_size=2)
    rt = Runtime(settings)
    scp = Service(rt, roles={"scp"})
    scp.start()
    try:
        files = make_sources(tmp_path / "src")
        assert storescu("127.0.0.1", settings.dicom.port, files, calling=MODALITY_AE, called="DERMGATE",
                        options=["-xy", "-R"]).returncode == 0
    finally:
        scp.stop()
    env = {**os.environ, "DERMGATE_WORKDIR": str(settings.workdir), "DERMGATE_WORKER__LEASE_SECONDS": "2",
           "DERMGATE_WORKER__BATCH_SIZE": "1"}
    if model_dir():
        env["DERMGATE_MODEL__PATH"] = str(model_dir())
    cmd = [sys.executable, "-m", "dermgate.cli", "serve", "--roles", "worker"]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, held = time.monotonic() + 60, False
    while not held and time.monotonic() < deadline:     # kill once it holds a lease on some job
        with rt.sessions() as s:
            held = bool(s.scalar(select(func.count()).select_from(Job).where(Job.lease_owner.is_not(None))))
        time.sleep(0.02)
    first.kill()
    assert held, "the first worker never took a lease: the kill -9 tested nothing"
    first.wait()
    second = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        jobs = wait_for(rt, len(files), timeout=120)
    finally:
        second.terminate()
        second.wait(30)
    assert all(j.state is JobState.DELIVERED for j in jobs)
    assert all(j.completed_at is not None for j in jobs)
    with rt.sessions() as s:   # SIGTERM released every lease
        assert s.scalar(select(func.count()).select_from(Job).where(Job.lease_owner.is_not(None))) == 0
    derived = sorted(p.name for p in (settings.store_dir / "derived").rglob("*.dcm"))
    assert derived == sorted(["sc.dcm", "sr.dcm"] * len(files))
    rt.close()


def test_one_correlation_id_follows_an_image_from_the_scp_to_delivery(tmp_path: Path) -> None:
    """Operators trace one image across SCP, worker and dispatcher log lines by its correlation id."""
    import json

    from dermgate import logs
    settings = make_settings(tmp_path / "work", None)
    settings.fhir_bundle_dir = settings.workdir / "bundles"
    logs.configure("INFO", settings.log_dir / "dermgate.log")
    rt = Runtime(settings)
    service = Service(rt, roles={"scp", "worker", "dispatcher"})
    service.start()
    try:
        files = make_sources(tmp_path / "src")[:1]
        assert storescu("127.0.0.1", settings.dicom.port, files, calling=MODALITY_AE, called="DERMGATE",
                        options=["-xy", "-R"]).returncode == 0
        (job,) = wait_for(rt, 1)
    finally:
        service.stop()
        rt.close()
    lines = [json.loads(l) for l in (settings.log_dir / "dermgate.log").read_text().splitlines() if l.startswith("{")]
    events = {line["event"] for line in lines if line.get("correlation_id") == job.correlation_id}
    assert {"cstore", "classified", "rendered", "delivered"} <= events
