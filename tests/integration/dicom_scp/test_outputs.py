"""The Grad-CAM Secondary Capture, the AI-result SR and the rendered heatmap.

Sources are made by dcmtk's img2dcm from a HAM10000 JPEG (VL Photographic and
Dermoscopic Photography), decoded by pydicom + pylibjpeg; every written object
is checked by dicom3tools' dciodvfy. The prediction is synthetic: the
classifier is tested in tests/inference.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom.valuerep import DA, TM
from pydicom import Dataset, dcmread

from integration.dicom_scp import uids
from integration.dicom_scp.outputs import (
    SourceDatasetError,
    WrittenOutputs,
    build_secondary_capture,
    write_outputs,
)
from integration.dicom_scp.render import MIN_WIDTH, encode_png, render_heatmap
from tests.peers.dcmtk import DERMOSCOPIC_PHOTOGRAPHY, VL_PHOTOGRAPHIC, img2dcm, sample_jpeg
from tests.peers.dicom3tools import dciodvfy
from tests.peers.results import TEST_MODEL, gaussian_cam, synthetic_prediction

NOW = datetime(2025, 3, 4, 12, 30, 15, tzinfo=timezone.utc)
# dciodvfy warnings we accept, each for a reason:
KNOWN_WARNINGS = (
    "(0x0018,0x1002) UI Device UID",          # IHE AIR puts Device UID in Contributing Equipment
    "Standard Extended SOP Class",            # ... which makes the instance Standard Extended
    "defined term <99DERMGATE>",              # our private coding scheme (identified in SOP Common)
    "attribute <Laterality>",                 # type 2C, empty = unknown; absent is an error to dciodvfy
)


@pytest.fixture(scope="module", params=["vl", "dermoscopic"])
def source(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    out = tmp_path_factory.mktemp("src") / f"{request.param}.dcm"
    return dcmread(img2dcm(sample_jpeg(), out, dermoscopic=request.param == "dermoscopic"))


@pytest.fixture(scope="module")
def written(source: Dataset, tmp_path_factory: pytest.TempPathFactory) -> WrittenOutputs:
    rgb = source.pixel_array
    return write_outputs(source, synthetic_prediction(*rgb.shape[:2], low_confidence=True),
                         tmp_path_factory.mktemp("out"), now=NOW)


def _sr_items(ds: Dataset) -> list[Dataset]:
    """All content items of an SR tree, depth first."""
    out: list[Dataset] = []
    stack = list(ds.get("ContentSequence", []))
    while stack:
        item = stack.pop(0)
        out.append(item)
        stack[0:0] = list(item.get("ContentSequence", []))
    return out


def _decode_png(data: bytes) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert bgr is not None, "not a PNG"
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _name(item: Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return code.CodeValue, code.CodingSchemeDesignator


def test_source_fixtures_are_the_two_photographic_classes(source: Dataset) -> None:
    """The img2dcm sources are JPEG Baseline VL Photographic or Dermoscopic Photography images."""
    assert source.SOPClassUID in (VL_PHOTOGRAPHIC, DERMOSCOPIC_PHOTOGRAPHY)
    assert source.file_meta.TransferSyntaxUID == uids.JPEG_BASELINE
    assert source.pixel_array.shape[2] == 3


def test_sc_and_sr_pass_iod_validation(written: WrittenOutputs) -> None:
    """dciodvfy finds no IOD error in the SC or the SR."""
    for path, iod in ((written.sc_path, "SCImage"), (written.sr_path, "Comprehensive3DSR")):
        report = dciodvfy(path)
        assert report.iod == iod
        assert report.errors == [], f"{path.name}: {report.errors}"
        unexpected = [w for w in report.warnings if not any(k in w for k in KNOWN_WARNINGS)]
        assert unexpected == [], f"{path.name}: {unexpected}"


def test_not_assessable_outputs_pass_iod_validation(source: Dataset, tmp_path: Path) -> None:
    """A not-assessable result still yields valid objects: the banner SC and an SR saying why."""
    rgb = source.pixel_array
    out = write_outputs(source, synthetic_prediction(*rgb.shape[:2], assessable=False), tmp_path, now=NOW)
    for path in (out.sc_path, out.sr_path):
        assert dciodvfy(path).errors == []
    texts = [i.TextValue for i in _sr_items(out.sr) if i.ValueType == "TEXT"]
    assert any("too dark" in t for t in texts)
    risk = [i for i in _sr_items(out.sr) if i.ValueType == "CODE" and _name(i) == ("RISK-CATEGORY", uids.LOCAL)]
    assert risk[0].ConceptCodeSequence[0].CodeValue == uids.NOT_ASSESSABLE.value
    assert not [i for i in _sr_items(out.sr) if i.ValueType == "NUM"]


def test_sc_is_a_derived_secondary_capture_in_the_source_study(source: Dataset, written: WrittenOutputs) -> None:
    """Same study and patient, a new series, DERIVED\\SECONDARY, WSD, burned-in text, and a
    Source Image Sequence that points back to the original."""
    sc = written.sc
    assert sc.SOPClassUID == uids.SECONDARY_CAPTURE_IMAGE_STORAGE
    assert sc.file_meta.TransferSyntaxUID == uids.EXPLICIT_VR_LE
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "AccessionNumber", "StudyID", "StudyDate"):
        assert sc[keyword].value == source[keyword].value
    assert list(sc.ImageType) == ["DERIVED", "SECONDARY"]
    assert sc.ConversionType == "WSD"
    assert sc.BurnedInAnnotation == "YES"
    assert "Grad-CAM" in sc.DerivationDescription
    ref = sc.SourceImageSequence[0]
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (source.SOPClassUID, source.SOPInstanceUID)
    assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == uids.SOURCE_IMAGE_FOR_PROCESSING.value
    assert sc.LossyImageCompression == "01"          # the JPEG ancestor was lossy
    assert (sc.PhotometricInterpretation, sc.SamplesPerPixel, sc.BitsAllocated) == ("RGB", 3, 8)
    assert sc.pixel_array.shape == (sc.Rows, sc.Columns, 3)
    assert sc.Columns >= MIN_WIDTH > source.Columns  # the small source was upscaled for a legible legend


def test_sc_pixels_are_the_rendered_heatmap(source: Dataset, written: WrittenOutputs) -> None:
    """The SC's pixel data is exactly the PNG companion's image."""
    assert np.array_equal(_decode_png(written.png), written.sc.pixel_array)
    assert written.png_path.read_bytes() == written.png


def test_sr_is_a_tid1500_report_of_the_source_image(source: Dataset, written: WrittenOutputs) -> None:
    """Comprehensive 3D SR, root 126000 (TID 1500), unverified, with the source image as evidence."""
    sr = written.sr
    assert sr.SOPClassUID == uids.COMPREHENSIVE_3D_SR_STORAGE
    assert sr.Modality == "SR"
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.PatientID == source.PatientID
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert sr.ConceptNameCodeSequence[0].CodeValue == uids.IMAGING_MEASUREMENT_REPORT.value
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    evidence = {ref.ReferencedSOPInstanceUID
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence
                for ref in series.ReferencedSOPSequence}
    assert {source.SOPInstanceUID, written.sc.SOPInstanceUID} <= evidence


def test_sr_carries_coded_findings_probabilities_risk_and_disclaimer(written: WrittenOutputs) -> None:
    """Each class as a coded Finding with its probability in %, plus malignancy probability,
    the risk category, the low-confidence flag, the device observer and the disclaimer."""
    items = _sr_items(written.sr)
    findings = [i.ConceptCodeSequence[0].CodeValue for i in items if i.ValueType == "CODE"
                and _name(i) == ("121071", uids.DCM)]
    assert findings[0] == uids.FINDING_CODES["nv"].value                       # summary: the top class
    assert sorted(findings[1:]) == sorted(c.value for c in uids.FINDING_CODES.values())
    assert uids.FINDING_CODES["mel"].value == "93655004"
    nums = {(_name(i), float(i.MeasuredValueSequence[0].NumericValue),
             i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue)
            for i in items if i.ValueType == "NUM"}
    assert (("111047", uids.DCM), 28.0, "%") in nums                           # malignancy probability
    assert (("122157", uids.DCM), 62.0, "%") in nums                           # nv
    risk = [i for i in items if i.ValueType == "CODE" and _name(i) == ("RISK-CATEGORY", uids.LOCAL)]
    assert risk[0].ConceptCodeSequence[0].CodeValue == uids.MODERATE_RISK.value
    low = [i for i in items if i.ValueType == "CODE" and _name(i) == ("LOW-CONFIDENCE", uids.LOCAL)]
    assert low[0].ConceptCodeSequence[0].CodeValue == uids.YES.value
    device = [i for i in items if i.ValueType == "UIDREF" and _name(i) == ("121012", uids.DCM)]
    assert device[0].UID == TEST_MODEL.device_uid
    assert any(i.ValueType == "TEXT" and "not a diagnosis" in i.TextValue for i in items)


def test_both_name_the_algorithm_as_contributing_equipment(written: WrittenOutputs) -> None:
    """IHE AIR: Processing Algorithm (Newcode1, 99IHE) with manufacturer, model, version, Device UID."""
    for ds in (written.sc, written.sr):
        item = ds.ContributingEquipmentSequence[0]
        purpose = item.PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
            "Newcode1", "99IHE", "Processing Algorithm")
        assert (item.Manufacturer, item.ManufacturerModelName, item.SoftwareVersions, item.DeviceUID) == (
            TEST_MODEL.manufacturer, TEST_MODEL.name, TEST_MODEL.version, TEST_MODEL.device_uid)
        schemes = {s.CodingSchemeDesignator for s in ds.CodingSchemeIdentificationSequence}
        assert {uids.LOCAL, uids.IHE} <= schemes


def test_rerun_writes_the_same_instances_and_a_new_model_new_ones(source: Dataset, written: WrittenOutputs,
                                                                   tmp_path: Path) -> None:
    """UIDs derive from the source and the model's Device UID: a re-run repeats them, a new model does not."""
    rgb = source.pixel_array
    again = write_outputs(source, synthetic_prediction(*rgb.shape[:2]), tmp_path / "again", now=NOW)
    assert (again.sc.SOPInstanceUID, again.sr.SOPInstanceUID) == (written.sc.SOPInstanceUID,
                                                                  written.sr.SOPInstanceUID)
    assert again.sc.SeriesInstanceUID == written.sc.SeriesInstanceUID
    assert written.sc.SOPInstanceUID.startswith("2.25.")
    new_model = dataclasses.replace(TEST_MODEL, version="0.0.2-test", device_uid="2.25.2")
    other = write_outputs(source, synthetic_prediction(*rgb.shape[:2], model=new_model), tmp_path / "new", now=NOW)
    assert other.sc.SOPInstanceUID != written.sc.SOPInstanceUID
    assert other.sr.SOPInstanceUID != written.sr.SOPInstanceUID
    assert len({written.sc.SOPInstanceUID, written.sr.SOPInstanceUID, source.SOPInstanceUID}) == 3


def _sr_the_long_way(source: Dataset, prediction, sc: Dataset) -> Dataset:  # noqa: ANN001
    """build_ai_sr as written before it handed highdicom an empty root container: the whole tree."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from integration.dicom_scp import outputs as o
    source = o._header(source)
    model = prediction.model
    observer = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=model.device_uid, name=model.name, manufacturer_name=model.manufacturer, model_name=model.name)))
    report = hd.sr.MeasurementReport(observation_context=observer,
                                     procedure_reported=uids.DERMOSCOPIC_PHOTOGRAPHY_PROCEDURE,
                                     imaging_measurements=o._measurement_groups(source, prediction),
                                     title=uids.IMAGING_MEASUREMENT_REPORT)
    report[0].ContentSequence.append(o._qualitative_evaluations(prediction, o.frame_count(source)))
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source, sc], content=report[0],
        series_instance_uid=o.derived_uid(source.SeriesInstanceUID, model.device_uid, "sr-series"),
        series_number=o.SR_SERIES_NUMBER, sop_instance_uid=o.derived_uid(source.SOPInstanceUID, model.device_uid, "sr"),
        instance_number=int(source.get("InstanceNumber") or 1), manufacturer=o.EQUIPMENT_MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False, series_description=f"AI result ({model.name})")
    o._fill_common(sr, source, prediction, NOW)
    sr.ContentDate = DA(NOW.strftime("%Y%m%d"))
    sr.ContentTime = TM(NOW.strftime("%H%M%S"))
    return sr


@pytest.fixture
def frozen_highdicom_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """highdicom stamps its own Contribution DateTime with its clock: fixed, so two builds compare."""
    import datetime as dt
    import types

    import highdicom.base_content

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz: object = None) -> Frozen:  # noqa: ANN102
            return cls(2025, 3, 4, 12, 30, 15, 123456)

    monkeypatch.setattr(highdicom.base_content, "datetime",
                        types.SimpleNamespace(datetime=Frozen, date=dt.date, time=dt.time))


def _predictions(shape: tuple[int, int]) -> list:  # noqa: ANN401
    """Predictions of every kind: random probabilities (several top classes), low confidence,
    not assessable with and without a reason, with and without an OOD score, flagged or not."""
    import random

    from inference.result import CLASSES, Risk
    out = [synthetic_prediction(*shape), synthetic_prediction(*shape, low_confidence=True),
           synthetic_prediction(*shape, assessable=False),
           dataclasses.replace(synthetic_prediction(*shape, assessable=False), reason=None)]
    rng = random.Random(15)
    for _ in range(12):
        weights = [rng.random() ** 3 for _ in CLASSES]
        probs = {c: w / sum(weights) for c, w in zip(CLASSES, weights)}
        out.append(dataclasses.replace(out[0], probabilities=probs, malignancy_probability=rng.random(),
                                       uncertainty=rng.random(), risk=rng.choice([Risk.LOW, Risk.MEDIUM, Risk.HIGH]),
                                       low_confidence=rng.random() < 0.3))
    for i in range(6):                      # OOD scores (model 2.0.0 ships its statistics)
        ood = rng.random() * 30
        out.append(dataclasses.replace(out[4 + i], ood_score=ood, out_of_distribution=ood > 16.58))
    return out


def test_sr_is_byte_for_byte_what_highdicom_makes_of_the_whole_tree(source: Dataset,
                                                                    frozen_highdicom_clock: None) -> None:
    """Neither fast path changes a byte of the SR: highdicom given the root container without its
    items (build_ai_sr), and the per-shape templates with the per-image values spliced in
    (encode_ai_sr), both against highdicom building and encoding the whole tree."""
    from integration.dicom_scp.outputs import _undefined_lengths, build_ai_sr, encode, encode_ai_sr
    rgb = source.pixel_array
    for prediction in _predictions(rgb.shape[:2]):
        sc = build_secondary_capture(source, render_heatmap(rgb, prediction), prediction, now=NOW)
        slow = _sr_the_long_way(source, prediction, sc)
        _undefined_lengths(slow)
        reference = encode(slow)
        assert encode(build_ai_sr(source, prediction, sc, now=NOW)) == reference
        assert encode_ai_sr(source, prediction, sc, now=NOW) == reference, prediction


def test_written_files_are_the_encoded_objects_and_can_be_synced_later(source: Dataset, tmp_path: Path) -> None:
    """With sync=False the files are in place (and what was encoded), their fsyncs left to the caller."""
    from dermgate.durable import sync_all
    rgb = source.pixel_array
    out = write_outputs(source, synthetic_prediction(*rgb.shape[:2]), tmp_path, now=NOW, sync=False)
    assert len(out.pending) == 3 and all(d.fd >= 0 for d in out.pending)
    sync_all(out.pending)
    assert all(d.fd == -1 for d in out.pending)
    assert out.sc.SOPInstanceUID == out.sc_sop_instance_uid and out.sr.SOPInstanceUID == out.sr_sop_instance_uid
    assert out.png_path.read_bytes() == out.png


def test_source_without_study_uid_is_refused(source: Dataset) -> None:
    """Outputs are never written into an unknown study."""
    broken = source.copy()
    del broken.StudyInstanceUID
    with pytest.raises(SourceDatasetError, match="StudyInstanceUID"):
        build_secondary_capture(broken, np.zeros((10, 10, 3), np.uint8), synthetic_prediction(10, 10))


# --- render ----------------------------------------------------------------------

def _photo(height: int = 150, width: int = 200) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = np.full((height, width, 3), (200, 150, 140), np.uint8)
    return np.clip(base + rng.integers(-10, 10, base.shape), 0, 255).astype(np.uint8)


def test_small_images_are_upscaled_with_a_legend_panel_below() -> None:
    """A 200 px wide image becomes >= 600 px wide with a text panel appended under it."""
    img = _photo()
    out = render_heatmap(img, synthetic_prediction(150, 200))
    assert out.dtype == np.uint8 and out.shape[1] == MIN_WIDTH
    image_h = round(150 * MIN_WIDTH / 200)
    assert out.shape[0] > image_h + 150                     # room for the legend lines
    panel = out[image_h:]
    assert (panel > 200).mean() > 0.01                      # light text drawn on the dark panel


def test_heatmap_tints_where_the_cam_is_high() -> None:
    """The overlay changes the centre (CAM ~1) far more than the corners (CAM ~0)."""
    img = _photo(450, 600)
    out = render_heatmap(img, synthetic_prediction(450, 600))[:450]
    diff = np.abs(out.astype(int) - img.astype(int)).sum(axis=2)
    assert diff[200:250, 275:325].mean() > 3 * diff[:40, :40].mean()


def test_cam_of_another_size_is_resized_to_the_image() -> None:
    """A CAM at the model's input size still covers the whole image."""
    pred = dataclasses.replace(synthetic_prediction(450, 600), cam=gaussian_cam(224, 224))
    assert render_heatmap(_photo(450, 600), pred).shape[1] == 600


def test_not_assessable_renders_the_original_under_a_banner() -> None:
    """No heatmap; a red banner over the top; the rest of the image is the upscaled original."""
    img = _photo(450, 600)
    out = render_heatmap(img, synthetic_prediction(450, 600, assessable=False))
    top = out[:10].reshape(-1, 3).mean(axis=0)
    assert top[0] > 120 and top[1] < 60                     # red
    assert np.array_equal(out[300:450], img[300:450])


def test_png_round_trips_losslessly() -> None:
    """encode_png is lossless RGB."""
    img = _photo()
    assert np.array_equal(_decode_png(encode_png(img)), img)


def test_rendering_a_large_image_holds_a_few_bytes_per_pixel() -> None:
    """A 4000 x 3000 photograph (12 Mpx, as modalities send) rendered with its heatmap: the blend
    used to hold ~55 bytes of float32 temporaries per pixel (+630 MiB per image, times the
    batch); in bands of rows the peak is the output and a few copies of it."""
    from pathlib import Path
    img = _photo(3000, 4000)
    pred = dataclasses.replace(synthetic_prediction(3000, 4000), cam=gaussian_cam(224, 224))
    try:
        Path("/proc/self/clear_refs").write_text("5")       # reset the peak RSS (VmHWM)
    except OSError:
        pytest.skip("cannot reset the peak RSS here")

    def status(key: str) -> int:
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(key))
        return int(line.split()[1]) * 1024

    before = status("VmRSS:")
    out = render_heatmap(img, pred)
    growth = status("VmHWM:") - before
    assert out.shape[1] == 4000 and out.shape[0] > 3000
    assert growth < 20 * img.shape[0] * img.shape[1], f"peak grew {growth / 2**20:.0f} MiB for 12 Mpx"
