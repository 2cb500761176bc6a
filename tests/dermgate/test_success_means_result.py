"""Success means a result (issue 16): every object the SCP answers Success gets its SC and SR in
the PACS and its report, or a person is told why at once.

Real peers throughout: dcmtk's img2dcm and storescu as the modality, the running service (SCP,
worker with the committed model, dispatcher) on SQLite and a folder store, Orthanc as the PACS,
the FHIR bundles written to a folder as the report channel.
"""

from __future__ import annotations

import hashlib

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import pydicom
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import JPEG2000Lossless, generate_uid
from sqlalchemy import select

from audit.api import EventType
from dermgate.app import Runtime
from dermgate.db import Instance, Job, JobState
from dermgate.service import Service
from dermgate.settings import Settings
from integration.dicom_scp import uids
from tests.dermgate.test_service_e2e import MODALITY_AE, make_settings
from tests.peers.dcmtk import DCMCRLE, DCMDJPEG, IMG2DCM, convert, img2dcm, sample_jpeg, storescu
from tests.peers.dicom3tools import dciodvfy
from tests.peers.orthanc import OrthancPeer

SC_CLASS, SR_CLASS = str(uids.SECONDARY_CAPTURE_IMAGE_STORAGE), str(uids.COMPREHENSIVE_3D_SR_STORAGE)


@dataclass
class Running:
    rt: Runtime
    settings: Settings
    orthanc: OrthancPeer


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, orthanc: OrthancPeer) -> Iterator[Running]:
    settings = make_settings(tmp_path_factory.mktemp("work"), orthanc, backoff_base_s=0.05, backoff_max_s=0.2)
    settings.fhir_bundle_dir = settings.workdir / "bundles"
    rt = Runtime(settings)
    service = Service(rt, roles={"scp", "worker", "dispatcher"})
    service.start()
    try:
        yield Running(rt, settings, orthanc)
    finally:
        service.stop()
        rt.close()


def send(running: Running, files: list[Path], proposal: str = "-xy") -> str:
    """storescu proposing only what the files need (``-R``), compressed with ``proposal``
    (-xy JPEG Baseline, -xr RLE, -xv JPEG 2000 lossless; -xe uncompressed)."""
    res = storescu("127.0.0.1", running.settings.dicom.port, files, calling=MODALITY_AE, called="DERMGATE",
                   options=["-v", proposal, "-R"])
    return res.stdout + res.stderr


def finished_job(running: Running, sop_uid: str, timeout: float = 120.0) -> Job:
    """The job of ``sop_uid`` once it is delivered or dead-lettered."""
    deadline = time.monotonic() + timeout
    job = None
    while time.monotonic() < deadline:
        with running.rt.sessions() as s:
            job = s.scalar(select(Job).join(Instance, Instance.id == Job.instance_id)
                           .where(Instance.sop_instance_uid == sop_uid))
        if job is not None and job.state in (JobState.DELIVERED, JobState.FAILED):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job of {sop_uid} not finished: {job and (job.state, job.attempts, job.last_error)}")


def assert_result(running: Running, source: Path) -> tuple[Dataset, Dataset, dict]:
    """The source's job is delivered: SC and SR in Orthanc under its study, and its report bundle."""
    ds = dcmread(source, stop_before_pixels=True)
    job = finished_job(running, str(ds.SOPInstanceUID))
    assert job.state is JobState.DELIVERED, job.last_error
    arrived = running.orthanc.study_instances(str(ds.StudyInstanceUID))
    assert sorted(i["SOPClassUID"] for i in arrived) == [SC_CLASS, SR_CLASS], arrived
    store = running.settings.store_dir
    sc, sr = dcmread(store / job.outputs["sc_path"]), dcmread(store / job.outputs["sr_path"])
    bundle_file = running.settings.fhir_bundle_dir / f"{ds.SOPInstanceUID}_report.json"
    return sc, sr, json.loads(bundle_file.read_text())


def fresh(ds: Dataset) -> Dataset:
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    return ds


# ---- odd width x odd height --------------------------------------------------------------------------

def _odd_jpeg(folder: Path, width: int, height: int) -> Path:
    image = cv2.resize(cv2.imread(str(sample_jpeg())), (width, height), interpolation=cv2.INTER_CUBIC)
    path = folder / f"{width}x{height}.jpg"
    cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return path


@pytest.mark.parametrize("size, encoding", [((601, 451), "jpeg"), ((1001, 751), "jpeg"), ((603, 453), "raw"),
                                            ((605, 455), "rle"), ((607, 457), "j2k")])
def test_odd_width_and_odd_height_images_get_their_sc_sr_and_report(running: Running, tmp_path: Path,
                                                                    size: tuple[int, int], encoding: str) -> None:
    """Before: Success, then 5 retries of 'sc.dcm: pixel data did not read back as written'."""
    src = img2dcm(_odd_jpeg(tmp_path, *size), tmp_path / "jpeg.dcm", study_uid=generate_uid())
    if encoding != "jpeg":
        src = convert(DCMDJPEG, src, tmp_path / "raw.dcm")
    if encoding == "rle":
        src = convert(DCMCRLE, src, tmp_path / "rle.dcm")
    if encoding == "j2k":
        ds = dcmread(src)
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
        ds.save_as(tmp_path / "j2k.dcm")
        src = tmp_path / "j2k.dcm"
    proposal = {"jpeg": "-xy", "raw": "-xe", "rle": "-xr", "j2k": "-xv"}[encoding]
    assert "Received Store Response (Success)" in send(running, [src], proposal)
    sc, sr, bundle = assert_result(running, src)
    assert sc.Columns == size[0] and sc.Rows > size[1]                # the legend panel is below the image
    assert len(sc.PixelData) % 2 == 0 and len(sc.PixelData) >= sc.Rows * sc.Columns * 3
    assert bundle["entry"][-1]["resource"]["resourceType"] == "DiagnosticReport"


# ---- Type 2 attributes absent or empty, values that do not meet their VR ------------------------------

def _img2dcm_sc(folder: Path) -> Path:
    """img2dcm's default Secondary Capture: no Modality, every other Type 2 attribute empty."""
    out = folder / "sc.dcm"
    subprocess.run([IMG2DCM, "-k", "PatientID=SUCCESS-SC", "-k", f"StudyInstanceUID={generate_uid()}",
                    str(sample_jpeg()), str(out)], check=True, capture_output=True, timeout=30)
    return out


TYPE2 = ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "PatientName")


@pytest.mark.parametrize("variant", ["img2dcm-sc", *[f"no-{k}" for k in TYPE2], "dashed-dates"])
def test_objects_without_type2_attributes_or_with_odd_values_get_results(running: Running, tmp_path: Path,
                                                                         variant: str) -> None:
    """Before: Success, then 'rendering failed' from the SR writer, retried 5 times. After: the SC and SR
    carry what is valid, have every Type 2 attribute (empty when not valid) and invent nothing."""
    if variant == "img2dcm-sc":
        src = _img2dcm_sc(tmp_path)
    else:
        ds = fresh(dcmread(img2dcm(sample_jpeg(), tmp_path / "vl.dcm", patient_id="SUCCESS-T2")))
        if variant == "dashed-dates":
            ds.PatientBirthDate, ds.StudyDate, ds.StudyTime = "1970-01-31", "2025-02-03", "10:11:12"
        else:
            delattr(ds, variant.removeprefix("no-"))
        src = tmp_path / "variant.dcm"
        ds.save_as(src)
    assert "Received Store Response (Success)" in send(running, [src])
    sc, sr, bundle = assert_result(running, src)
    source = dcmread(src, stop_before_pixels=True)
    for out in (sc, sr):
        for keyword in TYPE2:
            assert keyword in out, (variant, keyword)
        assert out.PatientID == source.PatientID
        if variant == "dashed-dates":
            assert (out.PatientBirthDate, out.StudyDate, out.StudyTime) == ("19700131", "20250203", "101112")
        elif variant.startswith("no-"):
            assert out[variant.removeprefix("no-")].value in ("", None), "a missing value must not be invented"
    report = bundle["entry"][-1]["resource"]
    if variant == "dashed-dates":
        assert report["effectiveDateTime"].startswith("2025-02-03T10:11:12")
    if variant == "img2dcm-sc":                  # IOD-valid: no Type 2 attribute missing
        job = finished_job(running, str(source.SOPInstanceUID))
        for rel in (job.outputs["sc_path"], job.outputs["sr_path"]):
            type2 = [e for e in dciodvfy(running.settings.store_dir / rel).errors if "Type 2" in e]
            assert not type2, type2


# ---- permanent errors dead-letter at once ------------------------------------------------------------

def test_a_permanent_error_is_dead_lettered_at_once_with_its_reason(tmp_path: Path) -> None:
    """A stored object whose pixel data no longer decodes (the disk changed it after Success) fails
    the same way on every attempt: one attempt, dead-lettered, a reason a person can act on."""
    settings = make_settings(tmp_path / "work", None, backoff_base_s=0.05, backoff_max_s=0.1, max_attempts=5)
    rt = Runtime(settings)
    scp = Service(rt, roles={"scp"})
    scp.start()
    try:
        src = img2dcm(sample_jpeg(), tmp_path / "vl.dcm", patient_id="SUCCESS-PERM")
        assert "Received Store Response (Success)" in storescu(
            "127.0.0.1", settings.dicom.port, [src], calling=MODALITY_AE, called="DERMGATE",
            options=["-v", "-xy"]).stderr
    finally:
        scp.stop()
    with rt.sessions() as s:
        inst = s.scalars(select(Instance)).one()
    stored = settings.store_dir / inst.path
    ds = dcmread(stored)
    frames = list(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    broken = bytearray(frames[0])
    broken[2:400] = bytes(398)                      # the JPEG's tables gone: it cannot decode any more
    ds.PixelData = pydicom.encaps.encapsulate([bytes(broken)])
    ds["PixelData"].is_undefined_length = True
    ds.save_as(stored)
    # As if received so (the SCP's intake decodes at 1/8 scale only): the row's digest follows the
    # bytes, else the worker's check for an incompletely written object would retry it instead.
    with rt.sessions.begin() as s:
        s.scalars(select(Instance)).one().sha256 = hashlib.sha256(stored.read_bytes()).hexdigest()
    worker = rt.worker()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        worker.run_once()
        with rt.sessions() as s:
            job = s.scalars(select(Job)).one()
        if job.state is JobState.FAILED or job.attempts >= 2:
            break
        time.sleep(0.1)
    assert (job.state, job.attempts) == (JobState.FAILED, 1), (job.state, job.attempts, job.last_error)
    assert job.last_error.startswith("permanent, not retried: pixel data cannot be decoded"), job.last_error
    dead = [r.event for r in rt.audit.events() if r.event.event is EventType.CLASSIFIED and r.event.detail.get("dead_letter")]
    assert len(dead) == 1 and dead[0].detail["permanent"] is True and dead[0].patient_id == "SUCCESS-PERM"
    rt.close()


# ---- multi-frame: the outputs say which frame was classified -----------------------------------------

def test_a_multi_frame_image_result_says_only_the_first_frame_was_classified(running: Running,
                                                                              tmp_path: Path) -> None:
    ds = fresh(dcmread(convert(DCMDJPEG, img2dcm(sample_jpeg(), tmp_path / "vl.dcm", patient_id="SUCCESS-MF"),
                               tmp_path / "raw.dcm")))
    ds.NumberOfFrames = 3
    ds.PixelData = ds.PixelData * 3
    src = tmp_path / "multi.dcm"
    ds.save_as(src)
    assert "Received Store Response (Success)" in send(running, [src], "-xe")
    sc, sr, bundle = assert_result(running, src)
    note = "Only frame 1 of 3 was classified; the other frames were not assessed."
    texts = [item.get("TextValue") for item in sr.ContentSequence[-1].ContentSequence if "TextValue" in item]
    assert note in texts, texts
    assert "frame 1 of 3" in sc.DerivationDescription
    assert sc.SourceImageSequence[0].ReferencedFrameNumber == 1
    report = bundle["entry"][-1]["resource"]
    assert note in report["conclusion"]
    import base64
    from io import BytesIO

    from pypdf import PdfReader
    pdf = next(base64.b64decode(f["data"]) for f in report["presentedForm"] if f["contentType"] == "application/pdf")
    assert note in "".join(page.extract_text() for page in PdfReader(BytesIO(pdf)).pages).replace("\n", " ")
