"""Failure isolation: a failing or hung EHR never stops DICOM intake or PACS forwarding,
and the outbox's bookkeeping (leases, fences, attempts) says what really happened.

Real peers: dcmtk as the modality, Orthanc as the PACS, the loopback FHIR server as the
EHR (with its fault hooks), the real SCP, store and SQLite database.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update
from structlog.testing import capture_logs

from dermgate.app import Runtime
from dermgate.db import Job, JobState, OutboxItem, OutboxState, create_schema, make_engine, make_sessionmaker
from dermgate.pipeline import Dispatcher
from dermgate.service import Service
from dermgate.settings import ApiSettings, WorkerSettings
from integration.dicom_scp.forward import DicomForwardChannel
from integration.fhir.channel import FhirChannel
from integration.fhir.settings import FhirSettings
from tests.dermgate.test_service_e2e import MODALITY_AE, make_settings, make_sources
from tests.integration.fhir.data import ISSUER, PATIENT_SYSTEM, cam_png, image_ref, patient_resource, synthetic_prediction
from tests.integration.fhir.peer import TEST_CLIENT_ID, free_port
from tests.peers.audit import ListAudit
from tests.peers.dcmtk import storescu
from tests.peers.orthanc import OrthancPeer


def poll(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    """Wait for ``condition()`` to be truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def closed_port() -> int:
    """A loopback port nobody listens on (bound a moment ago, then freed)."""
    return free_port()


def test_an_ehr_token_outage_leaves_the_scp_ready_and_storing(tmp_path: Path, smart_key: Any) -> None:
    """SCP + API pod with SMART auth configured and the EHR's token endpoint down: /readyz stays 200
    (the EHR is checked only where the dispatcher runs) and C-STORE still answers Success."""
    dead = f"http://127.0.0.1:{closed_port()}"
    settings = make_settings(tmp_path / "work", None)
    settings.api = ApiSettings(port=free_port())
    settings.fhir = FhirSettings.model_validate({
        "base_url": f"{dead}/fhir/R4/", "token_url": f"{dead}/oauth2/token", "client_id": TEST_CLIENT_ID,
        "private_key_file": str(smart_key()), "default_patient_identifier_system": PATIENT_SYSTEM})
    rt = Runtime(settings)
    service = Service(rt, roles={"scp", "api"})
    service.start()
    try:
        url = f"http://127.0.0.1:{settings.api.port}/readyz"

        def answered() -> httpx.Response | None:
            try:
                return httpx.get(url, timeout=10)
            except httpx.TransportError:
                return None
        ready = poll(answered, 30, "the API to answer")
        assert ready.status_code == 200, ready.json()
        assert "fhir_token" not in ready.json()["checks"]
        files = make_sources(tmp_path / "src")[:1]
        sent = storescu("127.0.0.1", settings.dicom.port, files, calling=MODALITY_AE, called="DERMGATE",
                        options=["-xy", "-R"])
        assert sent.returncode == 0, sent.stderr
        with rt.sessions() as s:
            assert [j.state for j in s.scalars(select(Job))] == [JobState.RECEIVED]
        assert httpx.get(url, timeout=10).status_code == 200
    finally:
        service.stop()
        rt.close()


def test_a_hung_ehr_does_not_hold_up_pacs_forwarding(tmp_path: Path, orthanc: OrthancPeer, fhir: Any) -> None:
    """Every FHIR request hangs for 20 s; the SC + SR of every image still reach Orthanc at once."""
    fhir.create(patient_resource("E2E-PAT-7781"))
    fhir.fault("delay", delay_ms=20_000, times=1000)
    settings = make_settings(tmp_path / "work", orthanc, backoff_base_s=0.05, backoff_max_s=0.2)
    settings.fhir = FhirSettings.model_validate({
        "base_url": fhir.base_url, "default_patient_identifier_system": PATIENT_SYSTEM,
        "timeouts": {"connect_s": 2.0, "read_s": 30.0, "write_s": 5.0, "pool_s": 2.0}})
    rt = Runtime(settings)
    service = Service(rt, roles={"scp", "worker", "dispatcher"})
    service.start()
    try:
        files = make_sources(tmp_path / "src")
        assert storescu("127.0.0.1", settings.dicom.port, files, calling=MODALITY_AE, called="DERMGATE",
                        options=["-xy", "-R"]).returncode == 0

        def rows(channel_prefix: str) -> list[OutboxItem]:
            with rt.sessions() as s:
                return list(s.scalars(select(OutboxItem).where(OutboxItem.channel.startswith(channel_prefix))))
        poll(lambda: len(rows("dicom:")) == len(files), 120, "every image to be rendered")
        rendered_at = time.monotonic()
        poll(lambda: all(r.state is OutboxState.SENT for r in rows("dicom:")), 15,
             "the PACS deliveries while the EHR hangs")
        assert time.monotonic() - rendered_at < 15
        assert all(r.state is OutboxState.PENDING for r in rows("fhir")), "the EHR answered: nothing was hung"
    finally:
        fhir.reset()
        service.stop(timeout=2)
        rt.close()
    import pydicom
    for src in files:
        uid = pydicom.dcmread(src, stop_before_pixels=True).StudyInstanceUID
        assert len(orthanc.study_instances(uid)) == 2


def test_a_failing_delivery_dead_letters_after_delivery_max_attempts(tmp_path: Path) -> None:
    """A PACS that refuses connections: retried with back-off, dead after exactly
    ``worker.delivery_max_attempts`` tries (the number docs/operations.md gives)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    create_schema(engine)
    sessions = make_sessionmaker(engine)
    audit = ListAudit()
    channel = DicomForwardChannel("pacs", "PACS", "127.0.0.1", closed_port(), base_dir=tmp_path, audit=audit,
                                  connection_timeout=2.0)
    (tmp_path / "sc.dcm").write_bytes(next(iter(make_sources(tmp_path / "src"))).read_bytes())
    cfg = WorkerSettings(delivery_max_attempts=3, max_attempts=1, backoff_base_s=0.01, backoff_max_s=0.02)
    with sessions.begin() as s:
        s.add(OutboxItem(channel=channel.name, business_key="k", payload={"files": ["sc.dcm"]}))
    dispatcher = Dispatcher(sessions, {channel.name: channel}, cfg, audit)

    def settled() -> OutboxItem | None:
        dispatcher.run_once()
        with sessions() as s:
            item = s.scalar(select(OutboxItem))
        return item if item is not None and item.state is OutboxState.DEAD else None
    item = poll(settled, 30, "the dead letter", every=0.03)
    assert item.attempts == 3
    assert f"PACS@127.0.0.1:{channel.port}" in (item.last_error or "")
    engine.dispose()


def test_a_delivery_whose_lease_was_taken_over_is_not_recorded_or_logged_as_ours(
        tmp_path: Path, fhir: Any) -> None:
    """The EHR is slow; meanwhile another dispatcher takes the row over (our lease lapsed). Our
    attempt must not mark the row sent, nor the job delivered, nor log "delivered"."""
    fhir.create(patient_resource())
    fhir.fault("delay", delay_ms=2_000, times=1)
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    create_schema(engine)
    sessions = make_sessionmaker(engine)
    audit = ListAudit()
    settings = FhirSettings(base_url=fhir.base_url, patient_identifier_systems={ISSUER: PATIENT_SYSTEM},
                            timeouts={"connect_s": 2.0, "read_s": 10.0, "write_s": 5.0, "pool_s": 2.0})
    channel = FhirChannel.from_settings(settings, audit)
    payload = channel.prepare(image_ref(), synthetic_prediction(64, 64), cam_png(), pdf=b"%PDF-1.4 test")
    with sessions.begin() as s:
        from dermgate.db import Instance
        inst = Instance(sop_instance_uid="1.2.3", sop_class_uid="1.2", study_instance_uid="1.2.3.4",
                        series_instance_uid="1.2.3.5", patient_id="MRN-0001", issuer_of_patient_id=None,
                        accession_number=None, study_date=None, study_time=None, modality=None, body_site=None,
                        calling_ae="X", transfer_syntax_uid="1.2.840.10008.1.2.1", sha256="0" * 64, size=1,
                        path="x")
        s.add(inst)
        s.flush()
        job = Job(instance_id=inst.id, state=JobState.RENDERED, correlation_id="c1")
        s.add(job)
        s.flush()
        s.add(OutboxItem(job_id=job.id, channel="fhir", business_key="k", payload=payload))
    dispatcher = Dispatcher(sessions, {"fhir": channel}, WorkerSettings(), audit)
    with capture_logs() as logs:
        worker = threading.Thread(target=dispatcher.run_once)
        worker.start()

        def leased() -> bool:
            with sessions() as s:
                return s.scalar(select(OutboxItem.lease_owner)) == dispatcher.owner
        poll(leased, 10, "the dispatcher's claim", every=0.02)
        with sessions.begin() as s:   # another dispatcher takes the row over
            s.execute(update(OutboxItem).values(lease_owner="dispatch-other"))
        worker.join(30)
    assert not worker.is_alive()
    with sessions() as s:
        item = s.scalar(select(OutboxItem))
        job_state = s.scalar(select(Job.state))
    assert item is not None and item.state is OutboxState.PENDING and item.lease_owner == "dispatch-other"
    assert job_state is JobState.RENDERED
    events = [e["event"] for e in logs]
    assert "delivered" not in events and "delivery_lease_lost" in events
    channel.close()
    engine.dispose()


@pytest.mark.parametrize("bound_s, lease_s, batch", [(700.0, 120.0, 8), (10.0, 120.0, 8), (0.0, 120.0, 8)])
def test_the_outbox_lease_covers_every_claimed_delivery_at_the_channels_worst_case(
        bound_s: float, lease_s: float, batch: int, tmp_path: Path) -> None:
    """Rows per claim times the channel's worst-case delivery never exceeds the lease."""
    class Bounded:
        name = "x"
        max_delivery_s = bound_s

    d = Dispatcher(make_sessionmaker(make_engine("sqlite://")), {"x": Bounded()},  # type: ignore[dict-item]
                   WorkerSettings(lease_seconds=lease_s, batch_size=batch), ListAudit())
    rows, lease = d.lease_plan()
    assert rows >= 1 and lease >= lease_s
    assert rows * bound_s < lease
