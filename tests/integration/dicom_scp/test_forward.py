"""Forwarding the SC and SR to a real Orthanc PACS on loopback (plain and DICOM TLS).

What arrived is checked through Orthanc's REST API. The first test records into
the real encrypted audit trail; the others use an in-memory list (test double:
the trail itself is tested in tests/audit).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread

from audit.api import AuditEvent, EventType, Outcome
from audit.keys import FileKeyProvider, init_keys, load_signer
from audit.trail import AuditTrail
from integration.dicom_scp import uids
from integration.dicom_scp.forward import (
    DicomForwardChannel,
    ForwardError,
    classify_status,
    client_tls_context,
)
from integration.dicom_scp.outputs import WrittenOutputs, write_outputs
from tests.peers.dcmtk import img2dcm, sample_jpeg
from tests.peers.orthanc import OrthancPeer, free_port
from tests.peers.results import synthetic_prediction
from tests.peers.audit import ListAudit

NOW = datetime(2025, 3, 4, 12, 30, 15, tzinfo=timezone.utc)



class BrokenAudit:
    """An AuditSink whose disk is gone (test double)."""

    def record(self, event: AuditEvent) -> int:
        raise OSError("audit volume unavailable")


def _outputs(tmp_path: Path, name: str) -> tuple[Dataset, WrittenOutputs]:
    source_path = img2dcm(sample_jpeg(), tmp_path / f"{name}.dcm", patient_id=f"DG-{name}")
    source = dcmread(source_path)
    rgb = source.pixel_array
    return source, write_outputs(source, synthetic_prediction(*rgb.shape[:2]), tmp_path / name, now=NOW)


def _channel(peer: OrthancPeer, **kw: object) -> DicomForwardChannel:
    args: dict = {"dest_name": "pacs", "ae_title": peer.aet, "host": peer.host, "port": peer.dicom_port,
                  "calling_ae_title": "DERMGATE", "acse_timeout": 5, "dimse_timeout": 10, "network_timeout": 10,
                  "connection_timeout": 5}
    args.update(kw)
    return DicomForwardChannel(**args)


def test_sc_and_sr_arrive_in_orthanc_under_the_source_study(orthanc: OrthancPeer, tmp_path: Path) -> None:
    """Both outputs are stored by the PACS in the source's study, the SR as Comprehensive 3D SR,
    and the transfer is in the encrypted audit trail."""
    source, out = _outputs(tmp_path, "arrive")
    keys = init_keys(tmp_path / "keys")
    trail = AuditTrail(tmp_path / "audit", FileKeyProvider(keys.keyring), load_signer(keys.signing_key))
    channel = _channel(orthanc, audit=trail)
    assert channel.name == "dicom:pacs"

    outcome = channel.deliver({"files": [str(out.sc_path), str(out.sr_path)]})
    events = [r.event for r in trail.events()]
    trail.close()

    assert outcome.ok, outcome.reason
    stored = {tags["SOPInstanceUID"]: tags for tags in orthanc.study_instances(source.StudyInstanceUID)}
    assert set(stored) == {out.sc.SOPInstanceUID, out.sr.SOPInstanceUID}
    assert stored[out.sr.SOPInstanceUID]["SOPClassUID"] == uids.COMPREHENSIVE_3D_SR_STORAGE
    assert stored[out.sc.SOPInstanceUID]["SOPClassUID"] == uids.SECONDARY_CAPTURE_IMAGE_STORAGE
    assert stored[out.sc.SOPInstanceUID]["PatientID"] == source.PatientID
    assert [e.event for e in events if e is not None] == [EventType.FORWARDED]
    event = events[0]
    assert event is not None
    assert event.outcome == Outcome.SUCCESS
    assert event.destination == f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"
    assert (event.patient_id, event.study_uid) == (source.PatientID, source.StudyInstanceUID)
    assert set(event.sop_instance_uids) == {out.sc.SOPInstanceUID, out.sr.SOPInstanceUID}


def test_redelivery_stores_nothing_twice(orthanc: OrthancPeer, tmp_path: Path) -> None:
    """The outbox delivers at least once; the same UIDs make a re-send harmless."""
    source, out = _outputs(tmp_path, "again")
    channel = _channel(orthanc, base_dir=tmp_path)
    payload = {"files": [str(out.sc_path.relative_to(tmp_path)), str(out.sr_path.relative_to(tmp_path))]}
    assert channel.deliver(payload).ok
    assert channel.deliver(payload).ok
    assert len(orthanc.study_instances(source.StudyInstanceUID)) == 2


def test_one_association_serves_consecutive_deliveries(orthanc: OrthancPeer, tmp_path: Path) -> None:
    """The association of a delivery is kept for the next one (a few seconds), then released."""
    channel = _channel(orthanc, base_dir=tmp_path)
    payloads = []
    for name in ("keep1", "keep2"):
        _, out = _outputs(tmp_path, name)
        payloads.append({"files": [str(out.sc_path), str(out.sr_path)]})
    assert channel.deliver(payloads[0]).ok
    first = channel._assoc
    assert first is not None and first.is_established
    assert channel.deliver(payloads[1]).ok
    assert channel._assoc is first
    channel.close()
    assert channel._assoc is None and not first.is_established


def test_a_peer_that_drops_the_kept_association_costs_no_failed_attempt(orthanc: OrthancPeer,
                                                                        tmp_path: Path) -> None:
    """If the kept association is gone (the PACS timed it out), the delivery opens a new one."""
    channel = _channel(orthanc, base_dir=tmp_path)
    _, out = _outputs(tmp_path, "dropped")
    payload = {"files": [str(out.sc_path), str(out.sr_path)]}
    assert channel.deliver(payload).ok
    assert channel._assoc is not None
    channel._assoc.abort()
    assert channel.deliver(payload).ok


def test_a_peer_without_our_transfer_syntax_gets_the_file_converted(tmp_path: Path) -> None:
    """Files normally travel as they are on disk; a peer that accepts only Implicit VR Little Endian
    gets them read and re-encoded, with the same content."""
    from pynetdicom import AE, evt
    received: list[Dataset] = []

    def on_store(event: evt.Event) -> int:
        received.append(event.dataset)
        return 0x0000

    ae = AE(ae_title="IMPLICIT")
    for sop_class in (uids.SECONDARY_CAPTURE_IMAGE_STORAGE, uids.COMPREHENSIVE_3D_SR_STORAGE):
        ae.add_supported_context(sop_class, [uids.IMPLICIT_VR_LE])
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        _, out = _outputs(tmp_path, "implicit")
        channel = DicomForwardChannel(dest_name="implicit", ae_title="IMPLICIT", host="127.0.0.1",
                                      port=server.server_address[1], acse_timeout=5, dimse_timeout=10,
                                      network_timeout=10, connection_timeout=5)
        assert channel.deliver({"files": [str(out.sc_path), str(out.sr_path)]}).ok
        channel.close()
    finally:
        server.shutdown()
    assert [str(ds.SOPInstanceUID) for ds in received] == [out.sc_sop_instance_uid, out.sr_sop_instance_uid]
    assert received[0].PixelData == out.sc.PixelData


def test_jpeg_source_travels_in_its_own_jpeg_baseline_context(orthanc: OrthancPeer, tmp_path: Path) -> None:
    """A JPEG Baseline image is sent as JPEG (its own presentation context), not decompressed."""
    source_path = img2dcm(sample_jpeg(), tmp_path / "jpeg.dcm", patient_id="DG-jpeg")
    source = dcmread(source_path)
    assert _channel(orthanc).deliver({"files": [str(source_path)]}).ok
    with orthanc.client() as c:
        oid = c.post("/tools/lookup", content=str(source.SOPInstanceUID)).json()[0]["ID"]
        syntax = c.get(f"/instances/{oid}/metadata/TransferSyntax").text
    assert syntax == uids.JPEG_BASELINE


def test_pacs_refusing_our_ae_stores_nothing_and_the_failure_is_audited(orthanc: OrthancPeer,
                                                                         tmp_path: Path) -> None:
    """Orthanc drops the association of an AE it does not know at the first C-STORE. With no
    status to go on that looks like a network failure, so the outbox retries until its limit."""
    source, out = _outputs(tmp_path, "stranger")
    audit = ListAudit()
    outcome = _channel(orthanc, calling_ae_title="STRANGER", audit=audit).deliver({"files": [str(out.sc_path)]})
    assert not outcome.ok and outcome.retryable
    assert "no C-STORE response" in (outcome.reason or "")
    assert orthanc.study_instances(source.StudyInstanceUID) == []
    assert audit.events[0].outcome == Outcome.SERIOUS_FAILURE
    assert audit.events[0].detail["reason"] == outcome.reason


def test_wrong_called_ae_title_is_a_permanent_rejection(orthanc: OrthancPeer, tmp_path: Path) -> None:
    """Orthanc rejects an association addressed to another AE title; that is configuration, not luck."""
    _, out = _outputs(tmp_path, "wrongae")
    outcome = _channel(orthanc, ae_title="NOT_ORTHANC").deliver({"files": [str(out.sc_path)]})
    assert not outcome.ok and not outcome.retryable
    assert "rejected" in (outcome.reason or "")


def test_destination_down_is_retryable(tmp_path: Path) -> None:
    """Nothing listening: try again later."""
    _, out = _outputs(tmp_path, "down")
    channel = DicomForwardChannel(dest_name="gone", ae_title="PACS", host="127.0.0.1", port=free_port(),
                                  connection_timeout=2)
    outcome = channel.deliver({"files": [str(out.sc_path)]})
    assert not outcome.ok and outcome.retryable


def test_missing_output_file_is_not_retryable(orthanc: OrthancPeer, tmp_path: Path) -> None:
    """A file that is gone will not come back by retrying."""
    outcome = _channel(orthanc).deliver({"files": [str(tmp_path / "nothing.dcm")]})
    assert not outcome.ok and not outcome.retryable
    assert "missing" in (outcome.reason or "")


def test_delivery_unaudited_is_not_delivered(orthanc: OrthancPeer, tmp_path: Path) -> None:
    """When the audit record cannot be written the attempt is reported failed and retryable."""
    _, out = _outputs(tmp_path, "noaudit")
    outcome = _channel(orthanc, audit=BrokenAudit()).deliver({"files": [str(out.sc_path)]})
    assert not outcome.ok and outcome.retryable
    assert "audit" in (outcome.reason or "")


def test_forward_over_dicom_tls_with_client_certificate(orthanc_tls: OrthancPeer, tmp_path: Path) -> None:
    """TLS 1.2+ to a PACS that requires client certificates: the outputs arrive."""
    assert orthanc_tls.tls is not None
    source, out = _outputs(tmp_path, "tls")
    ctx = client_tls_context(orthanc_tls.tls.ca_cert, orthanc_tls.tls.client_cert, orthanc_tls.tls.client_key)
    outcome = _channel(orthanc_tls, tls=ctx, tls_server_hostname="localhost").deliver(
        {"files": [str(out.sc_path), str(out.sr_path)]})
    assert outcome.ok, outcome.reason
    assert len(orthanc_tls.study_instances(source.StudyInstanceUID)) == 2


def test_tls_without_client_certificate_fails_retryably(orthanc_tls: OrthancPeer, tmp_path: Path) -> None:
    """The PACS refuses the handshake; nothing is stored and the outbox may retry after a fix."""
    assert orthanc_tls.tls is not None
    source, out = _outputs(tmp_path, "tlsnocert")
    outcome = _channel(orthanc_tls, tls=client_tls_context(orthanc_tls.tls.ca_cert),
                       tls_server_hostname="localhost").deliver({"files": [str(out.sc_path)]})
    assert not outcome.ok and outcome.retryable
    assert orthanc_tls.study_instances(source.StudyInstanceUID) == []


@pytest.mark.parametrize(("status", "ok", "retryable"), [
    (0x0000, True, False),
    (0xB000, True, False),      # coercion of data elements
    (0x0111, True, False),      # duplicate SOP instance: already there
    (0xA700, False, True),      # out of resources
    (0xA7FF, False, True),
    (0xA900, False, False),     # data set does not match SOP class
    (0xC000, False, False),     # cannot understand
    (0x0122, False, False),     # SOP class not supported
    (0x0110, False, True),      # processing failure
])
def test_store_status_decides_retry(status: int, ok: bool, retryable: bool) -> None:
    """Out of resources is worth retrying; a mismatch or not-understood data set never is."""
    verdict = classify_status(status)
    assert (verdict.ok, verdict.retryable) == (ok, retryable)


def test_channel_refuses_an_impossible_ae_title() -> None:
    """AE titles are 1-16 characters (PS3.5): a bad one fails at configuration, not at 3 a.m."""
    with pytest.raises(ForwardError):
        DicomForwardChannel(dest_name="x", ae_title="A" * 17, host="127.0.0.1", port=104)
