"""Resources at the SCP (issue 16): a received object goes to a file as it arrives and is renamed into
the store, never held whole in memory; an object too large is refused while it arrives.

The SCP runs in this process (scp_support.running_scp), so its memory is this process's: the peak
(VmHWM, reset before each send) is measured around sends by dcmtk's storescu, each its own process.
"""

from __future__ import annotations

import gc
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from audit.api import EventType
from integration.dicom_scp import status as st
from integration.dicom_scp import uids
from tests.integration.dicom_scp.scp_support import LOCALHOST, MODALITY, SCP_AET, Harness, dicom_settings, running_scp
from tests.peers.dcmtk import STORESCU, dcmtk_env

MiB = 1 << 20


def native_object(path: Path, rows: int, columns: int) -> Path:
    """A native RGB VL Photographic object of rows x columns (random pixels)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = uids.VL_PHOTOGRAPHIC_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "RESOURCES-1", "XC"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 3, "RGB"
    ds.PlanarConfiguration, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 0, 8, 8, 7, 0
    ds.PixelData = np.random.default_rng(3).integers(0, 256, rows * columns * 3, dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    del ds
    gc.collect()
    return path


@dataclass(frozen=True)
class Answer:
    status: int
    reason: str | None
    received_bytes: int | None


def send_files(scp: Harness, paths: list[Path]) -> list[Answer]:
    """C-STORE each file with dcmtk's storescu, each on its own association, all at once; the
    answers as the SCP audited them (status, Error Comment, bytes received)."""
    before = len(scp.audit.of(EventType.STORE_RECEIVED))
    procs = [subprocess.Popen([STORESCU, "-aet", MODALITY, "-aec", SCP_AET, "-to", "120", "-td", "120",
                               LOCALHOST, str(scp.port), str(path)], env=dcmtk_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for path in paths]
    for proc in procs:
        proc.communicate(timeout=300)
    records = scp.audit.of(EventType.STORE_RECEIVED)[before:]
    assert len(records) == len(paths), [p.returncode for p in procs]
    return [Answer(int(r.detail["status"], 16), r.detail.get("reason"), r.detail.get("bytes")) for r in records]


def _status() -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


def peak_growth(action) -> tuple[object, int]:  # noqa: ANN001
    """(result of ``action``, growth of this process's peak RSS while it ran, in bytes)."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")       # reset VmHWM to the current RSS
    except OSError:
        pytest.skip("cannot reset the peak RSS (/proc/self/clear_refs) here")
    before = _status()["VmRSS"]
    result = action()
    growth = _status()["VmHWM"] - before
    print(f"peak RSS growth {growth / MiB:.1f} MiB")        # shown with -s / on failure
    return result, growth


def test_an_object_beyond_max_pixels_is_refused_as_it_arrives_without_being_held(tmp_path: Path) -> None:
    """Before: the 61 MB object was read into memory whole, then parsed, then refused (RSS +3x its
    size; three at once +9x). Now its header decides after the first MiB and the rest is dropped."""
    big = native_object(tmp_path / "big.dcm", 4500, 4500)            # 60.75 MB, 20.25 Mpx
    with running_scp(tmp_path / "scp", dicom_settings(max_pixels=4_000_000)) as scp:
        answers, growth = peak_growth(lambda: send_files(scp, [big]))
        assert [a.status for a in answers] == [st.UNSUPPORTED_IMAGE], answers
        assert "exceeds 4000000 pixels" in (answers[0].reason or "")
        assert growth < 16 * MiB, f"peak RSS grew by {growth / MiB:.0f} MiB for one object"
        assert (answers[0].received_bytes or 0) > 60_000_000      # all of it was read off the network
        answers, growth = peak_growth(lambda: send_files(scp, [big] * 3))
        assert [a.status for a in answers] == [st.UNSUPPORTED_IMAGE] * 3, answers
        assert growth < 24 * MiB, f"peak RSS grew by {growth / MiB:.0f} MiB for three objects at once"
        assert scp.instances() == []
        assert not list((scp.store.root / "incoming").iterdir())


def test_an_object_larger_than_max_object_bytes_is_refused_while_it_arrives(tmp_path: Path) -> None:
    obj = native_object(tmp_path / "nine.dcm", 1500, 2000)            # 9 MB, within max_pixels
    with running_scp(tmp_path / "scp", dicom_settings(max_object_bytes=4 * MiB)) as scp:
        (answer,) = send_files(scp, [obj])
        assert answer.status == st.UNSUPPORTED_IMAGE and answer.reason == f"object larger than {4 * MiB} bytes"
        assert scp.instances() == []
        assert not list((scp.store.root / "incoming").iterdir())


def test_an_accepted_object_is_received_into_a_file_and_renamed_into_the_store(tmp_path: Path) -> None:
    """A 27 MB object within the limits is stored as received: same bytes, nothing left in incoming/,
    and the SCP's peak memory stays below the object's size (only the decode check reads the pixels)."""
    obj = native_object(tmp_path / "ok.dcm", 3000, 3000)
    with running_scp(tmp_path / "scp", dicom_settings(max_pixels=10_000_000)) as scp:
        (answer,), growth = peak_growth(lambda: send_files(scp, [obj]))
        assert answer.status == st.SUCCESS, answer
        # The decode check holds the pixel data once and its RGB array once: about 2x 27 MB.
        assert growth < 2.5 * obj.stat().st_size, f"peak RSS grew by {growth / MiB:.0f} MiB"
        (inst,) = scp.instances()
        stored = scp.store.path(inst.path)
        assert dcmread(stored).PixelData == dcmread(obj).PixelData
        assert not list((scp.store.root / "incoming").iterdir())
        scp.assert_intact()


def test_another_scp_in_the_same_process_keeps_receiving_into_memory(tmp_path: Path) -> None:
    """Receiving into files is the dermgate SCP's, not the process's: pynetdicom's setting is global,
    so a plain pynetdicom SCP beside it (a test peer, a bench's ceiling) must see its usual
    in-memory ``event.encoded_dataset()``."""
    from pynetdicom import AE, evt
    obj = native_object(tmp_path / "small.dcm", 60, 80)
    received: list[bytes] = []

    def on_store(event: evt.Event) -> int:
        received.append(event.encoded_dataset(include_meta=False))
        return 0x0000

    with running_scp(tmp_path / "scp", dicom_settings()) as scp:
        (answer,) = send_files(scp, [obj])                        # the dermgate SCP: into a file
        assert answer.status == st.SUCCESS
        ae = AE(ae_title="PLAINSCP")
        ae.add_supported_context(uids.VL_PHOTOGRAPHIC_IMAGE_STORAGE, [ExplicitVRLittleEndian])
        server = ae.start_server((LOCALHOST, 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        try:
            proc = subprocess.run([STORESCU, "-aet", MODALITY, "-aec", "PLAINSCP", LOCALHOST,
                                   str(server.server_address[1]), str(obj)], env=dcmtk_env(), capture_output=True)
            assert proc.returncode == 0, proc.stderr
        finally:
            server.shutdown()
    assert len(received) == 1 and len(received[0]) > 60 * 80 * 3
    assert dcmread(obj).PixelData in received[0]
