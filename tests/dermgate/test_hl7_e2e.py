"""End to end into the interface engine: dcmtk storescu -> SCP -> model -> ORU^R01 over MLLP.

The MLLP listener on loopback validates every message with hl7apy and answers
ACKs; on the way it answers one AE (application error) and drops one connection
after storing the message. Every image must be filed exactly once.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from sqlalchemy import select

from audit.api import EventType
from dermgate.app import Runtime
from dermgate.db import JobState, OutboxItem, OutboxState
from dermgate.service import Service
from integration.hl7v2.settings import Hl7Settings
from tests.dermgate.test_service_e2e import MODALITY_AE, make_settings, make_sources, wait_for
from tests.peers.dcmtk import storescu
from tests.peers.mllp import mllp_listener


def test_each_image_is_filed_once_as_an_oru_r01_despite_a_nak_and_a_dropped_connection(tmp_path: Path) -> None:
    with mllp_listener() as engine:
        engine.fault("AE", "drop")
        settings = make_settings(tmp_path / "work", None, backoff_base_s=0.05, backoff_max_s=0.3)
        settings.hl7 = Hl7Settings(host=engine.host, port=engine.port, sending_application="DERMGATE",
                                   sending_facility="DERMCLINIC", receiving_application="ENGINE",
                                   receiving_facility="GENHOSP", ack_timeout_s=5.0)
        rt = Runtime(settings)
        service = Service(rt, roles={"scp", "worker", "dispatcher"})
        service.start()
        try:
            files = make_sources(tmp_path / "src")
            assert storescu("127.0.0.1", settings.dicom.port, files, calling=MODALITY_AE, called="DERMGATE",
                            options=["-xy", "-R"]).returncode == 0
            jobs = wait_for(rt, len(files), timeout=180)
        finally:
            service.stop()
        assert all(j.state is JobState.DELIVERED for j in jobs), [j.last_error for j in jobs]
        with rt.sessions() as s:
            items = list(s.scalars(select(OutboxItem).where(OutboxItem.channel == "hl7v2")))
        assert len(items) == len(files) and all(i.state is OutboxState.SENT for i in items)
        # Exactly once: one filed message per image, the dropped one recognised by its MSH-10.
        assert len(engine.accepted) == len(files) and engine.state.duplicates == 1
        assert sorted(engine.state.answers).count("AE") == 1 and "drop" in engine.state.answers
        patients = set()
        for received in engine.accepted.values():
            assert received.message_type == "ORU^R01^ORU_R01"
            patients.add(received.message.children[1].children[0].children[0].pid_3.value.split("^")[0])
        assert patients == {str(pydicom.dcmread(f, stop_before_pixels=True).PatientID) for f in files}
        events = [r.event for r in rt.audit.events() if r.event.event is EventType.HL7_DELIVERY]
        assert len(events) == len(files) + 2
        assert {e.detail.get("msa", {}).get("code") for e in events} >= {"AA", "AE"}
        rt.close()


def test_demo_sends_its_results_to_the_interface_engine_given_with_hl7(tmp_path: Path) -> None:
    from tests.dermgate.test_cli import dermgate
    from tests.dermgate.test_demo_fhir import _two_images
    with mllp_listener() as engine:
        run = dermgate("demo", "--workdir", str(tmp_path / "demo"), "--images", str(_two_images(tmp_path)),
                       "--hl7", f"{engine.host}:{engine.port}", cwd=tmp_path)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert len(engine.accepted) == 2 and not engine.state.invalid
        assert "ORU^R01" in run.stdout
