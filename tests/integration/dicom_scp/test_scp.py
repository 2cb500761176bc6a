"""The SCP with dcmtk as the modality: C-ECHO, C-STORE in every accepted transfer syntax with
correct RGB pixels, durability before Success, duplicates and conflicts, association policy."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import JPEG2000, JPEG2000Lossless, generate_uid
from pynetdicom import AE

from audit.api import EventType, Outcome
from dermgate.db import JobState
from integration.dicom_scp import status as st
from integration.dicom_scp import uids
from integration.dicom_scp.decode import decode_rgb
from tests.integration.dicom_scp.scp_support import (LOCALHOST, MODALITY, SCP_AET, Harness, dicom_settings,
                                                     jpeg_rgb, mean_abs_diff, running_scp, wait_for)
from tests.peers.dcmtk import (DCMCJPEG, DCMCRLE, DCMDJPEG, convert, echoscu, img2dcm, proposal, sample_jpeg,
                               storescu)

SAMPLE = "ISIC_0024309.jpg"          # bundled in dermgate/samples, so CI has it
STORE_SUCCESS = "Received Store Response (Success)"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(scope="module")
def scp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    with running_scp(tmp_path_factory.mktemp("scp"), dicom_settings()) as harness:
        yield harness


@pytest.fixture(scope="module")
def jpeg() -> Path:
    return sample_jpeg(SAMPLE)


def fresh(path: Path, out: Path, **changes: str) -> Path:
    """A copy of ``path`` with a new SOP Instance UID (and any attribute changes)."""
    ds = dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(out)
    return out


def send(scp: Harness, files: Path | list[Path], options: list[str]) -> str:
    res = storescu(LOCALHOST, scp.port, files, calling=MODALITY, called=SCP_AET, options=["-v", *options])
    return res.stdout + res.stderr


def test_echo_is_answered_and_audited(scp: Harness) -> None:
    res = echoscu(LOCALHOST, scp.port, calling=MODALITY, called=SCP_AET)
    assert res.returncode == 0, res.stderr
    echo = scp.audit.of(EventType.ECHO)[-1]
    assert (echo.actor, echo.source, echo.outcome) == (MODALITY, LOCALHOST, Outcome.SUCCESS)


def test_jpeg_baseline_from_img2dcm_is_durable_before_success(scp: Harness, jpeg: Path, tmp_path: Path) -> None:
    """storescu -xy: Success only once the bytes (sha256), the row and a job are committed; audited with PHI."""
    src = img2dcm(jpeg, tmp_path / "vl.dcm", patient_id="PAT-42")
    sop = str(dcmread(src).SOPInstanceUID)
    out = send(scp, src, ["-xy"])
    assert STORE_SUCCESS in out, out
    inst = scp.instance(sop)
    assert inst is not None and inst.transfer_syntax_uid == uids.JPEG_BASELINE
    stored = scp.store.read(inst.path)
    assert hashlib.sha256(stored).hexdigest() == inst.sha256
    assert dcmread(src).PixelData == dcmread(scp.store.path(inst.path)).PixelData   # no transcoding
    assert [j.state for j in scp.jobs() if j.instance_id == inst.id] == [JobState.RECEIVED]
    rec = next(e for e in scp.audit.of(EventType.STORE_RECEIVED) if e.sop_instance_uids == (sop,))
    assert rec.outcome is Outcome.SUCCESS and rec.patient_id == "PAT-42" and rec.actor == MODALITY
    assert rec.study_uid == inst.study_instance_uid and rec.detail["result"] == "accepted"
    assert rec.detail["sha256"] == inst.sha256


def test_dermoscopic_class_is_accepted_with_storescu_required_only(scp: Harness, jpeg: Path, tmp_path: Path) -> None:
    src = img2dcm(jpeg, tmp_path / "dms.dcm", dermoscopic=True)
    out = send(scp, src, ["-R", "-xy"])
    assert STORE_SUCCESS in out, out
    inst = scp.instance(str(dcmread(src).SOPInstanceUID))
    assert inst is not None and inst.sop_class_uid == uids.DERMOSCOPIC_PHOTOGRAPHY_IMAGE_STORAGE


@pytest.fixture(scope="module")
def uncompressed(jpeg: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample as explicit VR LE RGB, decoded by dcmtk (dcmdjpeg converts YBR to RGB)."""
    folder = tmp_path_factory.mktemp("variants")
    return convert(DCMDJPEG, img2dcm(jpeg, folder / "vl.dcm"), folder / "explicit.dcm")


def _pydicom_compressed(src: Path, out: Path, syntax: str, **options: object) -> Path:
    ds = dcmread(src)
    ds.compress(syntax, **options)
    ds.save_as(out)
    return out


def make_variant(name: str, jpeg: Path, uncompressed: Path, out: Path) -> tuple[Path, str]:
    """(file, transfer syntax) for each transfer syntax the SCP accepts."""
    match name:
        case "explicit":
            return uncompressed, uids.EXPLICIT_VR_LE
        case "implicit":
            return uncompressed, uids.IMPLICIT_VR_LE            # storescu re-encodes on the fly
        case "jpeg_baseline_sc":
            return img2dcm_sc(jpeg, out), uids.JPEG_BASELINE
        case "jpeg_extended":
            return convert(DCMCJPEG, uncompressed, out, "+ee"), uids.JPEG_EXTENDED
        case "jpeg_lossless_p14":
            return convert(DCMCJPEG, uncompressed, out, "+el"), uids.JPEG_LOSSLESS
        case "jpeg_lossless_sv1":
            return convert(DCMCJPEG, uncompressed, out, "+e1"), uids.JPEG_LOSSLESS_SV1
        case "j2k_lossless":
            return _pydicom_compressed(uncompressed, out, JPEG2000Lossless), uids.JPEG_2000_LOSSLESS
        case "j2k_lossy":
            return _pydicom_compressed(uncompressed, out, JPEG2000, j2k_cr=[10]), uids.JPEG_2000
        case "rle":
            return convert(DCMCRLE, uncompressed, out), uids.RLE_LOSSLESS
    raise AssertionError(name)


def img2dcm_sc(jpeg: Path, out: Path) -> Path:
    """img2dcm's default target: Secondary Capture, JPEG Baseline as is."""
    import subprocess

    from tests.peers.dcmtk import IMG2DCM
    subprocess.run([IMG2DCM, "-k", "PatientID=SC-1", "-k", f"StudyInstanceUID={generate_uid()}",
                    str(jpeg), str(out)], check=True, capture_output=True, timeout=30)
    return out


VARIANTS = ["explicit", "implicit", "jpeg_baseline_sc", "jpeg_extended", "jpeg_lossless_p14",
            "jpeg_lossless_sv1", "j2k_lossless", "j2k_lossy", "rle"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_transfer_syntax_is_stored_as_sent_and_decodes_to_the_source_rgb(
        scp: Harness, jpeg: Path, uncompressed: Path, tmp_path: Path, variant: str) -> None:
    """The stored object keeps the negotiated syntax and decodes to the source JPEG's RGB pixels.

    A YBR/RGB mix-up shifts the mean absolute difference by tens of grey levels; decoders
    and lossy re-encoding stay within a few.
    """
    path, syntax = make_variant(variant, jpeg, uncompressed, tmp_path / f"{variant}.dcm")
    path = fresh(path, tmp_path / f"{variant}-fresh.dcm")
    ds = dcmread(path)
    out = send(scp, path, proposal(tmp_path / "p.cfg", str(ds.SOPClassUID), [syntax]))
    assert STORE_SUCCESS in out, out
    inst = scp.instance(str(ds.SOPInstanceUID))
    assert inst is not None and inst.transfer_syntax_uid == syntax
    rgb = decode_rgb(scp.stored_dataset(inst.sop_instance_uid))
    reference = jpeg_rgb(jpeg)
    assert rgb.dtype.name == "uint8" and rgb.shape == reference.shape
    assert mean_abs_diff(rgb, reference) < (4.0 if variant == "j2k_lossy" else 2.5)


def test_resent_identical_object_is_success_with_one_job(scp: Harness, jpeg: Path, tmp_path: Path) -> None:
    src = img2dcm(jpeg, tmp_path / "dup.dcm")
    sop = str(dcmread(src).SOPInstanceUID)
    out = send(scp, [src, src], ["-xy"])
    assert out.count(STORE_SUCCESS) == 2, out
    inst = scp.instance(sop)
    assert inst is not None
    assert len([j for j in scp.jobs() if j.instance_id == inst.id]) == 1
    results = [e.detail["result"] for e in scp.audit.of(EventType.STORE_RECEIVED) if e.sop_instance_uids == (sop,)]
    assert results == ["accepted", "duplicate"]


def test_reused_uid_with_other_content_is_refused_and_first_kept(scp: Harness, jpeg: Path, tmp_path: Path) -> None:
    first = img2dcm(jpeg, tmp_path / "first.dcm", patient_id="PAT-A")
    sop = str(dcmread(first).SOPInstanceUID)
    second = tmp_path / "second.dcm"
    ds = dcmread(first)
    ds.PatientID = "PAT-B"
    ds.save_as(second)
    assert STORE_SUCCESS in send(scp, first, ["-xy"])
    original = scp.instance(sop)
    out = send(scp, second, ["-xy"])
    assert "Received Store Response (Error: CannotUnderstand)" in out, out
    assert scp.instance(sop).sha256 == original.sha256                     # first kept
    rec = [e for e in scp.audit.of(EventType.STORE_RECEIVED) if e.sop_instance_uids == (sop,)][-1]
    assert rec.outcome is Outcome.MINOR_FAILURE and rec.detail["status"] == f"0x{st.SOP_INSTANCE_CONFLICT:04X}"
    assert rec.patient_id == "PAT-B"                                         # the refused sender's claim, audited
    scp.assert_intact()


# ---- association policy ----------------------------------------------------------------------------

def _association_audits(scp: Harness, actor: str) -> list[dict]:
    return [e.detail for e in scp.audit.of(EventType.ASSOCIATION) if e.actor == actor]


def test_unknown_calling_ae_is_rejected_not_recognised(scp: Harness) -> None:
    res = echoscu(LOCALHOST, scp.port, calling="STRANGER", called=SCP_AET)
    assert res.returncode != 0
    assert "Calling AE Title Not Recognized" in res.stdout + res.stderr
    assert "Rejected Permanent" in res.stdout + res.stderr
    audit = _association_audits(scp, "STRANGER")
    assert audit and audit[-1]["result"] == "rejected" and audit[-1]["rejection"] == "1/1/3"


def test_wrong_called_ae_is_rejected(scp: Harness) -> None:
    res = echoscu(LOCALHOST, scp.port, calling=MODALITY, called="NOTUS")
    assert res.returncode != 0 and "Called AE Title Not Recognized" in res.stdout + res.stderr


def test_known_ae_from_an_unlisted_host_is_rejected(tmp_path: Path) -> None:
    """MODALITY may call only from 127.0.0.2: from 127.0.0.1 (listed for OTHER only) it gets an
    A-ASSOCIATE-RJ, from 127.0.0.2 it is accepted."""
    from dermgate.settings import AllowedCaller
    cfg = dicom_settings(allowed_callers=[AllowedCaller(ae_title=MODALITY, hosts=["127.0.0.2"]),
                                          AllowedCaller(ae_title="OTHER", hosts=[LOCALHOST])],
                         host="0.0.0.0")
    with running_scp(tmp_path, cfg) as scp:
        res = echoscu(LOCALHOST, scp.port, calling=MODALITY, called=SCP_AET)
        assert res.returncode != 0 and "Calling AE Title Not Recognized" in res.stdout + res.stderr
        assert _association_audits(scp, MODALITY)[-1]["reason"] == "calling AE title not allowed from this host"
        ae = AE(ae_title=MODALITY)
        ae.add_requested_context(uids.VERIFICATION)
        assoc = ae.associate(LOCALHOST, scp.port, ae_title=SCP_AET, bind_address=("127.0.0.2", 0))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == st.SUCCESS
        assoc.release()


def test_association_with_no_acceptable_context_is_rejected(scp: Harness, jpeg: Path, tmp_path: Path) -> None:
    """storescu proposing only CT Image Storage gets an A-ASSOCIATE-RJ, not an accept-then-abort."""
    ct = fresh(img2dcm(jpeg, tmp_path / "vl.dcm"), tmp_path / "ct.dcm", SOPClassUID=CT_IMAGE_STORAGE)
    before = len(_association_audits(scp, MODALITY))
    out = send(scp, ct, ["-R", "-xy"])
    assert "Association Rejected" in out, out
    assert "Association Accepted" not in out
    new = _association_audits(scp, MODALITY)[before:]
    assert [(d["result"], d["reason"]) for d in new] == [("rejected", "no acceptable presentation context")]


def test_association_limit_rejects_transiently(tmp_path: Path) -> None:
    with running_scp(tmp_path, dicom_settings(max_associations=1)) as scp:
        ae = AE(ae_title=MODALITY)
        ae.add_requested_context(uids.VERIFICATION)
        held = ae.associate(LOCALHOST, scp.port, ae_title=SCP_AET)
        assert held.is_established
        try:
            res = echoscu(LOCALHOST, scp.port, calling=MODALITY, called=SCP_AET)
            assert res.returncode != 0 and "Rejected Transient" in res.stdout + res.stderr
            assert _association_audits(scp, MODALITY)[-1]["reason"] == "association limit reached"
        finally:
            held.release()
        assert echoscu(LOCALHOST, scp.port, calling=MODALITY, called=SCP_AET).returncode == 0


def test_stop_lets_an_in_flight_association_finish(tmp_path: Path) -> None:
    """stop() closes the port at once but the open association still gets its answers."""
    import threading
    with running_scp(tmp_path, dicom_settings()) as scp:
        ae = AE(ae_title=MODALITY)
        ae.add_requested_context(uids.VERIFICATION)
        assoc = ae.associate(LOCALHOST, scp.port, ae_title=SCP_AET)
        assert assoc.is_established
        stopper = threading.Thread(target=scp.service.stop, kwargs={"timeout": 10})
        port = scp.port
        stopper.start()

        def port_closed() -> bool:
            try:
                socket.create_connection((LOCALHOST, port), timeout=1).close()
            except OSError:
                return True
            return False
        assert wait_for(port_closed, timeout=10)
        assert echoscu(LOCALHOST, port, calling=MODALITY, called=SCP_AET, options=["-to", "2"]).returncode != 0
        assert assoc.send_c_echo().Status == st.SUCCESS
        assoc.release()
        stopper.join(timeout=10)
        assert not stopper.is_alive()


def test_sixteen_bit_monochrome_is_accepted_and_decodes_to_equal_channels(
        scp: Harness, uncompressed: Path, tmp_path: Path) -> None:
    """MONOCHROME2, 16 bits: stored as sent; decoded to three equal 8-bit channels (Bits Stored scaling)."""
    import numpy as np
    ds = dcmread(uncompressed)
    grey = ds.pixel_array.mean(axis=2).astype(np.uint16) * 257          # 0..65535
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = uids.SECONDARY_CAPTURE_IMAGE_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PhotometricInterpretation, ds.SamplesPerPixel = "MONOCHROME2", 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    del ds.PlanarConfiguration
    ds.PixelData = grey.tobytes()
    ds.save_as(tmp_path / "mono16.dcm")
    out = send(scp, tmp_path / "mono16.dcm", [])
    assert STORE_SUCCESS in out, out
    rgb = decode_rgb(scp.stored_dataset(str(ds.SOPInstanceUID)))
    assert rgb.shape == (*grey.shape, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    assert np.abs(rgb[..., 1].astype(int) - (grey >> 8)).max() == 0
