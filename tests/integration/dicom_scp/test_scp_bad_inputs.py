"""Bad inputs: each is answered with its named status and an Error Comment, audited, and
nothing already accepted is lost; the service still answers C-ECHO afterwards.

Objects dcmtk refuses to send as they are (a data set whose SOP class differs from the
request, a truncated stream) are sent with a pynetdicom SCU (``send_raw``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import generate_uid

from audit.api import EventType, Outcome
from dermgate.intake import Intake
from dermgate.store import ObjectStore
from integration.dicom_scp import status as st
from integration.dicom_scp import uids
from tests.integration.dicom_scp.scp_support import (LOCALHOST, MODALITY, SCP_AET, Harness, StoreAnswer,
                                                     dataset_bytes, dicom_settings, running_scp, send_raw)
from tests.peers.dcmtk import echoscu, img2dcm, sample_jpeg, storescu

SAMPLE = "ISIC_0024309.jpg"


@pytest.fixture(scope="module")
def scp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    with running_scp(tmp_path_factory.mktemp("scp"), dicom_settings(max_pixels=10_000_000)) as harness:
        yield harness


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid VL Photographic JPEG Baseline object from img2dcm."""
    return img2dcm(sample_jpeg(SAMPLE), tmp_path_factory.mktemp("src") / "vl.dcm")


def _frame(ds: Dataset) -> bytes:
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def _set_frame(ds: Dataset, frame: bytes) -> None:
    ds.PixelData = encapsulate([frame])


def _native(ds: Dataset) -> None:
    ds.decompress(generate_instance_uid=False)      # explicit VR LE, RGB


def nested_sequences(depth: int) -> bytes:
    """Content Sequence nested ``depth`` deep, undefined lengths, explicit VR LE, encoded by hand
    (pydicom's own writer recurses too deep to make it)."""
    sq = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    end = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return (sq + item) * depth + end * depth


@dataclass(frozen=True)
class Bad:
    """A broken object: how to break a valid one, and what the SCP must answer."""
    mutate: Callable[[Dataset], None]
    status: int
    announced_class: str | None = None      # SOP class in the request, when not the data set's
    truncate: int = 0                       # bytes cut off the end of the encoded data set
    append: bytes = b""                     # raw bytes appended to the encoded data set
    patch: Callable[[bytes], bytes] | None = None   # an edit of the encoded data set's bytes


def _del(keyword: str) -> Callable[[Dataset], None]:
    return lambda ds: delattr(ds, keyword)


def _set(**values: object) -> Callable[[Dataset], None]:
    def mutate(ds: Dataset) -> None:
        for keyword, value in values.items():
            setattr(ds, keyword, value)
    return mutate


def _corrupt_jpeg_header(ds: Dataset) -> None:
    frame = bytearray(_frame(ds))
    frame[2:300] = bytes(298)                # SOI kept, DQT/SOF/DHT zeroed
    _set_frame(ds, bytes(frame))


def _truncate_jpeg(ds: Dataset) -> None:
    frame = _frame(ds)
    _set_frame(ds, frame[: len(frame) // 2])  # no EOI: the scan ends mid-stream


def _short_native(ds: Dataset) -> None:
    _native(ds)
    ds.PixelData = ds.PixelData[:-3000]


def _vr_of_patient_id(vr: bytes) -> Callable[[bytes], bytes]:
    """Replace the explicit VR of Patient ID (0010,0020) ``LO`` in the encoded bytes."""
    def patch(data: bytes) -> bytes:
        i = data.index(b"\x10\x00\x20\x00LO")
        return data[: i + 4] + vr + data[i + 6:]
    return patch


def _labelled(transfer_syntax: str) -> Callable[[Dataset], None]:
    def mutate(ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    return mutate


BAD: dict[str, Bad] = {
    "missing_patient_id": Bad(_del("PatientID"), st.MISSING_ATTRIBUTE),
    "empty_patient_id": Bad(_set(PatientID=""), st.MISSING_ATTRIBUTE),
    "missing_study_uid": Bad(_del("StudyInstanceUID"), st.MISSING_ATTRIBUTE),
    "malformed_study_uid": Bad(_set(StudyInstanceUID="1.2.abc"), st.MISSING_ATTRIBUTE),
    "no_pixel_data": Bad(_del("PixelData"), st.NO_PIXEL_DATA),
    "undecodable_jpeg": Bad(_corrupt_jpeg_header, st.UNDECODABLE_PIXEL_DATA),
    "truncated_jpeg_stream": Bad(_truncate_jpeg, st.UNDECODABLE_PIXEL_DATA),
    "jpeg_size_differs_from_rows": Bad(_set(Rows=100), st.UNDECODABLE_PIXEL_DATA),
    "native_pixel_data_too_short": Bad(_short_native, st.UNDECODABLE_PIXEL_DATA),
    "absurd_dimensions": Bad(_set(Rows=60000, Columns=60000), st.UNSUPPORTED_IMAGE),
    "zero_rows": Bad(_set(Rows=0), st.UNSUPPORTED_IMAGE),
    "four_samples": Bad(_set(SamplesPerPixel=4), st.UNSUPPORTED_IMAGE),
    "sixteen_bit_colour": Bad(_set(BitsAllocated=16, BitsStored=16, HighBit=15), st.UNSUPPORTED_IMAGE),
    "truncated_file": Bad(lambda ds: None, st.UNREADABLE_DATASET, truncate=700),
    "truncated_in_header": Bad(lambda ds: None, st.UNREADABLE_DATASET, truncate=-1),
    "sequence_nesting_bomb": Bad(_native, st.UNREADABLE_DATASET, append=nested_sequences(5000)),
    "sop_class_mismatch": Bad(_set(SOPClassUID=uids.SECONDARY_CAPTURE_IMAGE_STORAGE),
                              st.DATASET_DOES_NOT_MATCH_SOP_CLASS, announced_class=uids.VL_PHOTOGRAPHIC_IMAGE_STORAGE),
    # Issue 16: decided at intake instead of Success and a failure later (or 0xC000).
    "unknown_value_representation": Bad(lambda ds: None, st.UNREADABLE_DATASET, patch=_vr_of_patient_id(b"ZZ")),
    "value_length_not_a_multiple_of_its_vr": Bad(lambda ds: None, st.UNREADABLE_DATASET,
                                                 patch=_vr_of_patient_id(b"FD")),
    "jpeg_baseline_labelled_jpeg_2000": Bad(_labelled(uids.JPEG_2000), st.UNDECODABLE_PIXEL_DATA),
    "jpeg_baseline_labelled_jpeg_2000_lossless": Bad(_labelled(uids.JPEG_2000_LOSSLESS), st.UNDECODABLE_PIXEL_DATA),
    "jpeg_baseline_labelled_rle": Bad(_labelled(uids.RLE_LOSSLESS), st.UNDECODABLE_PIXEL_DATA),
    "patient_id_longer_than_lo": Bad(_set(PatientID="7" * 65), st.MISSING_ATTRIBUTE),
    "patient_id_with_control_characters": Bad(_set(PatientID="DG\x07\x08-1"), st.MISSING_ATTRIBUTE),
}


def send_bad(scp: Harness, source: Path, bad: Bad) -> tuple[str, StoreAnswer]:
    ds = dcmread(source)
    sop = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
    bad.mutate(ds)
    if "PixelData" in ds and ds.file_meta.TransferSyntaxUID.is_compressed:
        ds["PixelData"].is_undefined_length = True
    encoded = dataset_bytes(ds)
    if bad.truncate > 0:
        encoded = encoded[: -bad.truncate]
    elif bad.truncate < 0:
        encoded = encoded[:300]                             # inside the header elements
    encoded += bad.append
    if bad.patch is not None:
        encoded = bad.patch(encoded)
    sop_class = bad.announced_class or str(dcmread(source).SOPClassUID)
    answer = send_raw(scp.port, sop_class=sop_class, sop_instance=sop,
                      transfer_syntax=str(ds.file_meta.TransferSyntaxUID), dataset_bytes=encoded)
    return sop, answer


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_answered_with_its_status_and_audited(scp: Harness, source: Path, name: str) -> None:
    bad = BAD[name]
    sop, answer = send_bad(scp, source, bad)
    assert answer.status == bad.status, (hex(answer.status), answer.comment)
    assert answer.comment, "every failure carries an Error Comment"
    assert scp.instance(sop) is None
    rec = [e for e in scp.audit.of(EventType.STORE_RECEIVED) if e.sop_instance_uids == (sop,)]
    assert len(rec) == 1 and rec[0].outcome is Outcome.MINOR_FAILURE
    assert rec[0].detail["status"] == f"0x{bad.status:04X}" and rec[0].detail["result"] == "refused"
    assert rec[0].detail["reason"] and rec[0].actor == MODALITY and rec[0].source == LOCALHOST


def test_instance_uid_differing_from_the_request_is_refused(scp: Harness, source: Path) -> None:
    ds = dcmread(source)
    answer = send_raw(scp.port, sop_class=str(ds.SOPClassUID), sop_instance=generate_uid(),
                      transfer_syntax=uids.JPEG_BASELINE, dataset_bytes=dataset_bytes(ds))
    assert answer.status == st.DATASET_DOES_NOT_MATCH_SOP_CLASS and "Instance" in (answer.comment or "")


def test_garbage_bytes_are_refused_not_aborted(scp: Harness) -> None:
    garbage = np.random.default_rng(7).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    answer = send_raw(scp.port, sop_class=uids.VL_PHOTOGRAPHIC_IMAGE_STORAGE, sop_instance=generate_uid(),
                      transfer_syntax=uids.EXPLICIT_VR_LE, dataset_bytes=garbage)
    assert answer.status in (st.UNREADABLE_DATASET, st.MISSING_ATTRIBUTE), hex(answer.status)


def test_cut_short_jpeg_sent_by_storescu_is_refused(scp: Harness, source: Path, tmp_path: Path) -> None:
    """A file whose JPEG stream stops half way (dcmtk refuses to send a file truncated at the
    DICOM level, so the cut is inside the fragment) is answered 0xC004 and audited."""
    ds = dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    _truncate_jpeg(ds)
    ds.save_as(tmp_path / "cut.dcm")
    res = storescu(LOCALHOST, scp.port, tmp_path / "cut.dcm", calling=MODALITY, called=SCP_AET,
                   options=["-v", "-xy"])
    assert "Received Store Response (Error: CannotUnderstand)" in res.stdout + res.stderr, res.stdout + res.stderr
    rec = [e for e in scp.audit.of(EventType.STORE_RECEIVED) if e.sop_instance_uids == (str(ds.SOPInstanceUID),)]
    assert [r.detail["status"] for r in rec] == [f"0x{st.UNDECODABLE_PIXEL_DATA:04X}"]
    assert scp.instance(str(ds.SOPInstanceUID)) is None


def test_bad_inputs_leave_the_service_up_and_accepted_objects_intact(scp: Harness, source: Path,
                                                                     tmp_path: Path) -> None:
    good = img2dcm(sample_jpeg(SAMPLE), tmp_path / "good.dcm")
    for bad in BAD.values():
        send_bad(scp, source, bad)
    res = storescu(LOCALHOST, scp.port, good, calling=MODALITY, called=SCP_AET, options=["-v", "-xy"])
    assert "Received Store Response (Success)" in res.stdout + res.stderr
    assert echoscu(LOCALHOST, scp.port, calling=MODALITY, called=SCP_AET).returncode == 0
    accepted = {e.sop_instance_uids[0] for e in scp.audit.of(EventType.STORE_RECEIVED)
                if e.outcome is Outcome.SUCCESS}
    assert {i.sop_instance_uid for i in scp.instances()} == accepted
    assert scp.instance(str(dcmread(good).SOPInstanceUID)) is not None
    scp.assert_intact()


# ---- resources and unexpected errors -----------------------------------------------------------------

def test_low_free_space_is_out_of_resources(source: Path, tmp_path: Path) -> None:
    with running_scp(tmp_path, dicom_settings(min_free_bytes=2**62)) as scp:
        ds = dcmread(source)
        answer = send_raw(scp.port, sop_class=str(ds.SOPClassUID), sop_instance=str(ds.SOPInstanceUID),
                          transfer_syntax=uids.JPEG_BASELINE, dataset_bytes=dataset_bytes(ds))
        assert answer.status == st.OUT_OF_RESOURCES and answer.comment
        assert scp.instances() == []


def test_unwritable_store_is_out_of_resources(source: Path, tmp_path: Path) -> None:
    """A store whose objects/ folder cannot be created (a file is in the way; works as root too)."""
    store = ObjectStore(tmp_path / "store")
    (tmp_path / "store" / "objects").write_bytes(b"not a folder")
    with running_scp(tmp_path, dicom_settings(), store=store) as scp:
        ds = dcmread(source)
        answer = send_raw(scp.port, sop_class=str(ds.SOPClassUID), sop_instance=str(ds.SOPInstanceUID),
                          transfer_syntax=uids.JPEG_BASELINE, dataset_bytes=dataset_bytes(ds))
        assert answer.status == st.OUT_OF_RESOURCES
        assert scp.instances() == []
        assert echoscu(LOCALHOST, scp.port, calling=MODALITY, called=SCP_AET).returncode == 0


class ExplodingIntake(Intake):
    """Test double: an intake that fails in a way nothing real can be made to (a programming error)."""

    def accept(self, encoded, image, transfer_syntax_uid):  # noqa: ANN001, ANN201
        raise RuntimeError("boom")


def test_unexpected_error_is_cannot_understand_not_an_abort(source: Path, tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "store")
    with running_scp(tmp_path, dicom_settings(), intake=ExplodingIntake(store, None), store=store) as scp:
        ds = dcmread(source)
        answer = send_raw(scp.port, sop_class=str(ds.SOPClassUID), sop_instance=str(ds.SOPInstanceUID),
                          transfer_syntax=uids.JPEG_BASELINE, dataset_bytes=dataset_bytes(ds))
        assert answer.status == st.CANNOT_UNDERSTAND and "RuntimeError" in (answer.comment or "")
        rec = scp.audit.of(EventType.STORE_RECEIVED)[-1]
        assert rec.detail["status"] == "0xC000" and rec.outcome is Outcome.MINOR_FAILURE
        assert echoscu(LOCALHOST, scp.port, calling=MODALITY, called=SCP_AET).returncode == 0
